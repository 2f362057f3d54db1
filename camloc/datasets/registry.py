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

from camloc.datasets.records import ImagePairs, sanitize_boxes
from camloc.errors import CamlocError

DEMO_DIR = Path(__file__).parent / "demo"
DATA_ENV = "CAMLOC_DATA"


@dataclass(frozen=True)
class DataOptions:
    root: Path
    split: str | None = None
    ann_file: Path | None = None
    image_dir: Path | None = None
    prompt_template: str = "{}"
    per_class: int = 100
    subset_seed: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Callable[[DataOptions], list[ImagePairs]]
    description: str
    layout: str
    """The expected files under the data root (README and `camloc data verify`)."""
    obtain: str
    """How to get the data."""
    default_split: str | None = None
    """The split read when none is given (also what a heatmap cache keys it by)."""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, description: str, layout: str = "", obtain: str = "",
                     default_split: str | None = None) -> Callable:
    def decorate(fn: Callable) -> Callable:
        DATASETS[name] = DatasetSpec(name, fn, description, layout, obtain, default_split)
        return fn

    return decorate


def resolved_split(name: str, split: str | None) -> str | None:
    """`split`, or the dataset's default when none is given (`coco` -> val2017)."""
    _load_builtin_datasets()
    spec = DATASETS.get(name)
    return split or (spec.default_split if spec else None)


def data_root(value: str | Path | None = None) -> Path:
    return Path(value or os.environ.get(DATA_ENV) or "data")


@register_dataset("demo", "6 public-domain/CC0 photos shipped with camloc, hand-drawn COCO-format boxes",
                  layout="inside the package: camloc/datasets/demo/", obtain="ships with camloc")
def demo(opts: DataOptions) -> list[ImagePairs]:
    from camloc.datasets.coco_format import load_coco_pairs

    return load_coco_pairs(opts.ann_file or DEMO_DIR / "instances_demo.json", opts.image_dir or DEMO_DIR / "images",
                           opts.prompt_template)


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
    issues: dict | None = None,
) -> list[ImagePairs]:
    """A dataset's image-grouped pairs. `classes` keeps those category names; `limit` keeps N images:
    the first N in the dataset's stable order, or a random N drawn with `subset_seed`. Ground truth
    outside the image is clipped or dropped (`sanitize_boxes`); pass a dict as `issues` to get the
    counts."""
    _load_builtin_datasets()
    spec = DATASETS.get(name)
    if spec is None:
        raise CamlocError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if "{}" not in prompt_template:
        raise CamlocError(f"--prompt-template {prompt_template!r} must contain {{}} where the class name goes")
    if per_class < 1:
        raise CamlocError(f"--per-class must be at least 1, got {per_class}")
    opts = DataOptions(root=data_root(data_root_dir), split=split or spec.default_split, ann_file=Path(ann_file) if ann_file else None,
                       image_dir=Path(image_dir) if image_dir else None, prompt_template=prompt_template,
                       per_class=per_class, subset_seed=subset_seed)
    images, counts = sanitize_boxes(spec.build(opts))
    if issues is not None:
        issues.update(counts)
    if classes:
        known = {p.category for item in images for p in item.pairs}
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise CamlocError(f"--classes: {', '.join(unknown)} not in dataset {name}; it has {', '.join(sorted(known))}")
        wanted = set(classes)
        images = [ImagePairs(item.path, item.image_id, [p for p in item.pairs if p.category in wanted])
                  for item in images]
        images = [item for item in images if item.pairs]
    if limit is not None:
        if limit < 1:
            raise CamlocError(f"--limit must be at least 1, got {limit}")
        if subset_seed is not None and limit < len(images):
            keep = np.sort(np.random.default_rng(subset_seed).choice(len(images), size=limit, replace=False))
            images = [images[i] for i in keep]
        else:
            images = images[:limit]
    return images


def _load_builtin_datasets() -> None:
    import camloc.datasets.ade20k  # noqa: F401
    import camloc.datasets.coco  # noqa: F401
    import camloc.datasets.partimagenet  # noqa: F401
