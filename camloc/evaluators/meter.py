"""A localization meter: sums and counts that merge by addition (shards combine exactly)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass
class _Sums:
    n: int = 0
    """Pairs scored, box IoU or not."""
    n_iou: int = 0
    """Pairs with a box IoU: all of them, except the box-less pairs of point-label datasets (`iou` None)."""
    iou_sum: Fraction = Fraction(0)  # exact: merged shards equal one run bit for bit, in any order
    iou_sq_sum: Fraction = Fraction(0)
    hits: dict[float, int] = field(default_factory=lambda: {t: 0 for t in THRESHOLDS})

    def add(self, iou: float | None) -> None:
        self.n += 1
        if iou is None:
            return
        self.n_iou += 1
        self.iou_sum += Fraction(iou)
        self.iou_sq_sum += Fraction(iou) ** 2
        for t in THRESHOLDS:
            self.hits[t] += iou >= t

    def __iadd__(self, other: "_Sums") -> "_Sums":
        self.n += other.n
        self.n_iou += other.n_iou
        self.iou_sum += other.iou_sum
        self.iou_sq_sum += other.iou_sq_sum
        for t in THRESHOLDS:
            self.hits[t] += other.hits[t]
        return self

    def result(self) -> dict[str, float]:
        """n_pairs, mean IoU and accuracies over the pairs with an IoU (NaN without pairs; None where every pair
        is box-less: not scored, rather than a 0 that reads as a result)."""
        none = float("nan") if not self.n else None
        out = {"n_pairs": self.n, "mean_iou": float(self.iou_sum / self.n_iou) if self.n_iou else none}
        for t in THRESHOLDS:
            out[f"acc@{t}"] = self.hits[t] / self.n_iou if self.n_iou else none
        out["mean_iou_ci95"] = self.interval()
        if self.n_iou != self.n:
            out["n_iou"] = self.n_iou
        return out

    def interval(self) -> list[float] | None:
        """The mean IoU's 95 % interval over pairs, mean +- 1.96 s / sqrt(n) with s the pairs' sample standard
        deviation (a normal approximation, computed from exact sums, so shards merge to the same interval);
        None for fewer than 2 pairs with an IoU."""
        if self.n_iou < 2:
            return None
        mean = self.iou_sum / self.n_iou
        variance = max(float((self.iou_sq_sum - self.n_iou * mean * mean) / (self.n_iou - 1)), 0.0)
        half = 1.96 * (variance / self.n_iou) ** 0.5
        return [float(mean) - half, float(mean) + half]


class LocalizationMeter:
    """Mean IoU (micro, over pairs), accuracy@0.3/0.5/0.7 (fraction of pairs with IoU >= t), and the
    same per class (docs/protocol.md §5). `a + b` equals one meter updated with both streams of pairs."""

    def __init__(self) -> None:
        from camloc.evaluators.protocols import ProtocolSums

        self.total = _Sums()
        self.per_class: dict[str, _Sums] = defaultdict(_Sums)
        self.protocols = ProtocolSums()

    def update(self, iou: float | None, category: str) -> None:
        iou = None if iou is None else float(iou)
        self.total.add(iou)
        self.per_class[category].add(iou)

    def add_record(self, record: dict) -> None:
        """One eval record: its box IoU (None for a box-less pair) and the values of any other protocol it holds."""
        self.update(record["iou"], record["category"])
        self.protocols.add(record)

    def __iadd__(self, other: "LocalizationMeter") -> "LocalizationMeter":
        self.total += other.total
        for name, sums in other.per_class.items():
            self.per_class[name] += sums
        self.protocols += other.protocols
        return self

    def __add__(self, other: "LocalizationMeter") -> "LocalizationMeter":
        out = LocalizationMeter()
        out += self
        out += other
        return out

    def compute(self) -> dict[str, float]:
        return {**self.total.result(), **self.protocols.result()}

    def compute_per_class(self) -> dict[str, dict[str, float]]:
        return {name: self.per_class[name].result() for name in sorted(self.per_class)}


def record_key(record: dict) -> tuple[str, int, str]:
    """The (pair, method) an eval record is about: a run holds at most one record per key."""
    return (str(record["image_id"]), int(record["category_id"]), record["method"])


def meters_by(records, group=lambda r: r["method"]) -> dict:
    """One `LocalizationMeter` per group of eval records (default: per method), each (pair, method) of
    a group counted once however often it appears (resumed or merged record files)."""
    meters: dict = {}
    seen = set()
    for r in records:
        g = group(r)
        key = (g, *record_key(r))
        if key in seen:
            continue
        seen.add(key)
        meters.setdefault(g, LocalizationMeter()).add_record(r)
    return meters
