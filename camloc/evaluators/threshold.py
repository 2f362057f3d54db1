"""Single-threshold grid search vs Otsu (appendix Table S1): re-score native heatmaps under every
binarisation threshold of a grid, in parallel worker processes, without the model."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from camloc.cams.postprocess import native_to_raw
from camloc.evaluators.boxes import binarize, candidate_boxes, heatmap_to_uint8, largest_box
from camloc.evaluators.iou import best_iou


def threshold_grid(start: float = 0.0, stop: float = 0.95, step: float = 0.05) -> list[float]:
    """0, 0.05, ..., 0.95 by default (both ends included, rounded to 6 decimals)."""
    if step <= 0 or stop < start or start < 0 or stop > 1:
        raise ValueError(f"threshold grid needs 0 <= start <= stop <= 1 and step > 0, got {start}, {stop}, {step}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(count)]


@dataclass(frozen=True)
class Item:
    """One pair to score: its native map (with the post-processing kind), raw size and ground truth."""

    kind: str
    native: np.ndarray
    raw_size: tuple[int, int]
    gt_boxes: list[list[float]]


def score_item(item: Item, thresholds: list[float], convention: str = "gscorecam") -> np.ndarray:
    """IoU of the item's box under each threshold, then under Otsu: (len(thresholds) + 1,)."""
    raw = native_to_raw(item.kind, item.native[None].astype(np.float32), item.raw_size)[0]
    gray = heatmap_to_uint8(raw)
    out = np.empty(len(thresholds) + 1)
    for i, t in enumerate([*thresholds, "otsu"]):
        out[i] = best_iou(largest_box(candidate_boxes(binarize(gray, t))), item.gt_boxes, convention)
    return out


def _score_chunk(args) -> np.ndarray:
    items, thresholds, convention = args
    return np.stack([score_item(item, thresholds, convention) for item in items])


def score_items(items: list[Item], thresholds: list[float], convention: str = "gscorecam",
                workers: int | None = None) -> np.ndarray:
    """(N, len(thresholds) + 1) IoUs; the last column is Otsu. Box derivation runs in `workers`
    processes (default: every core)."""
    if not items:
        return np.zeros((0, len(thresholds) + 1))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) < 64:
        return _score_chunk((items, thresholds, convention))
    size = max(16, len(items) // (workers * 8))
    chunks = [(items[i:i + size], thresholds, convention) for i in range(0, len(items), size)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_score_chunk, chunks)))


def best_threshold(thresholds: list[float], mean_ious: np.ndarray) -> float:
    """The grid value with the best mean IoU (the lowest one on ties)."""
    return thresholds[int(np.argmax(mean_ious))]
