"""`camloc eval`: evaluate methods on a dataset into a resumable run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (AnnFileOption, CacheOption, ChunkOption, DataRootOption, DeviceOption, GroupingOption,
                               ImageDirOption, ModelOption, PerClassOption, PrecisionOption, SplitOption,
                               StartLayerOption, SubsetSeedOption, ThresholdOption, TopkOption, method_options,
                               parse_chunk_size, parse_threshold, reports_errors)


@app.command("eval")
@reports_errors
def eval_cmd(
    method: str = typer.Option(..., "--method", help="Method, comma list, or all (see `camloc list methods`)."),
    model: str = ModelOption,
    dataset: str = typer.Option("demo", "--dataset", "-d", help="Dataset (see `camloc list datasets`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder; an existing one with the same config is resumed."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma list of class names to keep."),
    subset_seed: Optional[int] = SubsetSeedOption,
    split: Optional[str] = SplitOption,
    per_class: int = PerClassOption,
    data_root: Optional[Path] = DataRootOption,
    ann_file: Optional[Path] = AnnFileOption,
    image_dir: Optional[Path] = ImageDirOption,
    prompt_template: str = typer.Option("{}", "--prompt-template", help="Prompt with {} for the class name, e.g. 'a photo of a {}.'"),
    threshold: str = ThresholdOption,
    iou: str = typer.Option("gscorecam", "--iou", help="IoU convention: gscorecam (+1 pixels, as the original) or coco."),
    seed: int = typer.Option(0, "--seed", help="Random seed, recorded in the results."),
    topk: int = TopkOption,
    grouping: str = GroupingOption,
    start_layer: int = StartLayerOption,
    chunk_size: str = ChunkOption,
    force_new: bool = typer.Option(False, "--force-new", help="Discard the results already in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    cache_dir: Optional[str] = CacheOption,
) -> None:
    """Evaluate CAM methods on a dataset: pairs.jsonl, summary.json, table.csv, table.md in --out."""
    from camloc.errors import CamlocError
    from camloc.evaluators.iou import CONVENTIONS
    from camloc.runner import EvalConfig, run_eval

    if iou not in CONVENTIONS:
        raise CamlocError(f"--iou {iou!r} is not one of {', '.join(CONVENTIONS)}")
    config = EvalConfig(
        model=model,
        methods=[m.strip() for m in method.split(",") if m.strip()],
        dataset=dataset,
        limit=limit,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        subset_seed=subset_seed,
        split=split,
        per_class=per_class,
        prompt_template=prompt_template,
        threshold=parse_threshold(threshold),
        iou_convention=iou,
        precision=precision,
        seed=seed,
        options=method_options(topk, grouping, start_layer),
    )
    summary = run_eval(config, out, device=device, cache_dir=cache_dir, force_new=force_new, progress=progress,
                       chunk_size=parse_chunk_size(chunk_size),
                       data_options={"data_root_dir": data_root, "ann_file": ann_file, "image_dir": image_dir})
    typer.echo((out / "table.md").read_text().rstrip())
    t = summary["timings"]
    typer.echo(f"{summary['n_pairs']} pairs x {len(config.methods)} methods; {t['records_this_invocation']} new records, "
               f"{t['resumed_records']} resumed; wrote {out}/pairs.jsonl, summary.json, table.csv, table.md")
