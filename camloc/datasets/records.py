"""The pair record every dataset yields (spec §5: one pair = an image and a class present in it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator


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


def count_pairs(images: list[ImagePairs]) -> int:
    return sum(len(item.pairs) for item in images)


def iter_pairs(images: list[ImagePairs]) -> Iterator[Pair]:
    for item in images:
        yield from item.pairs
