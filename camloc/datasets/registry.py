"""Dataset registry: `@register_dataset("name", ...)` builders that return a list of `ImagePairs`.

Every dataset reads its official layout under the data root (`--data-root`, else `$CAMLOC_DATA`,
else `./data`), each archive extracted there as it unpacks; `--ann-file` / `--image-dir` override.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from camloc.datasets.records import FAULT_COUNTS, ImagePairs, sanitize_boxes
from camloc.errors import DataError, OptionError

DEMO_DIR = Path(__file__).parent / "demo"
DATA_ENV = "CAMLOC_DATA"
DATA_SOURCES = {"data_root": "--data-root", "split": "--split", "ann_file": "--ann-file", "image_dir": "--image-dir"}
"""Where a run's data was read from (recorded in its config.json), and the option that sets each."""


@dataclass(frozen=True)
class DataOptions:
    root: Path
    split: str | None = None
    ann_file: Path | None = None
    image_dir: Path | None = None
    prompt_template: str = "{}"
    per_class: int = 100
    subset_seed: int | None = None
    include_stuff: bool = False
    """COCO: keep stuff categories (panoptic files' ids > 90 / isthing 0), refused by default."""
    ade_extent: str = "visible"
    """ADE20K full release: ground truth from the visible pixels (`_seg.png`) or the amodal polygons."""
    stats: dict | None = None
    """Filled by the builder with what it read (annotations, crowd, ...), to explain an empty result."""
    sources: dict | None = None
    """Filled by the builder (`reads`) with the annotation file and image folder it read."""

    def reads(self, ann_file: Path | None = None, image_dir: Path | None = None) -> None:
        """Record the annotation file and image folder this build reads (absolute paths)."""
        if self.sources is not None:
            self.sources.update({"ann_file": _absolute(ann_file), "image_dir": _absolute(image_dir)})


def _absolute(path: Path | None) -> str | None:
    return None if path is None else os.path.abspath(path)  # links not followed, as data_identity's image_root


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Callable[[DataOptions], list[ImagePairs]]
    description: str
    layout: str
    """The expected files under the data root (docs/datasets.md and `camloc data verify`)."""
    obtain: str
    """How to get the data."""
    default_split: str | None = None
    """The split read when none is given (also what a heatmap cache keys it by)."""
    folders: tuple[str, ...] = ()
    """The dataset's own top folders under the data root: a --data-root naming one is taken as its parent."""
    note: Callable[[list[ImagePairs]], str] | None = None
    """`camloc data verify`: a line about what was found (e.g. which release or split it is)."""
    origin: dict | None = None
    """Where a dataset from a plug-in comes from (`camloc.plugins.origin_of`); None for camloc's own."""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, description: str, layout: str = "", obtain: str = "",
                     default_split: str | None = None, folders: tuple[str, ...] = (),
                     note: Callable[[list[ImagePairs]], str] | None = None) -> Callable:
    def decorate(fn: Callable) -> Callable:
        from camloc.datasets.segmentation import SEG_DATASETS

        if name in DATASETS or name in SEG_DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        from camloc.plugins import origin_of

        DATASETS[name] = DatasetSpec(name, fn, description, layout, obtain, default_split, folders, note,
                                     origin_of(fn))
        return fn

    return decorate


NAMED_BY_SOURCE = {"coco-format", "seg-folder"}
"""Datasets of one's own: their identity records the annotation file's or folder's name (`data["name"]`), and
tables show it, as `coco-format:instances_mine.json`."""


def dataset_label(dataset: str, data: dict | None) -> str:
    """The dataset's name in tables: its registered name, with the file or folder of a dataset of one's own."""
    name = (data or {}).get("name") if dataset in NAMED_BY_SOURCE else None
    return f"{dataset}:{name}" if name else dataset


def resolved_split(name: str, split: str | None) -> str | None:
    """`split`, or the dataset's default when none is given (`coco` -> val2017)."""
    _load_builtin_datasets()
    spec = DATASETS.get(name)
    return split or (spec.default_split if spec else None)


def data_root(value: str | Path | None = None) -> Path:
    return Path(value or os.environ.get(DATA_ENV) or "data")


def check_prompt_template(template: str) -> None:
    """A template takes the class name exactly once, in a bare `{}` (no other format fields)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OptionError(f"--prompt-template {template!r} is not a valid template ({exc}); write {{{{ and }}}} "
                          "for literal braces") from None
    if fields != [""]:
        raise OptionError(f"--prompt-template {template!r} must contain exactly one {{}} where the class name goes "
                          f"(found {len(fields)} field(s){': ' + ', '.join(repr('{' + f + '}') for f in fields if f) if any(fields) else ''}); "
                          "write {{ and }} for literal braces")


def check_unique_images(images: list[ImagePairs], name: str) -> None:
    """Two images with one id would be scored against each other's boxes: refuse."""
    seen: dict[str, str] = {}
    for item in images:
        key = str(item.image_id)
        if key in seen:
            raise DataError(f"dataset {name}: image id {item.image_id!r} is used by two images ({seen[key]} and "
                            f"{item.path}); image ids must be unique")
        seen[key] = item.path


def _empty_reason(name: str, stats: dict, counts: dict, classes) -> str:
    """Why a dataset gave no pairs, from what the builder read."""
    source = stats.get("source", name)
    if stats.get("images") == 0:
        return f"{source} lists no images"
    if stats.get("annotations") == 0:
        return f"{source} has no annotations"
    if stats.get("annotations") and stats.get("crowd") == stats.get("annotations"):
        return f"all {stats['annotations']} annotations of {source} are crowd regions (iscrowd 1), which are not scored"
    if stats.get("images_not_found") and stats.get("images_not_found") == stats.get("images"):
        return f"none of the {stats['images']} annotated images is in the image folder (not downloaded?)"
    if counts.get("skipped_pairs"):
        return f"every pair's ground truth was empty or outside its image ({counts['dropped_boxes']} boxes dropped)"
    if classes:
        return f"no image has any of the --classes {', '.join(classes)}"
    return f"{source} has no (image, class) pair with a box"


@register_dataset("demo", "10 public-domain/CC0 images shipped with camloc: 13 pairs, boxes and masks checked by eye",
                  layout="inside the package: camloc/datasets/demo/", obtain="ships with camloc")
def demo(opts: DataOptions) -> list[ImagePairs]:
    from camloc.datasets.coco_format import load_coco_pairs

    ann, images = opts.ann_file or DEMO_DIR / "instances_demo.json", opts.image_dir or DEMO_DIR / "images"
    opts.reads(ann, images)
    return load_coco_pairs(ann, images, opts.prompt_template, stats=opts.stats)


def list_datasets() -> list[str]:
    _load_builtin_datasets()
    return list(DATASETS)


def load_dataset(
    name: str,
    *,
    limit: int | None = None,
    classes: list[str] | None = None,
    prompt_template: str = "{}",
    subset_seed: int | None = None,
    data_root_dir: str | Path | None = None,
    split: str | None = None,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    per_class: int = 100,
    include_stuff: bool = False,
    ade_extent: str = "visible",
    issues: dict | None = None,
    sources: dict | None = None,
) -> list[ImagePairs]:
    """A dataset's image-grouped pairs. `classes` keeps those category names; `limit` keeps N images:
    the first N in the dataset's stable order, or a random N drawn with `subset_seed`. Ground truth
    outside the image is clipped or dropped (`sanitize_boxes`); pass a dict as `issues` to get the
    counts, and one as `sources` to get where the data was read from (`DATA_SOURCES`: the data root,
    the split, the annotation file and the image folder, absolute; None where the dataset has none)."""
    _load_builtin_datasets()
    spec = DATASETS.get(name)
    if spec is None:
        from camloc.datasets.segmentation import SEG_DATASETS

        if name in SEG_DATASETS:
            raise DataError(f"{name} is a segmentation dataset: run it with --protocols ovseg (the pair protocols "
                            f"read {', '.join(DATASETS)})")
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)} (and, with --protocols "
                        f"ovseg, {', '.join(SEG_DATASETS)})")
    check_prompt_template(prompt_template)
    if per_class < 1:
        raise OptionError(f"--per-class must be at least 1, got {per_class}")
    if subset_seed is not None and subset_seed < 0:
        raise OptionError(f"--subset-seed must be 0 or more, got {subset_seed}")
    if ade_extent not in ("visible", "amodal"):
        raise OptionError(f"--ade-extent {ade_extent!r} is not one of visible, amodal")
    root = data_root(data_root_dir)
    if root.name in spec.folders and not any((root / f).is_dir() for f in spec.folders):
        root = root.parent  # --data-root names the dataset's own folder: its parent is the data root
    stats: dict = {}
    read: dict = {"data_root": _absolute(root), "split": split or spec.default_split, "ann_file": None,
                  "image_dir": None}
    opts = DataOptions(root=root, split=split or spec.default_split, ann_file=Path(ann_file) if ann_file else None,
                       image_dir=Path(image_dir) if image_dir else None, prompt_template=prompt_template,
                       per_class=per_class, subset_seed=subset_seed, include_stuff=include_stuff,
                       ade_extent=ade_extent, stats=stats, sources=read)
    images, counts = sanitize_boxes(spec.build(opts))
    if sources is not None:
        sources.update(read)
    check_unique_images(images, name)
    counts.update({k: v for k, v in stats.items() if k in FAULT_COUNTS})
    if issues is not None:
        issues.update(counts)
    if classes:
        known = {p.category for item in images for p in item.pairs}
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise OptionError(f"--classes: {', '.join(unknown)} not in dataset {name}; it has {', '.join(sorted(known))}")
        wanted = set(classes)
        images = [item.with_pairs([p for p in item.pairs if p.category in wanted]) for item in images]
        images = [item for item in images if item.pairs]
    if limit is not None:
        if limit < 1:
            raise OptionError(f"--limit must be at least 1, got {limit}")
        if subset_seed is not None and limit < len(images):
            keep = np.sort(np.random.default_rng(subset_seed).choice(len(images), size=limit, replace=False))
            images = [images[i] for i in keep]
        else:
            images = images[:limit]
    if not any(item.pairs for item in images):
        raise DataError(f"dataset {name} gives 0 (image, class) pairs: {_empty_reason(name, stats, counts, classes)}; "
                        "nothing to evaluate")
    return images


def _load_builtin_datasets() -> None:
    import camloc.datasets.ade20k  # noqa: F401
    import camloc.datasets.coco  # noqa: F401
    import camloc.datasets.explainseg  # noqa: F401
    import camloc.datasets.openimages  # noqa: F401
    import camloc.datasets.partimagenet  # noqa: F401
