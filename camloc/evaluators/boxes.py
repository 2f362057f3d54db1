"""Heatmap -> box: Algorithm 1 of the gScoreCAM appendix (docs/protocol.md §4)."""
from __future__ import annotations

from typing import Union

import cv2
import numpy as np

Threshold = Union[str, float]
NO_BOX = [0, 0, 1, 1]


def check_threshold(value) -> Threshold:
    """`--threshold`: "otsu", or a number in [0, 1] (also given as text)."""
    if value == "otsu":
        return value
    try:
        t = float(value)
    except (TypeError, ValueError):
        from camloc.errors import OptionError

        raise OptionError(f"--threshold {value!r} is neither 'otsu' nor a number in [0, 1]") from None
    if not 0 <= t <= 1:
        from camloc.errors import OptionError

        raise OptionError(f"--threshold {value} is outside [0, 1]")
    return t


def heatmap_to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255 (OpenCV NORM_MINMAX, CV_8U). Non-finite values count as 0."""
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {hm.shape}")
    if not np.isfinite(hm).all():
        hm = np.nan_to_num(hm, nan=0.0, posinf=0.0, neginf=0.0)
    return cv2.normalize(hm, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)


def binarize(gray: np.ndarray, threshold: Threshold = "otsu") -> np.ndarray:
    """uint8 map -> 0/255 mask: Otsu, or foreground where `gray > round(t * 255)` for t in [0, 1]."""
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}")
        _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        return binary
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {t}")
    # THRESH_BINARY sets 255 where gray > thresh: exactly `gray > round(t * 255)`, vectorised by OpenCV
    _, binary = cv2.threshold(gray, round(t * 255), 255, cv2.THRESH_BINARY)
    return binary


def outer_contours(binary: np.ndarray) -> tuple:
    """The outer contours of a 0/255 mask (Algorithm 1's `RETR_EXTERNAL`, simple chains)."""
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return contours


def candidate_boxes(binary: np.ndarray) -> list[list[int]]:
    """Bounding rectangles [x, y, x + w, y + h] of the outer contours, in OpenCV's contour order."""
    boxes = []
    for contour in outer_contours(binary):
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, x + w, y + h])
    return boxes


def largest_box(boxes: list[list[int]]) -> list[int]:
    """The box of largest area (first one on ties); `[0, 0, 1, 1]` when there is none."""
    if not boxes:
        return list(NO_BOX)
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def box_from_heatmap(heatmap: np.ndarray, threshold: Threshold = "otsu") -> list[int]:
    """Algorithm 1: uint8 min-max, binarise (Otsu or single value), outer contours, largest bounding
    rectangle as `[x1, y1, x2, y2]` (x2, y2 exclusive); `[0, 0, 1, 1]` when nothing is foreground."""
    return largest_box(candidate_boxes(binarize(heatmap_to_uint8(heatmap), threshold)))
