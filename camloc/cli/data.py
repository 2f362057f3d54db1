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
    dataset: str = typer.Argument(..., help="coco, ade20k-sceneparsing, voc2012 (VOC2012 trainval: the voc21 and voc20 segmentation datasets), imagenet-s50, imagenet-s300, imagenet-s919 (masks only) or openimages-v7-points."),
    split: Optional[str] = typer.Option(None, "--split", help="coco: val2017 (default) or train2017."),
    data_root: Optional[Path] = DataRootOption,
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the published SHA-1 of each archive."),
    limit: Optional[int] = typer.Option(None, "--limit", help="openimages-v7-points: fetch the images of the first N annotated image ids (sorted) instead of all."),
) -> None:
    """Download (resumable) and extract a dataset with public direct URLs into the data root."""
    from camloc.datasets import data_root as resolve_root
    from camloc.datasets.download import fetch_dataset, fetch_openimages_points
    from camloc.errors import OptionError

    root = resolve_root(data_root)
    if dataset == "openimages-v7-points":
        fetched, wanted = fetch_openimages_points(root, limit)
        typer.echo(f"openimages-v7-points: point labels and class names in {root / 'openimages-v7'}; {wanted} images "
                   f"wanted, {fetched} fetched now, all in {root / 'openimages-v7' / 'validation'}")
        return
    if limit is not None:
        raise OptionError("--limit is for openimages-v7-points; the other datasets download as whole archives")
    for path in fetch_dataset(dataset, root, split, verify=verify):
        typer.echo(f"{path.name}: ready (sha256 in {path.name}.sha256), extracted into {root}")


DOWNLOAD_VERIFIES = {"voc2012": ("voc21", "voc20"), "ade20k-sceneparsing": ("ade20k-150",)}
"""`camloc data download` names that are not dataset names: `data verify` checks the datasets they give."""


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
    seg_reduce_zero_label: bool = typer.Option(False, "--seg-reduce-zero-label", help="seg-folder: label 0 ignored, the others lowered by 1."),
    seg_ignore_index: Optional[int] = typer.Option(None, "--seg-ignore-index", help="seg-folder: this label value is ignored."),
) -> None:
    """Check a dataset's layout: count images, pairs and missing image files; say how to obtain it."""
    from camloc.datasets import DATASETS, count_pairs, list_datasets, load_dataset
    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.errors import CamlocError, DataError, OptionError
    from camloc.run.finish import mean_coverage

    if dataset in DOWNLOAD_VERIFIES:  # the name `camloc data download` takes: verify what it gave
        for name in DOWNLOAD_VERIFIES[dataset]:
            typer.echo(f"{dataset} -> {name}")
            verify_cmd(name, split, data_root, ann_file, image_dir, include_stuff, ade_extent, seg_reduce_zero_label,
                       seg_ignore_index)
        return
    if dataset in SEG_DATASETS:
        folder = {k: v for k, v in (("reduce_zero_label", seg_reduce_zero_label), ("ignore_index", seg_ignore_index))
                  if v not in (None, False)}
        return _verify_segmentation(dataset, split, data_root, ann_file, image_dir, folder)
    if dataset not in list_datasets():
        raise OptionError(f"unknown dataset {dataset!r}; valid datasets: {', '.join([*DATASETS, *SEG_DATASETS])}")
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


def _verify_segmentation(dataset, split, data_root, ann_file, image_dir, folder: dict | None = None) -> None:
    """A segmentation dataset (`--protocols ovseg`): images, label maps present, and each label map's values
    within the dataset's classes or its ignore index and of its image's size (the first 20 read)."""
    import numpy as np

    from camloc.datasets.segmentation import SEG_DATASETS, load_seg_dataset
    from camloc.errors import DataError

    typer.echo(f"{dataset}: expected layout: {SEG_DATASETS[dataset].layout}")
    spec, images = load_seg_dataset(dataset, data_root=data_root, split=split, image_dir=image_dir, ann_file=ann_file,
                                    **(folder or {}))
    missing = [item.path for item in images if not Path(item.path).is_file()]
    no_label = [item.label_path for item in images if item.label_path and not Path(item.label_path).is_file()]
    n_classes = len(spec.classes())
    typer.echo(f"images {len(images)}, classes {n_classes}, missing image files {len(missing)}, missing label maps "
               f"{len(no_label)}")
    for path in (missing + no_label)[:5]:
        typer.echo(f"  missing: {path}")
    if missing or no_label:
        raise DataError(f"{len(missing)} image files and {len(no_label)} label maps of {dataset} are missing")
    from camloc.models.preprocess import image_size

    for item in images[:20]:
        label = item.label()
        width, height = image_size(Path(item.path))
        if label.shape[:2] != (height, width):
            raise DataError(f"label map {item.label_path or item.image_id} is {label.shape[1]}x{label.shape[0]}, but "
                            f"its image {item.path} is {width}x{height}: they do not belong together")
        values = np.unique(label)
        bad = values[(values >= n_classes) & (values != spec.ignore_index)]
        if bad.size:
            raise DataError(f"label map {item.label_path or item.image_id} holds values {bad.tolist()[:5]} outside "
                            f"0..{n_classes - 1} and {spec.ignore_index}: is it the {dataset} conversion camloc "
                            f"expects ({spec.layout})?")
    typer.echo("ok")
