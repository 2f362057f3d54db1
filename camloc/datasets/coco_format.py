"""Pairs from a COCO-format instances file (pycocotools): every (image, category) with at least one
non-crowd annotation; its non-crowd boxes, converted from [x, y, w, h] to [x1, y1, x2, y2] (spec §5-6).
Used by COCO, PartImageNet and the demo set."""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from camloc.datasets.records import ImagePairs, Pair
from camloc.errors import CamlocError


def open_coco(ann_file: str | Path, option: str = "--ann-file"):
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise CamlocError(f"annotation file {ann_file} does not exist; pass {option} or fix --data-root "
                          "(see `camloc data verify`)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CamlocError(f"annotation file {ann_file} is not a COCO instances JSON ({type(exc).__name__}: {exc})") from exc


def coverage_of(coco, anns: list[dict], height: int, width: int) -> float | None:
    """Fraction of the image covered by the union of these annotations' masks (None without masks)."""
    union = None
    for ann in anns:
        if not ann.get("segmentation"):
            return None
        mask = coco.annToMask(ann)
        union = mask if union is None else np.maximum(union, mask)
    return float(union.sum()) / (height * width) if union is not None else None


def pairs_of_image(coco, image_id: int, names: dict[int, str], prompt_template: str,
                   categories: set[int] | None = None, with_coverage: bool = True) -> list[Pair]:
    info = coco.loadImgs(image_id)[0]
    anns_by_cat: dict[int, list[dict]] = defaultdict(list)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
        if categories is None or ann["category_id"] in categories:
            anns_by_cat[ann["category_id"]].append(ann)
    width, height = int(info["width"]), int(info["height"])
    pairs = []
    for cat in sorted(anns_by_cat):
        anns = anns_by_cat[cat]
        pairs.append(Pair(
            image_id=image_id,
            file_name=info["file_name"],
            image_size=(width, height),
            category_id=cat,
            category=names[cat],
            prompt=prompt_template.format(names[cat]),
            gt_boxes=[[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            coverage=coverage_of(coco, anns, height, width) if with_coverage else None,
        ))
    return pairs


def load_coco_pairs(ann_file: str | Path, image_dir: str | Path, prompt_template: str = "{}", **kwargs) -> list[ImagePairs]:
    """`coco_pairs` of an annotation file."""
    return coco_pairs(open_coco(ann_file), image_dir, prompt_template, **kwargs)


def coco_pairs(
    coco,
    image_dir: str | Path,
    prompt_template: str = "{}",
    image_path: Callable[[Path, dict], Path] | None = None,
    image_ids: list[int] | None = None,
    categories_per_image: dict[int, set[int]] | None = None,
) -> list[ImagePairs]:
    """Image-grouped pairs of a COCO-format file. `image_path(image_dir, image_info)` locates files
    (default `image_dir / file_name`); `image_ids` and `categories_per_image` restrict the pairs."""
    image_dir = Path(image_dir)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    locate = image_path or (lambda folder, info: folder / info["file_name"])
    root = image_dir.resolve()
    images = []
    for image_id in image_ids if image_ids is not None else sorted(coco.getImgIds()):
        cats = categories_per_image.get(image_id) if categories_per_image is not None else None
        pairs = pairs_of_image(coco, image_id, names, prompt_template, cats)
        if pairs:
            info = coco.loadImgs(image_id)[0]
            path = locate(image_dir, info)
            if not path.resolve().is_relative_to(root):
                raise CamlocError(f"annotation file_name {info['file_name']!r} (image {image_id}) points outside the "
                                  f"image folder {image_dir}; refusing it")
            images.append(ImagePairs(path=str(path), image_id=image_id, pairs=pairs))
    return images
