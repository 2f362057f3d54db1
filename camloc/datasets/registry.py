"""Dataset registry: `@register_dataset("name")` builders that return a list of `ImagePairs`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from camloc.datasets.records import ImagePairs
from camloc.errors import CamlocError

DEMO_DIR = Path(__file__).parent / "demo"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Callable[..., list[ImagePairs]]
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, description: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        DATASETS[name] = DatasetSpec(name, fn, description)
        return fn

    return decorate


@register_dataset("demo", "6 public-domain/CC0 photos shipped with camloc, hand-drawn COCO-format boxes")
def demo(prompt_template: str = "{}", **_) -> list[ImagePairs]:
    from camloc.datasets.coco_format import load_coco_pairs

    return load_coco_pairs(DEMO_DIR / "instances_demo.json", DEMO_DIR / "images", prompt_template)


def list_datasets() -> list[str]:
    return list(DATASETS)


def load_dataset(
    name: str,
    *,
    limit: int | None = None,
    classes: list[str] | None = None,
    prompt_template: str = "{}",
    **options,
) -> list[ImagePairs]:
    """Build a dataset's image-grouped pairs; `classes` keeps only those category names, `limit` the
    first N images (in the dataset's stable order)."""
    spec = DATASETS.get(name)
    if spec is None:
        raise CamlocError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if "{}" not in prompt_template:
        raise CamlocError(f"--prompt-template {prompt_template!r} must contain {{}} where the class name goes")
    images = spec.build(prompt_template=prompt_template, **options)
    if classes:
        known = {p.category for item in images for p in item.pairs}
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise CamlocError(f"--classes: {', '.join(unknown)} not in dataset {name}; it has {', '.join(sorted(known))}")
        wanted = set(classes)
        images = [
            ImagePairs(item.path, item.image_id, [p for p in item.pairs if p.category in wanted]) for item in images
        ]
        images = [item for item in images if item.pairs]
    if limit is not None:
        if limit < 1:
            raise CamlocError(f"--limit must be at least 1, got {limit}")
        images = images[:limit]
    return images
