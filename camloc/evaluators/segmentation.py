"""Open-vocabulary semantic segmentation metrics, as mmsegmentation's `IoUMetric` defines them
(open-mmlab/mmsegmentation, mmseg/evaluation/metrics/iou_metric.py at 01c9623):

per image, pixels whose label is the ignore index (255) are dropped; the per-class counts of
intersection (prediction == label), prediction and label are taken, union = prediction + label -
intersection; these counts are SUMMED OVER THE WHOLE DATASET (not averaged per image). Then
IoU_c = sum I_c / sum U_c, Acc_c = sum I_c / sum label_c, and mIoU / mAcc are the mean over classes
whose denominator is not zero (mmseg's `np.nanmean`: a class absent from both the predictions and the
ground truth is left out); aAcc = sum I / sum label. Values are fractions in [0, 1] (mmseg prints
percents, rounded to 2 decimals).

The state (four int64 vectors of length K) merges by addition, so shards and resumed runs give the
numbers of one process exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


@dataclass
class SegmentationState:
    """Per-class pixel counts over a set of images: intersection, union, prediction, label."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    @classmethod
    def empty(cls, num_classes: int) -> "SegmentationState":
        zeros = [np.zeros(num_classes, np.int64) for _ in range(4)]
        return cls(*zeros)

    @property
    def num_classes(self) -> int:
        return len(self.intersect)

    def add(self, pred: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE) -> "SegmentationState":
        """Count one image: `pred` and `label` (H, W) integer maps of class indices 0..K-1 (`label` may
        hold `ignore_index`). A predicted index outside 0..K-1 is an error (it would be dropped silently
        by a histogram)."""
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        keep = label != ignore_index
        p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        k = self.num_classes
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted class indices must lie in 0..{k - 1}")
        if t.size and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"label values must lie in 0..{k - 1} or be {ignore_index}; found {int(t.max())}")
        hit = p[p == t]
        inter = np.bincount(hit, minlength=k)
        pred_n = np.bincount(p, minlength=k)
        label_n = np.bincount(t, minlength=k)
        self.intersect += inter
        self.pred += pred_n
        self.label += label_n
        self.union += pred_n + label_n - inter
        return self

    def __iadd__(self, other: "SegmentationState") -> "SegmentationState":
        if other.num_classes != self.num_classes:
            raise ValueError(f"segmentation states of {self.num_classes} and {other.num_classes} classes cannot merge")
        for name in ("intersect", "union", "pred", "label"):
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def __add__(self, other: "SegmentationState") -> "SegmentationState":
        total = SegmentationState.empty(self.num_classes)
        total += self
        total += other
        return total

    def to_record(self) -> dict:
        return {name: getattr(self, name).tolist() for name in ("intersect", "union", "pred", "label")}

    @classmethod
    def from_record(cls, record: dict) -> "SegmentationState":
        return cls(*(np.asarray(record[name], np.int64) for name in ("intersect", "union", "pred", "label")))

    def per_class(self) -> tuple[np.ndarray, np.ndarray]:
        """(IoU, Acc) per class, NaN where the denominator is zero."""
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(self.union > 0, self.intersect / np.maximum(self.union, 1), np.nan)
            acc = np.where(self.label > 0, self.intersect / np.maximum(self.label, 1), np.nan)
        return iou, acc

    def result(self) -> dict:
        """mIoU, mAcc, aAcc (fractions; None where nothing was counted) and the number of classes counted."""
        iou, acc = self.per_class()
        counted = ~np.isnan(iou)
        total = int(self.label.sum())
        return {"miou": float(np.nanmean(iou)) if counted.any() else None,
                "macc": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else None,
                "aacc": float(self.intersect.sum() / total) if total else None,
                "classes_counted": int(counted.sum())}
