"""`camloc sanity`: the model-randomisation sanity check (Adebayo et al. 2018) of methods."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (AnnFileOption, CacheOption, ChunkOption, CompileOption, DataRootOption, DeviceOption,
                               ImageDirOption, MaxPixelsOption, ModelOption, PrecisionOption, SplitOption,
                               SubsetSeedOption, comma_list, reports_errors, with_method_options)
from camloc.defaults import DEFAULT_FLAG_SPEARMAN


@app.command()
@reports_errors
@with_method_options
def sanity(
    method: str = typer.Option(..., "--method", help="Method, comma list, or all (see `camloc list methods`)."),
    model: str = ModelOption,
    dataset: str = typer.Option("demo", "--dataset", "-d", help="Dataset whose pairs are explained (see `camloc list datasets`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for sanity.json, sanity.csv and sanity.md."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (a random N with --subset-seed)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma list of class names to keep."),
    subset_seed: Optional[int] = SubsetSeedOption,
    split: Optional[str] = SplitOption,
    data_root: Optional[Path] = DataRootOption,
    ann_file: Optional[Path] = AnnFileOption,
    image_dir: Optional[Path] = ImageDirOption,
    max_pixels: Optional[int] = MaxPixelsOption,
    prompt_template: str = typer.Option("{}", "--prompt-template", help="Prompt with {} for the class name, e.g. 'a photo of a {}.'"),
    seed: int = typer.Option(0, "--seed", help="Seed of the re-drawn weights (and of RISE's masks)."),
    flag_spearman: float = typer.Option(DEFAULT_FLAG_SPEARMAN, "--flag-spearman", help="Flag a method whose mean Spearman correlation with the trained maps, with the whole image tower re-drawn, is at least this."),
    fail_on_flag: bool = typer.Option(False, "--fail-on-flag", help="Exit with code 1 when a method is flagged (for CI)."),
    force_new: bool = typer.Option(False, "--force-new", help="Replace a sanity check's results already in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    chunk_size: str = ChunkOption,
    compile_mode: str = CompileOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    cache_dir: Optional[str] = CacheOption,
    method_values: dict | None = None,
) -> None:
    """Re-run methods with the image tower re-drawn from the top down (head, blocks, stem) and report how
    much each map changed (Spearman, SSIM): a method whose maps do not change is flagged."""
    from camloc.api import load_model
    from camloc.api import sanity as run
    from camloc.cams import resolve_methods
    from camloc.models.preprocess import set_max_pixels
    from camloc.models.specs import family_hint
    from camloc.run.sanity import check_flag, check_out

    set_max_pixels(max_pixels)
    check_flag(flag_spearman)  # bad options before any weights are fetched
    check_out(out, force_new)
    if family_hint(model):
        resolve_methods(method, family_hint(model), model)
    clip_model = load_model(model, device=device, precision=precision, cache_dir=cache_dir)
    result = run(clip_model, dataset, method, out=out, limit=limit,
                 classes=comma_list(classes), split=split,
                 prompt_template=prompt_template, subset_seed=subset_seed, data_root=data_root, ann_file=ann_file,
                 image_dir=image_dir, seed=seed, flag_spearman=flag_spearman, chunk_size=chunk_size,
                 compile=compile_mode, force_new=force_new, progress=progress, **method_values)
    typer.echo((out / "sanity.md").read_text().rstrip())
    stages = len(result["stages"])
    typer.echo(f"{len(result['pairs'])} pairs x {len(result['methods'])} methods x {stages} stages "
               f"({result['seconds']:.1f} s); wrote {out}/ sanity.json, sanity.csv, sanity.md")
    for name in result["flagged"]:
        last = result["results"][name][-1]
        typer.echo(f"FLAGGED {name}: mean Spearman {last['spearman']:.3f} >= {flag_spearman} with the whole image "
                   "tower re-drawn: its maps do not depend on what the model learnt")
    if fail_on_flag and result["flagged"]:
        raise typer.Exit(1)
