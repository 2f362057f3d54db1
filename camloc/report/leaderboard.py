"""The leaderboard: methods as rows, (run, metric) as columns, each value with a bootstrap 95 % interval
over images and each run's maps per second beside it (the HTML report's first screen).

Every metric is written as per-record sufficient statistics that add up (sums and counts, hit
vectors, histograms) and a function of their sum, so the value over all images and the values over
resampled sets of images come from the same code: a cluster bootstrap over images (images, not
pairs, are the independent draws: an image's pairs share it) resamples whole images' statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

RESAMPLES = 1000
LEVEL = 95


@dataclass(frozen=True)
class Metric:
    column: str
    """The long table's column it reproduces (and the key in `board`'s cells)."""
    label: str
    higher: bool
    """Higher is better (the best value per column is marked)."""
    field: str
    """The record field whose presence means the run measured it."""
    stats: Callable[[dict], np.ndarray | None]
    """A record's statistics (None: the record does not count, e.g. a pair without a mask)."""
    value: Callable[[np.ndarray], np.ndarray]
    """(B, k) summed statistics -> (B,) values (NaN where undefined)."""
    tip: str = ""
    measured: Callable[[dict], bool] | None = None
    """Whether a record counts as measuring it (default: it holds `field`)."""

    def measures(self, record: dict) -> bool:
        return self.measured(record) if self.measured is not None else self.field in record


def _ratio(sums: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums[:, 1] > 0, sums[:, 0] / np.maximum(sums[:, 1], 1e-300), np.nan)


def _mean_of(get) -> Callable[[dict], np.ndarray | None]:
    def stats(record: dict):
        value = get(record)
        return None if value is None else np.array([float(value), 1.0])
    return stats


def _maxboxacc_stats(record: dict):
    from camloc.evaluators.protocols import unbits

    state = dict(record["maxboxacc_state"])
    n = state.pop("n")
    return np.concatenate([[1.0, len(state)], *(unbits(state[d], n).astype(np.float64) for d in sorted(state))])


def _maxboxacc_value(sums: np.ndarray) -> np.ndarray:
    """The mean over box IoU thresholds (one hit vector each over the CAM thresholds) of the best accuracy."""
    deltas = round(sums[0, 1] / sums[0, 0])
    hits = sums[:, 2:].reshape(len(sums), deltas, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (hits.max(axis=2) / sums[:, :1]).mean(axis=1)


def _pxap_stats(record: dict):
    state = record["pxap_state"]
    return None if state is None else np.concatenate([state["fg"], state["bg"]]).astype(np.float64)


def _pxap_value(sums: np.ndarray) -> np.ndarray:
    from camloc.evaluators.protocols import pxap_from_histograms

    half = sums.shape[1] // 2
    values = (pxap_from_histograms(row[:half], row[half:]) for row in sums)
    return np.array([np.nan if v is None else v for v in values])


def _eclip_stats(record: dict):
    return np.concatenate([[1.0], (np.asarray(record["deletion_eclip"]["ranks"]) == 0).astype(np.float64)])


def _eclip_value(sums: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = sums[:, 1:] / sums[:, :1]
    return (accuracy.sum(axis=1) - accuracy[:, 0] / 2 - accuracy[:, -1] / 2) / (accuracy.shape[1] - 1)


def _road_stats(record: dict):
    road = record["road"]
    return None if road is None else np.array([np.mean(road["lerf"]), np.mean(road["morf"]), 1.0])


def _road_value(sums: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sums[:, 0] - sums[:, 1]) / sums[:, 2] / 2


def _auc_of(name: str):
    return _mean_of(lambda r: None if r[name] is None else r[name]["auc"])


def _chefer_stats(record: dict):
    state = record["chefer_seg_state"]
    return None if state is None else np.array([*state["intersect"], *state["union"]], np.float64)


def _chefer_miou(sums: np.ndarray) -> np.ndarray:
    from camloc.evaluators.explainseg import SPACING

    return (sums[:, :2] / (SPACING + sums[:, 2:])).mean(axis=1)


def _imagenet_s_stats(record: dict):
    state = record["imagenet_s_state"]
    if state is None:
        return None
    from camloc.evaluators.explainseg import ImagenetSState

    full = ImagenetSState.from_record(state)
    return np.concatenate([full.intersect, full.pred, full.label]).astype(np.float64)


def _imagenet_s_miou(sums: np.ndarray) -> np.ndarray:
    k = sums.shape[1] // 3
    inter, pred, label = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
    return (inter / (pred + label - inter + 1e-10)).mean(axis=1)


def _point_miou(record: dict):
    from camloc.evaluators.explainseg import point_miou

    counts = record["points_counts"]
    return None if counts is None else point_miou(counts)


METRICS = [
    Metric("mean_iou", "box IoU", True, "iou", _mean_of(lambda r: r["iou"]), _ratio,
           "mean IoU of the Otsu box with the ground-truth box, over pairs",
           measured=lambda r: r.get("iou") is not None),  # a box-less pair (point labels only) has none
    Metric("mask_iou", "mask IoU", True, "mask_iou", _mean_of(lambda r: r["mask_iou"]), _ratio,
           "mean IoU of the thresholded map with the mask, over pairs with a mask"),
    Metric("pointing", "pointing", True, "pointing_hit", _mean_of(lambda r: r["pointing_hit"]), _ratio,
           "fraction of pairs whose map maximum falls on the object"),
    Metric("maxboxacc_v2", "MaxBoxAccV2", True, "maxboxacc_state", _maxboxacc_stats, _maxboxacc_value,
           "wsolevaluation's MaxBoxAccV2: best-threshold box accuracy at IoU 0.3/0.5/0.7, averaged"),
    Metric("pxap", "PxAP", True, "pxap_state", _pxap_stats, _pxap_value,
           "wsolevaluation's pixel average precision over pairs with a mask"),
    Metric("seg_miou", "seg mIoU (Chefer)", True, "chefer_seg_state", _chefer_stats, _chefer_miou,
           "ImageNet-Segmentation's scoring (Chefer et al.): mean of the background and foreground IoU of the map "
           "binarised at its mean, counts summed over pairs"),
    Metric("seg_map", "seg mAP (Chefer)", True, "chefer_seg_state",
           _mean_of(lambda r: None if r["chefer_seg_state"] is None else r["chefer_seg_state"]["ap_sum"]), _ratio,
           "ImageNet-Segmentation's mAP: per pair the average precision of the map (both channels), averaged"),
    Metric("imagenet_s_miou", "ImageNet-S mIoU", True, "imagenet_s_state", _imagenet_s_stats, _imagenet_s_miou,
           "ImageNet-S's mIoU over classes 0..K of the map's class predicted above its mean (LUSSeg's counts)"),
    Metric("p_miou_pair_mean", "p-mIoU", True, "points_counts", _mean_of(_point_miou), _ratio,
           "OpenImages V7 point labels: mean over pairs of the foreground/background IoU at the yes/no points of "
           "the map above 0.5 (the public reconstruction's average; the per-class mean is in the tables)"),
    Metric("deletion_rise", "deletion ↓", False, "deletion_rise", _auc_of("deletion_rise"), _ratio,
           "RISE deletion AUC: lower is better"),
    Metric("insertion_rise", "insertion", True, "insertion_rise", _auc_of("insertion_rise"), _ratio,
           "RISE insertion AUC"),
    Metric("deletion_eclip", "deletion top-1 ↓", False, "deletion_eclip", _eclip_stats, _eclip_value,
           "Grad-ECLIP's deletion: AUC of the zero-shot top-1 accuracy, lower is better"),
    Metric("road_combined", "ROAD", True, "road", _road_stats, _road_value,
           "ROAD combined: (LeRF - MoRF) / 2"),
]


def _miou_value(sums: np.ndarray) -> np.ndarray:
    half = sums.shape[1] // 2
    intersect, union = sums[:, :half], sums[:, half:]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersect / np.maximum(union, 1), np.nan)
    counted = (union > 0).sum(axis=1)
    return np.where(counted > 0, np.nansum(iou, axis=1) / np.maximum(counted, 1), np.nan)


MIOU = Metric("miou", "mIoU", True, "state", lambda r: np.concatenate([r["state"]["intersect"],
                                                                        r["state"]["union"]]).astype(np.float64),
              _miou_value, "open-vocabulary segmentation: mean IoU over classes (merged counts)")


def image_statistics(records, metric: Metric) -> tuple[list, np.ndarray]:
    """(image ids, (n_images, k) summed statistics per image) of the records that count for `metric`."""
    per_image: dict = {}
    for record in records:
        stats = metric.stats(record)
        if stats is None:
            continue
        key = str(record["image_id"])
        per_image[key] = per_image[key] + stats if key in per_image else stats
    ids = sorted(per_image)
    if not ids:
        return [], np.zeros((0, 0))
    return ids, np.stack([per_image[i] for i in ids])


def bootstrap_interval(stats: np.ndarray, value, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile bootstrap interval of `value` over images: `resamples` draws of n images with
    replacement (numpy's default generator seeded with `seed`, so a report is reproducible), each draw's
    statistics summed and turned into a value; None for fewer than 2 images or where no draw is defined."""
    n = len(stats)
    if n < 2:
        return None
    values = value(_weights(n, resamples, seed) @ stats)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (100 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@lru_cache(maxsize=4)
def _weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each image is drawn in each resample (shared by every column of
    the same images, so methods are compared on the same draws)."""
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = (draws + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def metric_cell(records: list[dict], metric: Metric, resamples: int = RESAMPLES) -> dict | None:
    """{"value", "interval", "n_images"} of one method's records, or None where it did not measure it."""
    if not any(metric.measures(r) for r in records):
        return None
    ids, stats = image_statistics(records, metric)
    if not ids:
        return {"value": None, "interval": None, "n_images": 0}
    value = float(metric.value(stats.sum(axis=0, keepdims=True))[0])
    return {"value": None if np.isnan(value) else value,
            "interval": bootstrap_interval(stats, metric.value, resamples), "n_images": len(ids)}


def rate(records: list[dict], seconds=lambda r: r.get("seconds")) -> float | None:
    """Records per second of model time; None unless every record carries its seconds (a rescored run's
    records, computed from a cache, do not)."""
    times = [seconds(r) for r in records]
    if not times or any(t is None for t in times) or not sum(times):
        return None
    return len(times) / sum(times)


def board(eval_groups: list[dict], ovseg_groups: list[dict], label, resamples: int = RESAMPLES) -> dict:
    """{"columns": [{"group", "metric", "label", "higher", "tip"}], "rates": [{"group", "unit"}], "rows":
    {method: {"cells": {(group, metric column): cell}, "rates": {group: per second}}}}, `label(group)`
    naming each run group; the best value of each column is flagged `best` in its cell."""
    from camloc.report.tables import METHOD_ORDER

    columns, rates, rows = [], [], {}
    for kind, groups in (("eval", eval_groups), ("ovseg", ovseg_groups)):
        for group in groups:
            name = label(group)
            by_method: dict = {}
            for record in group["records"].values():
                by_method.setdefault(record["method"], []).append(record)
            metrics = [MIOU] if kind == "ovseg" else METRICS
            present = [m for m in metrics if any(m.measures(r) for rs in by_method.values() for r in rs)]
            columns += [{"group": name, "metric": m.column, "label": m.label, "higher": m.higher, "tip": m.tip}
                        for m in present]
            rates.append({"group": name, "unit": "images/s" if kind == "ovseg" else "pairs/s"})
            for method, records in by_method.items():
                row = rows.setdefault(method, {"cells": {}, "rates": {}})
                for m in present:
                    row["cells"][(name, m.column)] = metric_cell(records, m, resamples)
                row["rates"][name] = (rate(records, lambda r: r["forward_seconds"] + r["method_seconds"])
                                      if kind == "ovseg" else rate(records))
    for column in columns:
        key = (column["group"], column["metric"])
        values = [row["cells"][key]["value"] for row in rows.values()
                  if row["cells"].get(key) and row["cells"][key]["value"] is not None]
        if values:
            best = max(values) if column["higher"] else min(values)
            for row in rows.values():
                cell = row["cells"].get(key)
                if cell and cell["value"] == best:
                    cell["best"] = True
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    rows = dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return {"columns": columns, "rates": rates, "rows": rows}


__all__ = ["METRICS", "Metric", "board", "bootstrap_interval", "image_statistics", "metric_cell", "rate"]
