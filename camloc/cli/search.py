"""`camloc threshold-search`: Table S1, the Otsu-vs-single-threshold ablation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (CacheOption, ChunkOption, CompileOption, DataRootOption, DeviceOption, MaxPixelsOption,
                               PerClassOption, PrecisionOption, SubsetSeedOption, parse_chunk_size, parse_compile,
                               reports_errors, with_method_options)


@app.command("threshold-search")
@reports_errors
@with_method_options
def threshold_search_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with a [threshold_search] table (configs/table_s1.toml); options given here override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="One model (replaces the config's runs)."),
    method: Optional[str] = typer.Option(None, "--method", help="Methods for --model: comma list or all."),
    train_dataset: str = typer.Option("coco-train-balanced", "--train-dataset", help="Where the threshold is searched."),
    val_dataset: str = typer.Option("coco", "--val-dataset", help="Where single value and Otsu are compared."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (tables, curves, heatmap cache)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only N images of each dataset (smoke runs)."),
    per_class: int = PerClassOption,
    subset_seed: Optional[int] = SubsetSeedOption,
    data_root: Optional[Path] = DataRootOption,
    max_pixels: Optional[int] = MaxPixelsOption,
    grid_start: float = typer.Option(0.0, "--grid-start", help="First threshold of the grid."),
    grid_stop: float = typer.Option(0.95, "--grid-stop", help="Last threshold of the grid."),
    grid_step: float = typer.Option(0.05, "--grid-step", help="Grid step."),
    iou: str = typer.Option("gscorecam", "--iou", help="IoU convention: gscorecam or coco."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for box derivation [default: all cores]."),
    chunk_size: str = ChunkOption,
    compile_mode: str = CompileOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: compute the heatmaps of this share of the images [default: from RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS, else 0/1]; the search runs once every share is cached."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    cache_dir: Optional[str] = CacheOption,
    method_values: dict | None = None,
    method_extra: dict | None = None,
) -> None:
    """Grid-search one binarisation threshold on the train subset, compare it with Otsu on val (Table S1)."""
    from camloc.config import Settings, load_config
    from camloc.errors import OptionError
    from camloc.models.preprocess import set_max_pixels
    from camloc.run.sharding import start_shard
    from camloc.run.threshold_search import SearchConfig, run_threshold_search

    set_max_pixels(max_pixels)
    file = load_config(config, "threshold_search") if config else {}
    setting = Settings(ctx, file)
    given, values = setting.given, setting.values
    if model:
        runs = [{"model": model, "methods": [m.strip() for m in (method or "all").split(",")]}]
    else:
        runs = file.get("runs")
    if not runs:
        raise OptionError("--model (or runs in the --config file) is required")
    out_dir = out or file.get("out")
    if not out_dir:
        raise OptionError("--out is required (on the command line or in the --config file)")
    defaults = SearchConfig(runs=runs)
    train = dict(file.get("train", defaults.train))
    val = dict(file.get("val", defaults.val))
    for spec, dataset_param in ((train, "train_dataset"), (val, "val_dataset")):
        if dataset_param in given or "dataset" not in spec:
            spec["dataset"] = values[dataset_param]
        for param in ("limit", "data_root"):
            if param in given:
                spec[param] = str(values[param]) if param == "data_root" else values[param]
    for param in ("per_class", "subset_seed"):
        if param in given:
            train[param] = values[param]
    grid = dict(file.get("grid", defaults.grid))
    for param, key in (("grid_start", "start"), ("grid_stop", "stop"), ("grid_step", "step")):
        if param in given or key not in grid:
            grid[key] = values[param]
    options = {**setting.method_options(), **(method_extra or {})}
    search = SearchConfig(runs=runs, train=train, val=val, grid=grid, options=options, iou=setting("iou"),
                          precision=setting("precision"))
    rank_world = start_shard(shard)
    try:
        summary = run_threshold_search(search, out_dir, device=setting("device"), cache_dir=cache_dir,
                                       chunk_size=parse_chunk_size(str(setting("chunk_size"))),
                                       compile=parse_compile(str(setting("compile_mode", "compile"))),
                                       workers=setting("workers"), progress=progress, shard=rank_world)
    except ValueError as exc:
        if isinstance(exc, OptionError):
            raise
        raise OptionError(str(exc)) from exc
    out_dir = Path(out_dir)
    if not summary["complete"]:
        typer.echo(f"shard {rank_world[0]}/{rank_world[1]}: {summary['pairs_computed']} heatmaps computed into "
                   f"{out_dir}/heatmaps; other shards are still missing maps, so the search runs in the shard that "
                   "finishes last (or run the same command without --shard once all are done)")
        return
    typer.echo((out_dir / "table_s1.md").read_text().rstrip())
    typer.echo(f"{summary['train_pairs']} train and {summary['val_pairs']} val pairs; {summary['pairs_computed']} "
               f"heatmaps computed, the rest from the cache; wrote {out_dir}/table_s1.csv, table_s1.md, curves.csv, "
               "curves.png, summary.json")
