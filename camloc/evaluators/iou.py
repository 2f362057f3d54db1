"""Box IoU under the two conventions of docs/protocol.md §5."""
from __future__ import annotations

from typing import Sequence

CONVENTIONS = ("gscorecam", "coco")


def box_iou(a: Sequence[float], b: Sequence[float], convention: str = "gscorecam") -> float:
    """IoU of two `[x1, y1, x2, y2]` boxes.

    `gscorecam` (default, the original's inclusive pixels): area = (x2 - x1 + 1)(y2 - y1 + 1), 0 when
    x2 <= x1 or y2 <= y1, the intersection by the same rule, iou = inter / (a1 + a2 - inter + 1e-6).
    `coco`: area = (x2 - x1)(y2 - y1), as pycocotools `maskUtils.iou` on xywh boxes.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    if convention == "gscorecam":
        def area(x1, y1, x2, y2):
            return 0.0 if (x2 <= x1 or y2 <= y1) else (x2 - x1 + 1) * (y2 - y1 + 1)

        inter = area(ix1, iy1, ix2, iy2)
        return inter / (area(*a) + area(*b) - inter + 1e-6)
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0  # areas below float resolution (underflow) have no IoU


def best_iou(box: Sequence[float], gt_boxes: Sequence[Sequence[float]], convention: str = "gscorecam") -> float:
    """Pair IoU: the max over the ground-truth boxes of the class (docs/protocol.md §5); 0 with no ground truth."""
    return max((box_iou(box, gt, convention) for gt in gt_boxes), default=0.0)
