"""Pairs from a COCO-format instances file (pycocotools): every (image, category) with at least one
non-crowd annotation; its non-crowd boxes, converted from [x, y, w, h] to [x1, y1, x2, y2] (spec §5-6)."""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path

from camloc.datasets.records import ImagePairs, Pair
from camloc.errors import CamlocError


def load_coco_pairs(
    ann_file: str | Path,
    image_dir: str | Path,
    prompt_template: str = "{}",
) -> list[ImagePairs]:
    from pycocotools.coco import COCO

    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise CamlocError(f"annotation file {ann_file} does not exist; pass --ann-file or fix --data-root")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CamlocError(f"annotation file {ann_file} is not a COCO instances JSON ({type(exc).__name__}: {exc})") from exc
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    images = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        boxes: dict[int, list[list[float]]] = defaultdict(list)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, w, h = ann["bbox"]
            boxes[ann["category_id"]].append([x, y, x + w, y + h])
        pairs = [
            Pair(
                image_id=image_id,
                file_name=info["file_name"],
                image_size=(int(info["width"]), int(info["height"])),
                category_id=cat,
                category=names[cat],
                prompt=prompt_template.format(names[cat]),
                gt_boxes=boxes[cat],
            )
            for cat in sorted(boxes)
        ]
        if pairs:
            images.append(ImagePairs(path=str(image_dir / info["file_name"]), image_id=image_id, pairs=pairs))
    return images
