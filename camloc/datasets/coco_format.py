"""Pairs from a COCO-format instances file (pycocotools): every (image, category) with at least one
non-crowd annotation; its non-crowd boxes, converted from [x, y, w, h] to [x1, y1, x2, y2] (docs/protocol.md §5-6).
Used by COCO, PartImageNet and the demo set.

The file is checked before pycocotools indexes it, so a malformed file is one error naming the file
and the field, never a traceback or a silently wrong pair: integer, unique image ids; positive
integer width/height; known category ids; bboxes of four finite numbers. Real releases differ from
the format's idea in two known ways, handled here: annotations without `iscrowd` (PartImageNet) are
non-crowd, and polygons with fewer than three points (PartImageNet's val.json, TACJu/PartImageNet
issue #7) are skipped for coverage and counted (`degenerate_polygons`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from camloc.datasets.records import ImagePairs, Pair
from camloc.errors import DataError

COCO_THING_MAX_ID = 90
"""COCO's 80 thing categories use ids 1..90; panoptic "detection format" files add 53 stuff ids above."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_coco_dict(data, ann_file: Path, refuse_stuff: bool = False) -> dict:
    """Validate a COCO instances dict (see the module docstring); fills a missing `iscrowd` with 0.
    `refuse_stuff`: stuff categories (isthing 0, or ids above 90) are an error (COCO's panoptic
    detection JSON), since they would silently become prompts."""
    where = f"annotation file {ann_file}"
    if not isinstance(data, dict):
        raise DataError(f"{where} holds a JSON {type(data).__name__}, not a COCO object with images, annotations "
                        "and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{where} has no '{key}' list; pass a COCO instances JSON")
    categories = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{where}: categories[{i}] needs an integer 'id' and a string 'name'")
        categories[cat["id"]] = cat
    stuff = [c for c in categories.values() if c.get("isthing") == 0 or (refuse_stuff and c["id"] > COCO_THING_MAX_ID)]
    if refuse_stuff and stuff:
        names = ", ".join(str(c["name"]) for c in stuff[:3])
        raise DataError(f"{where} has {len(stuff)} stuff categories ({names}, ...; ids above {COCO_THING_MAX_ID} or "
                        "isthing 0, as in COCO's panoptic detection JSON): they are not COCO's 80 object classes; "
                        "pass --include-stuff to evaluate them too, or use instances_<split>.json")
    images = set()
    for i, info in enumerate(data["images"]):
        image_id = info.get("id") if isinstance(info, dict) else None
        if not _is_int(image_id):
            raise DataError(f"{where}: images[{i}] has id {image_id!r}; COCO image ids must be integers")
        if image_id in images:
            raise DataError(f"{where}: image id {image_id} appears twice in 'images'; image ids must be unique "
                            "(otherwise an image is scored against another image's boxes)")
        images.add(image_id)
        for key in ("width", "height"):
            if not _is_int(info.get(key)) or info[key] < 1:
                raise DataError(f"{where}: image {image_id} has {key} {info.get(key)!r}; it must be a positive "
                                "integer (the size of the image file)")
        if not isinstance(info.get("file_name"), str) or not info["file_name"]:
            raise DataError(f"{where}: image {image_id} has no 'file_name'")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{where}: annotations[{i}] is not an object")
        label = f"annotation {ann.get('id', f'#{i}')}"
        if ann.get("image_id") not in images or not _is_int(ann.get("image_id")):
            raise DataError(f"{where}: {label} has image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in categories or not _is_int(ann.get("category_id")):
            raise DataError(f"{where}: {label} has category_id {ann.get('category_id')!r}, which is not in "
                            "'categories'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(f"{where}: {label} has bbox {bbox!r}; it must be [x, y, width, height], four finite "
                            "numbers")
        ann.setdefault("iscrowd", 0)  # PartImageNet's JSON has no iscrowd: its annotations are not crowd regions
    return data


def open_coco(ann_file: str | Path, option: str = "--ann-file", refuse_stuff: bool = False, stats: dict | None = None):
    """A checked pycocotools `COCO` index of a COCO-format file (`check_coco_dict`)."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist; pass {option} or fix --data-root "
                        "(see `camloc data verify`)")
    try:
        data = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {ann_file} is not a COCO instances JSON ({type(exc).__name__}: {exc})") from exc
    check_coco_dict(data, ann_file, refuse_stuff)
    if stats is not None:
        stats.update(source=f"annotation file {ann_file}", images=len(data["images"]),
                     annotations=len(data["annotations"]), crowd=sum(bool(a["iscrowd"]) for a in data["annotations"]))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def union_mask(coco, anns: list[dict], height: int, width: int, stats: dict | None = None) -> np.ndarray | None:
    """The union of these annotations' masks (None without masks). Polygons with fewer than three
    points cannot be rasterised (pycocotools raises on them): they are skipped and counted in
    `stats["degenerate_polygons"]`."""
    from pycocotools import mask as mask_utils

    union = None
    for ann in anns:
        seg = ann.get("segmentation")
        if not seg:
            return None
        if isinstance(seg, list):
            polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6]
            if stats is not None and len(polygons) < len(seg):
                stats["degenerate_polygons"] = stats.get("degenerate_polygons", 0) + len(seg) - len(polygons)
            if not polygons:
                mask = np.zeros((height, width), np.uint8)
            else:
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
        else:
            mask = coco.annToMask(ann)
        union = mask if union is None else np.maximum(union, mask)
    return union


def coverage_of(coco, anns: list[dict], height: int, width: int, stats: dict | None = None) -> float | None:
    """Fraction of the image covered by the union of these annotations' masks (None without masks)."""
    union = union_mask(coco, anns, height, width, stats)
    return float(union.sum()) / (height * width) if union is not None else None


def pairs_of_image(coco, image_id: int, names: dict[int, str], prompt_template: str,
                   categories: set[int] | None = None, with_coverage: bool = True,
                   stats: dict | None = None) -> list[Pair]:
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
            coverage=coverage_of(coco, anns, height, width, stats) if with_coverage else None,
        ))
    return pairs


def image_masks(coco, image_id: int, category_ids: frozenset, height: int, width: int) -> dict:
    """{category id: the union of its non-crowd annotations' masks (bool), or None without masks}."""
    by_cat: dict[int, list[dict]] = defaultdict(list)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
        if ann["category_id"] in category_ids:
            by_cat[ann["category_id"]].append(ann)
    out = {}
    for cat in category_ids:
        union = union_mask(coco, by_cat[cat], height, width) if by_cat[cat] else None
        out[cat] = None if union is None else union.astype(bool)
    return out


def load_coco_pairs(ann_file: str | Path, image_dir: str | Path, prompt_template: str = "{}",
                    refuse_stuff: bool = False, stats: dict | None = None, **kwargs) -> list[ImagePairs]:
    """`coco_pairs` of an annotation file."""
    return coco_pairs(open_coco(ann_file, refuse_stuff=refuse_stuff, stats=stats), image_dir, prompt_template,
                      stats=stats, **kwargs)


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder` by its own name (`..` resolved lexically, symbolic links NOT
    followed: a dataset folder may hold links to files kept elsewhere)."""
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(folder)))


def coco_pairs(
    coco,
    image_dir: str | Path,
    prompt_template: str = "{}",
    image_path: Callable[[Path, dict], Path] | None = None,
    image_ids: list[int] | None = None,
    categories_per_image: dict[int, set[int]] | None = None,
    stats: dict | None = None,
) -> list[ImagePairs]:
    """Image-grouped pairs of a COCO-format file. `image_path(image_dir, image_info)` locates files
    (default `image_dir / file_name`); `image_ids` and `categories_per_image` restrict the pairs."""
    image_dir = Path(image_dir)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    locate = image_path or (lambda folder, info: folder / info["file_name"])
    images = []
    for image_id in image_ids if image_ids is not None else sorted(coco.getImgIds()):
        cats = categories_per_image.get(image_id) if categories_per_image is not None else None
        pairs = pairs_of_image(coco, image_id, names, prompt_template, cats, stats=stats)
        if pairs:
            info = coco.loadImgs(image_id)[0]
            path = locate(image_dir, info)
            if not inside(path, image_dir):
                raise DataError(f"annotation file_name {info['file_name']!r} (image {image_id}) points outside the "
                                f"image folder {image_dir}; refusing it")
            masks = functools.partial(image_masks, coco, image_id, frozenset(p.category_id for p in pairs),
                                      int(info["height"]), int(info["width"]))
            images.append(ImagePairs(path=str(path), image_id=image_id, pairs=pairs, masks=masks))
    return images
