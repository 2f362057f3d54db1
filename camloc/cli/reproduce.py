"""`camloc reproduce`: a paper's table from its preset, with the published numbers beside camloc's."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import DeviceOption, ImageBatchOption, PrecisionOption, reports_errors
from camloc.errors import OptionError


def _names(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@app.command("reproduce")
@reports_errors
def reproduce_cmd(
    name: str = typer.Argument(..., help="A preset (see `camloc reproduce list`), or list."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The reproduction folder: one run folder per (model, dataset) under it, and table.md/.csv/.tex."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="The folder holding the preset's datasets in their usual layouts (VOCdevkit/, ADEChallengeData2016/, cityscapes/, COCO's val2017/ and annotations/ ...)."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="DATASET=FOLDER: that dataset's own data root (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of each dataset: the table is then marked partial and prints no differences."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list: only these of the preset's methods."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma list: only these of the preset's datasets."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma list: only these of the preset's models."),
    substitute_model: Optional[str] = typer.Option(None, "--substitute-model", help="Run every model of the preset as this one (a smoke test, e.g. tiny-vit): the table is marked partial."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: this share of every run's images [default: from RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS, else 0/1]."),
    table_only: bool = typer.Option(False, "--table-only", help="Write the table from the run folders as they are; run nothing."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    image_batch: str = ImageBatchOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run a paper's table as camloc evaluations and write it with published | camloc | delta per cell.

    `camloc reproduce list` shows the presets, what each needs and where its settings and numbers come from."""
    from camloc import reproduce

    if name == "list":
        for row in reproduce.listing():
            typer.echo(f"{row['name']}: {row['title']}")
            typer.echo(f"  {row['protocol']}; models {row['models']}; methods {row['methods']}; "
                       f"datasets {row['datasets']}; about {row['gpu_hours']:g} GPU-hour{'' if row['gpu_hours'] == 1 else 's'}"
                       + (f" at {row['precision']}" if row["precision"] else ""))
            typer.echo(f"  settings: {row['settings']}")
            typer.echo(f"  published: {row['published']}")
        return
    if out is None:
        raise OptionError("--out is required: the folder the preset's runs and table go to")
    if table_only:
        result = reproduce.write_table(name, out)
    else:
        from camloc.run.sharding import resolve_shard

        chosen = reproduce.preset(name)
        wanted = chosen.precision
        if wanted and reproduce.preset_precision(chosen, precision, device) not in (wanted, precision):
            typer.echo(f"note: {name} runs at {wanted} on CUDA; on the CPU it runs fp32, and the table's title says so",
                       err=True)

        roots = {}
        for item in data or []:
            dataset, sep, folder = item.partition("=")
            if not sep or not dataset or not folder:
                raise OptionError(f"--data {item!r}: write DATASET=FOLDER")
            roots[dataset] = Path(folder)
        result = reproduce.run_preset(name, out, data_root=data_root, data=roots, limit=limit, methods=_names(methods),
                                      datasets=_names(datasets), models=_names(models),
                                      substitute_model=substitute_model, shard=resolve_shard(shard), device=device,
                                      precision=precision, image_batch=image_batch, progress=progress)
    typer.echo(Path(result["files"][0]).read_text(), nl=False)
    typer.echo(f"wrote {', '.join(result['files'])}")
