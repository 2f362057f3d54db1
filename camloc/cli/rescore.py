"""`camloc rescore`: other protocols on a run's saved heatmaps, without the model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import AnnFileOption, DataRootOption, ImageDirOption, SkipBadRecordsOption, reports_errors


@app.command("rescore")
@reports_errors
def rescore_cmd(
    run_dir: Path = typer.Argument(..., help="A camloc eval run folder made with --save-heatmaps."),
    protocols: str = typer.Option(..., "--protocols", help="Comma list of box (always scored), mask-iou, pointing, maxboxacc, pxap, chefer-seg, imagenet-s, points."),
    out: Path = typer.Option(..., "--out", "-o", help="The new run folder (the source is never changed)."),
    pointing_tolerance: Optional[float] = typer.Option(None, "--pointing-tolerance", help="Pointing game tolerance in pixels [default: the source run's, 15]."),
    cam_curve_interval: Optional[float] = typer.Option(None, "--cam-curve-interval", help="MaxBoxAccV2/PxAP threshold step [default: the source run's, 0.01]."),
    data_root: Optional[Path] = DataRootOption,
    ann_file: Optional[Path] = AnnFileOption,
    image_dir: Optional[Path] = ImageDirOption,
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: rescore this share of the images [default: from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, else 0/1]."),
    force_new: bool = typer.Option(False, "--force-new", help="Discard the results already in --out."),
    skip_bad_records: bool = SkipBadRecordsOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Score a run's saved heatmaps with other protocols into a new run folder; no model is loaded.
    The data is read where the run read it (its config.json's data_sources) unless --data-root,
    --ann-file or --image-dir say where it is now; either way it is checked to be the run's data."""
    from camloc.api import rescore
    from camloc.run.sharding import resolve_shard

    rank_world = resolve_shard(shard)
    summary = rescore(run_dir, protocols, out, pointing_tolerance=pointing_tolerance,
                      cam_curve_interval=cam_curve_interval, data_root=data_root, ann_file=ann_file,
                      image_dir=image_dir, shard=rank_world, force_new=force_new, progress=progress,
                      skip_bad_records=skip_bad_records)
    if rank_world[1] > 1 and not summary.get("complete"):
        typer.echo(f"shard {rank_world[0]}/{rank_world[1]} done; the rank that finishes last writes the merged tables "
                   f"(or run `camloc report {out}`)")
        return
    typer.echo((out / "table.md").read_text().rstrip())
    typer.echo(f"rescored {summary['timings']['records_this_invocation']} records of {run_dir} without the model "
               f"from its {summary['faults']['heatmap_dtype']} maps; wrote {out}/ pairs records, summary.json, "
               "table.csv, table.md")
    if summary["faults"]["heatmap_dtype"] == "float16":
        from camloc.cli.common import err_console

        err_console.print("[yellow]note:[/] the source run stored its maps as float16 (--heatmap-dtype float16): "
                          "values are scored from the rounded maps and can differ from the source's own slightly")
