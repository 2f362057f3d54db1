"""`camloc data download|verify`: get the datasets and check their layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (AdeExtentOption, AnnFileOption, DataRootOption, ImageDirOption, IncludeStuffOption,
                               SplitOption, reports_errors)

data_app = typer.Typer(help="Download datasets and check their layout.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("download")
@reports_errors
def download_cmd(
    dataset: str = typer.Argument(..., help="coco or ade20k-sceneparsing"),
    split: Optional[str] = typer.Option(None, "--split", help="coco: val2017 (default) or train2017."),
    data_root: Optional[Path] = DataRootOption,
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the published SHA-1 of each archive."),
) -> None:
    """Download (resumable) and extract a dataset with public direct URLs into the data root."""
    from camloc.datasets import data_root as resolve_root
    from camloc.datasets.download import fetch_dataset

    root = resolve_root(data_root)
    for path in fetch_dataset(dataset, root, split, verify=verify):
        typer.echo(f"{path.name}: ready (sha256 in {path.name}.sha256), extracted into {root}")


@data_app.command("verify")
@reports_errors
def verify_cmd(
    dataset: str = typer.Argument(..., help="A dataset name (see `camloc list datasets`)."),
    split: Optional[str] = SplitOption,
    data_root: Optional[Path] = DataRootOption,
    ann_file: Optional[Path] = AnnFileOption,
    image_dir: Optional[Path] = ImageDirOption,
    include_stuff: bool = IncludeStuffOption,
    ade_extent: Optional[str] = AdeExtentOption,
) -> None:
    """Check a dataset's layout: count images, pairs and missing image files; say how to obtain it."""
    from camloc.datasets import DATASETS, count_pairs, list_datasets, load_dataset
    from camloc.errors import CamlocError, DataError, OptionError
    from camloc.run.finish import mean_coverage

    if dataset not in list_datasets():
        raise OptionError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    typer.echo(f"{dataset}: expected layout: {spec.layout}")
    try:
        images = load_dataset(dataset, data_root_dir=data_root, split=split, ann_file=ann_file, image_dir=image_dir,
                              include_stuff=include_stuff, ade_extent=ade_extent or "visible")
    except CamlocError as exc:
        raise type(exc)(f"{exc}. To obtain {dataset}: {spec.obtain}") from None
    missing = [item.path for item in images if not Path(item.path).is_file()]
    coverage = mean_coverage(images)
    typer.echo(f"images {len(images)}, pairs {count_pairs(images)}, missing image files {len(missing)}"
               + (f", mean class coverage {coverage:.1%}" if coverage is not None else ""))
    for path in missing[:5]:
        typer.echo(f"  missing: {path}")
    if spec.note:
        typer.echo(spec.note(images))
    if missing:
        raise DataError(f"{len(missing)} image files of {dataset} are missing. To obtain {dataset}: {spec.obtain}")
    typer.echo("ok")
