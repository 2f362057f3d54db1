"""The pair record every dataset yields (docs/protocol.md §5: one pair = an image and a class present in it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable


@dataclass(frozen=True)
class Pair:
    image_id: int | str
    file_name: str
    """Path of the image file (absolute, or relative to the dataset's image folder when recorded)."""
    image_size: tuple[int, int]
    """(W, H) of the raw image."""
    category_id: int
    category: str
    prompt: str
    gt_boxes: list[list[float]] = field(default_factory=list)
    """Ground-truth boxes [x1, y1, x2, y2] of this class in this image."""
    coverage: float | None = None
    """Fraction of the image the class covers (union of its instances), when the dataset has masks."""
    points: list[list[float]] | None = None
    """Point labels of this class in this image, `[x, y, yes]` in pixels of the raw image (yes = 1: the class is
    there, 0: it is not), for the `points` protocol; None for datasets without points. A pair with points may have
    no boxes: its box IoU is then not scored (`iou` None)."""

    @property
    def key(self) -> tuple[str, int]:
        return (str(self.image_id), int(self.category_id))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


@dataclass(frozen=True)
class ImagePairs:
    """One image's pairs, processed together so the engine can share the image-side work."""

    path: str
    image_id: int | str
    pairs: list[Pair]
    masks: Callable[[], dict] | None = field(default=None, compare=False, repr=False)
    """Lazily, the class masks of this image at its raw size: {category id: bool (H, W) array, or None
    where the dataset has no mask for that class}. None when the dataset has no masks at all. Never
    stored in the records: protocols that need masks call it once per image."""
    labels: Callable[[], tuple] | None = field(default=None, compare=False, repr=False)
    """Lazily, the image's label map and number of classes, `(int (H, W) array of class ids 0..K with 1000
    ignored, K)`, for the `imagenet-s` protocol; None for datasets without one."""

    def with_pairs(self, pairs: list[Pair]) -> "ImagePairs":
        return replace(self, pairs=pairs)


FAULT_COUNTS = ("degenerate_polygons", "occluded_instances", "images_without_their_class", "images_not_found")
"""Counts a dataset builder may report (besides `sanitize_boxes`'), shown in the run's faults."""


def data_identity(images: list[ImagePairs]) -> dict:
    """What a run's pairs are, for its identity: the folder holding the images (absolute, links not
    followed), a SHA-256 over every pair's image, size, class, prompt and ground truth (so another
    annotation file, data root or filter can never resume or merge with these records), and counts."""
    import hashlib
    import json
    import os

    digest = hashlib.sha256()
    for item in images:
        for p in item.pairs:
            fields = [str(p.image_id), p.file_name, list(p.image_size), p.category_id, p.category, p.prompt,
                      p.gt_boxes, p.coverage]
            if p.points is not None:  # only then: the hashes of datasets without points stay as they were
                fields.append(p.points)
            digest.update(json.dumps(fields).encode() + b"\n")
    folders = [os.path.dirname(os.path.abspath(item.path)) for item in images]
    return {"image_root": os.path.commonpath(folders) if folders else None, "pairs_sha256": digest.hexdigest(),
            "n_images": len(images), "n_pairs": count_pairs(images)}


def count_pairs(images: list[ImagePairs]) -> int:
    return sum(len(item.pairs) for item in images)


def has_boxless_pairs(images: list[ImagePairs]) -> bool:
    """Whether any pair has no box (only point-label pairs: `sanitize_boxes` skips every other box-less one)."""
    return any(not p.gt_boxes for item in images for p in item.pairs)


def dataset_prompts(images: list[ImagePairs]) -> list[str]:
    """Every prompt of the dataset (all shards), sorted: what runs warn about once, and CLIP Surgery's
    `--contrast dataset` set."""
    return sorted({p.prompt for item in images for p in item.pairs})


def sanitize_boxes(images: list[ImagePairs]) -> tuple[list[ImagePairs], dict[str, int]]:
    """Ground truth that cannot be scored, handled deterministically: boxes reaching outside the image
    are clipped to it, empty boxes (after clipping) are dropped, and a pair left without boxes is
    skipped, unless it has point labels (a box-less pair, scored by the `points` protocol). Returns the clean
    images and the counts of each."""
    counts = {"clipped_boxes": 0, "dropped_boxes": 0, "skipped_pairs": 0}
    clean = []
    for item in images:
        pairs = []
        for pair in item.pairs:
            w, h = pair.image_size
            boxes = []
            for box in pair.gt_boxes:
                clipped = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    counts["dropped_boxes"] += 1
                    continue
                counts["clipped_boxes"] += clipped != list(box)
                boxes.append(clipped)
            if not boxes and pair.points is None:
                counts["skipped_pairs"] += 1
                continue
            pairs.append(pair if boxes == pair.gt_boxes else replace(pair, gt_boxes=boxes))
        if pairs:
            clean.append(item.with_pairs(pairs))
    return clean, counts
