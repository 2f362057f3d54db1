"""Localization protocols beyond one Otsu box, each a pure function of (raw-size heatmap, ground
truth), and the mergeable state of the dataset-level ones.

Per pair (stored in each record under these names, so any pair can be checked by hand):
- `box` (always on): Algorithm 1's box and its IoU (`iou`, `camloc.evaluators.boxes`).
- `mask-iou` -> `mask_iou`: IoU of the binary map (the same binarisation as the box: Otsu or the
  single threshold, on the uint8 min-max map) with the class's union mask.
- `pointing` -> `pointing_hit`: the pointing game (Zhang et al., "Top-down neural attention by
  excitation backprop", ECCV 2016; TorchRay's implementation): the map's maximum is a hit when it lies
  within `tolerance` pixels (Euclidean, 15 in the paper) of the class's mask, or of one of its boxes
  where the dataset has no mask. The maximum is the first in row-major order (NumPy's argmax, as
  TorchRay) when several pixels tie; a constant map (e.g. all zero) points nowhere: a miss.
  -> `energy_pointing`: Score-CAM's energy-based pointing game (Wang et al., CVPRW 2020): the share of
  the map's mass (the [0, 1] raw map) inside the class's mask (boxes without a mask); 0 for an
  all-zero map.

Dataset level (their per-pair state is stored in the record, so shards and resumed runs merge by
addition; the summary holds the values):
- `maxboxacc`: MaxBoxAccV2 of wsolevaluation (Choe et al., "Evaluating weakly supervised object
  localization methods right", CVPR 2020; clovaai/wsolevaluation `evaluation.py`): the map min-max
  normalised to [0, 1], `uint8(map * 255)`, for every CAM threshold t in [0, interval, ..., 1 -
  interval] foreground = pixels > int(t * max), the boxes of ALL contours (RETR_TREE) as
  [x, y, min(x + w, W - 1), min(y + h, H - 1)] ([0, 0, 0, 0] when none), the best IoU of any of them
  with any ground-truth box (inclusive-pixel IoU, no epsilon, degenerate -> 0); per IoU threshold d in
  0.3/0.5/0.7 the accuracy at t is the fraction of pairs with best IoU >= d, BoxAcc(d) = its maximum
  over t, and MaxBoxAccV2 = the mean of the three. State per pair: for each d the set of t that hit.
- `pxap`: wsolevaluation's PxAP: histograms of the normalised map's values over the class's mask
  (positives) and outside it (negatives) with bins [t_i, t_i+1) ... [1, 2), [2, 3]; true and false
  positives accumulated from the highest bin down, precision and recall per threshold, PxAP =
  sum(precision[1:] * diff(recall)) over thresholds with a positive prediction. Pairs without a mask
  are not counted (`n_mask`).

- `chefer-seg`: ImageNet-Segmentation's scoring (Transformer-Explainability's, `camloc.evaluators.explainseg`) on
  any dataset with class masks: per pair the counts of the map binarised at its mean against the class mask at
  224 x 224; pixel accuracy and the 2-class IoUs over the summed counts, mAP and mF1 over pairs.
- `imagenet-s`: ImageNet-S's scoring (LUSSeg's) of the pair's class predicted where the map exceeds its mean,
  against the image's label map: per-class IoU over the summed counts (0..K), F-measure, image accuracy and IoU by
  object size; on the datasets with label maps (imagenet-s50/300/919).
- `points`: OpenImages V7 point labels' p-mIoU (`camloc.evaluators.explainseg.point_counts`): per pair the
  counts (tp, fn, fp, tn) of its yes and no points inside and outside the map's foreground (min-max normalised,
  > 0.5), stored as `points_counts`; p-mIoU as the mean over pairs (`p_miou_pair_mean`, the public
  reconstruction's) and over classes of the summed counts (`p_miou_class_mean`); on datasets with point labels
  (openimages-v7-points), whose pairs have no boxes (`iou` None: the box protocol is not scored there).

All values are fractions in [0, 1] (wsolevaluation prints percents).

The faithfulness protocols (deletion-rise, insertion-rise, deletion-eclip, road) need the model's
forwards on perturbed images: `camloc.evaluators.faithfulness` defines them.
"""
from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np

from camloc.evaluators.boxes import binarize, heatmap_to_uint8
from camloc.evaluators.explainseg import SIZE_BINS
from camloc.evaluators.faithfulness import FAITH_COLUMNS, FAITH_PROTOCOLS, FaithSums

PROTOCOLS = ("box", "mask-iou", "pointing", "maxboxacc", "pxap", "chefer-seg", "imagenet-s", "points",
             *FAITH_PROTOCOLS)
MASK_PROTOCOLS = {"mask-iou", "pointing", "pxap", "chefer-seg"}  # read the class mask where the dataset has one
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
DEFAULT_TOLERANCE = 15
DEFAULT_INTERVAL = 0.01  # wsolevaluation evaluation.py's --cam_curve_interval default


def parse_protocols(value) -> list[str]:
    """`"box,mask-iou"` or a list -> the protocols in PROTOCOLS order, `box` always included; an unknown
    name or a bad parameter is a `CamlocError`."""
    from camloc.errors import OptionError

    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise OptionError(f"--protocols: unknown {', '.join(unknown)}; valid: {', '.join(PROTOCOLS)}")
    return [p for p in PROTOCOLS if p == "box" or p in names]


def check_parameters(tolerance: float, interval: float) -> None:
    from camloc.errors import OptionError

    if not 0 <= tolerance < float("inf"):
        raise OptionError(f"--pointing-tolerance must be a finite number of 0 or more pixels, got {tolerance}")
    if not 0 < interval < 1:
        raise OptionError(f"--cam-curve-interval must be in (0, 1), got {interval}")


def check_ground_truth(protocols, images, dataset: str) -> None:
    """Before eval or rescore scores anything: a protocol whose ground truth the dataset's images (`ImagePairs`)
    do not have would give an empty column with exit 0, so it is a `CamlocError` instead."""
    from camloc.errors import OptionError

    if "imagenet-s" in protocols and not any(item.labels is not None for item in images):
        raise OptionError(f"--protocols imagenet-s scores against an image's label map, which {dataset} does not have; "
                          "run it on imagenet-s50, imagenet-s300 or imagenet-s919")
    if "chefer-seg" in protocols and not any(item.masks is not None for item in images):
        raise OptionError(f"--protocols chefer-seg scores against class masks, which {dataset} does not have")
    if "points" in protocols and not any(p.points is not None for item in images for p in item.pairs):
        raise OptionError(f"--protocols points scores against point labels, which {dataset} does not have; run it on "
                          "openimages-v7-points")
    from camloc.datasets.records import has_boxless_pairs

    boxless = has_boxless_pairs(images)
    if boxless and set(protocols) <= {"box"}:
        raise OptionError(f"{dataset}'s pairs have point labels and no boxes, so the box protocol scores nothing there: "
                          "add --protocols points")
    if boxless and "maxboxacc" in protocols:
        raise OptionError(f"--protocols maxboxacc scores boxes, and {dataset}'s pairs have none (point labels only)")
    if boxless and "pointing" in protocols and not any(item.masks is not None for item in images):
        raise OptionError(f"--protocols pointing needs boxes or masks, and {dataset}'s pairs have neither (point "
                          "labels only): use --protocols points")


def cam_thresholds(interval: float = DEFAULT_INTERVAL) -> np.ndarray:
    """[0, interval, ..., < 1], as wsolevaluation's `np.arange(0, 1, interval)`."""
    return np.arange(0, 1, interval)


def normalised(heatmap: np.ndarray) -> np.ndarray:
    """The map min-max scaled to [0, 1] (float64); a constant map -> zeros; non-finite -> 0."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = h.min(), h.max()
    return (h - low) / (high - low) if high > low else np.zeros_like(h)


def box_mask(boxes: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """The union of [x1, y1, x2, y2) boxes as a bool mask (pixel (x, y) inside when x1 <= x < x2)."""
    mask = np.zeros(shape, bool)
    for x1, y1, x2, y2 in boxes:
        mask[max(0, int(np.ceil(y1))):max(0, int(np.ceil(y2))), max(0, int(np.ceil(x1))):max(0, int(np.ceil(x2)))] = True
    return mask


def mask_iou(heatmap: np.ndarray, mask: np.ndarray, threshold="otsu") -> float:
    """IoU of the binary map (Algorithm 1's binarisation) with `mask`; 0 when both are empty."""
    binary = binarize(heatmap_to_uint8(heatmap), threshold) > 0
    union = np.logical_or(binary, mask).sum()
    return float(np.logical_and(binary, mask).sum() / union) if union else 0.0


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray | None, boxes: list[list[float]],
                 tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether the map's maximum (first in row-major order) lies within `tolerance` pixels of the
    mask (or of the boxes when `mask` is None); a constant map is a miss."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if h.max() == h.min():
        return False
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    target = mask if mask is not None else box_mask(boxes, h.shape)
    ys, xs = np.nonzero(target)
    if ys.size == 0:
        return False
    return bool(((ys - y) ** 2 + (xs - x) ** 2).min() <= tolerance ** 2)


def energy_pointing(heatmap: np.ndarray, mask: np.ndarray | None, boxes: list[list[float]]) -> float:
    """The share of the map's mass inside the mask (or the boxes); 0 for an all-zero map."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    total = h.sum()
    if total <= 0:
        return 0.0
    target = mask if mask is not None else box_mask(boxes, h.shape)
    return float(h[target].sum() / total)


def wsol_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(A, B) IoUs of inclusive-pixel boxes, wsolevaluation's `calculate_multiple_iou` formula: areas
    (x1 - x0 + 1)(y1 - y0 + 1), no epsilon, a non-positive union -> 0."""
    a, b = boxes[:, None, :].astype(np.float64), gt[None, :, :].astype(np.float64)
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    union = ((a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
             + (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def best_box_ious(heatmap: np.ndarray, gt_boxes: list[list[float]], thresholds: np.ndarray) -> np.ndarray:
    """Per CAM threshold, the best IoU of any contour's box with any ground-truth box (MaxBoxAccV2)."""
    gray = (normalised(heatmap) * 255).astype(np.uint8)
    height, width = gray.shape
    top = int(gray.max())
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    best = np.zeros(len(thresholds))
    for i, t in enumerate(thresholds):
        _, binary = cv2.threshold(gray, int(t * top), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        boxes = np.asarray(boxes or [[0, 0, 0, 0]], dtype=np.float64)
        best[i] = wsol_iou(boxes, gt).max() if len(gt) else 0.0
    return best


def maxboxacc_state(heatmap: np.ndarray, gt_boxes: list[list[float]], interval: float = DEFAULT_INTERVAL) -> dict:
    """One pair's MaxBoxAccV2 state: the number of CAM thresholds `n` and, for each IoU threshold,
    the CAM thresholds that hit as a hex bit mask (bit i = threshold i)."""
    thresholds = cam_thresholds(interval)
    best = best_box_ious(heatmap, gt_boxes, thresholds)
    return {"n": len(thresholds), **{str(d): _bits(best >= d) for d in IOU_THRESHOLDS}}


def _bits(flags: np.ndarray) -> str:
    return hex(int.from_bytes(np.packbits(np.asarray(flags, bool), bitorder="little").tobytes(), "little"))


def unbits(text: str, n: int) -> np.ndarray:
    """The flags of a `_bits` mask, (n,) int64."""
    raw = np.frombuffer(int(text, 16).to_bytes((n + 7) // 8, "little"), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(np.int64)


def pxap_state(heatmap: np.ndarray, mask: np.ndarray, interval: float = DEFAULT_INTERVAL) -> dict:
    """One pair's PxAP state: histograms of the normalised map over the mask and outside it."""
    edges = np.append(cam_thresholds(interval), [1.0, 2.0, 3.0])
    scores = normalised(heatmap)
    fg, _ = np.histogram(scores[mask], bins=edges)
    bg, _ = np.histogram(scores[~mask], bins=edges)
    return {"fg": fg.tolist(), "bg": bg.tolist()}


def pxap_from_histograms(fg: np.ndarray, bg: np.ndarray) -> float | None:
    """wsolevaluation's PxAP from summed histograms; None without positives or positive predictions."""
    fg, bg = np.asarray(fg, dtype=np.float64), np.asarray(bg, dtype=np.float64)
    tp = fg[::-1].cumsum()
    fn = fg.sum() - tp
    fp = bg[::-1].cumsum()
    if ((tp + fn) <= 0).all() or ((tp + fp) <= 0).all():
        return None
    predicted = (tp + fp) != 0
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=predicted)
    recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[predicted[1:]].sum())


def pair_values(protocols, heatmap: np.ndarray, mask: np.ndarray | None, gt_boxes: list[list[float]], threshold,
                tolerance: float = DEFAULT_TOLERANCE, interval: float = DEFAULT_INTERVAL,
                labels: tuple[np.ndarray, int] | None = None, category_id: int | None = None,
                points: list | None = None) -> dict:
    """The record fields of the selected protocols (besides `box`) for one pair. A protocol that needs
    a mask records None where the pair has none (pointing and energy fall back to the boxes); `imagenet-s`
    reads `labels`, the image's (label map, number of classes), and records None without them; `points` reads
    the pair's point labels (`Pair.points`), None without them."""
    from camloc.evaluators.explainseg import chefer_seg_pair, imagenet_s_pair, point_counts

    out: dict = {}
    if "mask-iou" in protocols:
        out["mask_iou"] = mask_iou(heatmap, mask, threshold) if mask is not None else None
    if "pointing" in protocols:
        out["pointing_hit"] = pointing_hit(heatmap, mask, gt_boxes, tolerance)
        out["energy_pointing"] = energy_pointing(heatmap, mask, gt_boxes)
    if "maxboxacc" in protocols:
        out["maxboxacc_state"] = maxboxacc_state(heatmap, gt_boxes, interval)
    if "pxap" in protocols:
        out["pxap_state"] = pxap_state(heatmap, mask, interval) if mask is not None else None
    if "chefer-seg" in protocols:
        out["chefer_seg_state"] = chefer_seg_pair(heatmap, mask) if mask is not None else None
    if "imagenet-s" in protocols:
        out["imagenet_s_state"] = (imagenet_s_pair(heatmap, labels[0], category_id, labels[1])
                                   if labels is not None else None)
    if "points" in protocols:
        out["points_counts"] = point_counts(heatmap, points).tolist() if points is not None else None
    return out


class ProtocolSums:
    """The mergeable sums of the protocols beyond `box` over a set of records (`a += b`)."""

    def __init__(self) -> None:
        self.mask_iou = [Fraction(0), 0]  # sum (exact: merged shards equal one run bit for bit), pairs with a mask
        self.pointing = [0, 0]  # hits, pairs
        self.energy = [Fraction(0), 0]
        self.maxboxacc: dict[str, np.ndarray] = {}
        self.maxboxacc_n = 0
        self.pxap_fg: np.ndarray | None = None
        self.pxap_bg: np.ndarray | None = None
        self.pxap_n = 0
        self.seen: set[str] = set()
        self.faith = FaithSums()
        self.seg = ExplainSegSums()
        self.points = None  # PointsState, once a record of the points protocol is added

    def add(self, record: dict) -> None:
        self.faith.add(record)
        self.seg.add(record)
        if "points_counts" in record:
            self.seen.add("points")
            if record["points_counts"] is not None:
                self._points().add_counts(record["points_counts"], int(record["category_id"]))
        if "mask_iou" in record:
            self.seen.add("mask-iou")
            if record["mask_iou"] is not None:
                self.mask_iou[0] += Fraction(record["mask_iou"])
                self.mask_iou[1] += 1
        if "pointing_hit" in record:
            self.seen.add("pointing")
            self.pointing[0] += bool(record["pointing_hit"])
            self.pointing[1] += 1
            self.energy[0] += Fraction(record["energy_pointing"])
            self.energy[1] += 1
        if "maxboxacc_state" in record:
            self.seen.add("maxboxacc")
            state = dict(record["maxboxacc_state"])
            n = state.pop("n")
            for d, bits in state.items():
                hits = unbits(bits, n)
                if d in self.maxboxacc and len(self.maxboxacc[d]) != n:
                    raise ValueError("MaxBoxAccV2 states of different CAM threshold grids cannot be merged")
                self.maxboxacc[d] = self.maxboxacc[d] + hits if d in self.maxboxacc else hits
            self.maxboxacc_n += 1
        if "pxap_state" in record:
            self.seen.add("pxap")
            state = record["pxap_state"]
            if state is not None:
                fg, bg = np.asarray(state["fg"], np.int64), np.asarray(state["bg"], np.int64)
                self.pxap_fg = fg if self.pxap_fg is None else self.pxap_fg + fg
                self.pxap_bg = bg if self.pxap_bg is None else self.pxap_bg + bg
                self.pxap_n += 1

    def __iadd__(self, other: "ProtocolSums") -> "ProtocolSums":
        for mine, theirs in ((self.mask_iou, other.mask_iou), (self.pointing, other.pointing),
                             (self.energy, other.energy)):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        for d, hits in other.maxboxacc.items():
            self.maxboxacc[d] = self.maxboxacc[d] + hits if d in self.maxboxacc else hits.copy()
        self.maxboxacc_n += other.maxboxacc_n
        if other.pxap_fg is not None:
            self.pxap_fg = other.pxap_fg.copy() if self.pxap_fg is None else self.pxap_fg + other.pxap_fg
            self.pxap_bg = other.pxap_bg.copy() if self.pxap_bg is None else self.pxap_bg + other.pxap_bg
        self.pxap_n += other.pxap_n
        self.seen |= other.seen
        self.faith += other.faith
        self.seg += other.seg
        if other.points is not None:
            points = self._points()
            points += other.points
        return self

    def _points(self):
        if self.points is None:
            from camloc.evaluators.explainseg import PointsState

            self.points = PointsState()
        return self.points

    def result(self) -> dict:
        out: dict = {}
        if "mask-iou" in self.seen:
            out["mask_iou"] = float(self.mask_iou[0] / self.mask_iou[1]) if self.mask_iou[1] else None
            out["n_mask"] = self.mask_iou[1]
        if "pointing" in self.seen:
            out["pointing"] = self.pointing[0] / self.pointing[1] if self.pointing[1] else None
            out["energy_pointing"] = float(self.energy[0] / self.energy[1]) if self.energy[1] else None
        if "maxboxacc" in self.seen:
            accs = {d: float(hits.max() / self.maxboxacc_n) for d, hits in sorted(self.maxboxacc.items())}
            for d, acc in accs.items():
                out[f"boxacc@{d}"] = acc
            out["maxboxacc_v2"] = float(np.mean(list(accs.values()))) if accs else None
        if "pxap" in self.seen:
            out["pxap"] = pxap_from_histograms(self.pxap_fg, self.pxap_bg) if self.pxap_fg is not None else None
            out.setdefault("n_mask", self.pxap_n)
        if "points" in self.seen:
            values = self.points.result() if self.points is not None and self.points.pairs else {}
            out.update({"p_miou_pair_mean": values.get("p_miou_pair_mean"),
                        "p_miou_class_mean": values.get("p_miou_class_mean"), "n_points": values.get("pairs", 0)})
        out.update(self.faith.result())
        out.update(self.seg.result())
        return out


class ExplainSegSums:
    """The `chefer-seg` and `imagenet-s` records' sums: integer counts, and the per-pair float terms (AP, F1,
    F-measure) as exact fractions, so shards merged in any order give one run's values bit for bit."""

    def __init__(self) -> None:
        from camloc.evaluators.explainseg import ImagenetSegState

        self.chefer = ImagenetSegState()
        self.chefer_terms = [Fraction(0), Fraction(0)]  # AP, F1
        self.chefer_seen = False
        self.imagenet_s = None  # ImagenetSState, once a record with a state is added
        self.imagenet_s_terms = [Fraction(0), Fraction(0)]  # F-measure, accuracy
        self.imagenet_s_seen = False

    def add(self, record: dict) -> None:
        from camloc.evaluators.explainseg import ImagenetSegState, ImagenetSState

        if "chefer_seg_state" in record:
            self.chefer_seen = True
            if record["chefer_seg_state"] is not None:
                state = ImagenetSegState.from_record(record["chefer_seg_state"])
                self.chefer_terms[0] += Fraction(state.ap_sum)
                self.chefer_terms[1] += Fraction(state.f1_sum)
                state.ap_sum = state.f1_sum = 0.0
                self.chefer += state
        if "imagenet_s_state" in record:
            self.imagenet_s_seen = True
            if record["imagenet_s_state"] is not None:
                state = ImagenetSState.from_record(record["imagenet_s_state"])
                self.imagenet_s_terms[0] += Fraction(state.fmeasure_sum)
                self.imagenet_s_terms[1] += Fraction(state.accuracy_sum)
                state.fmeasure_sum = state.accuracy_sum = 0.0
                self._add_imagenet_s(state)

    def _add_imagenet_s(self, state) -> None:
        if self.imagenet_s is None:
            from camloc.evaluators.explainseg import ImagenetSState

            self.imagenet_s = ImagenetSState(state.num_classes)
        self.imagenet_s += state  # refuses another number of classes

    def __iadd__(self, other: "ExplainSegSums") -> "ExplainSegSums":
        self.chefer += other.chefer
        self.chefer_seen |= other.chefer_seen
        if other.imagenet_s is not None:
            self._add_imagenet_s(other.imagenet_s)
        self.imagenet_s_seen |= other.imagenet_s_seen
        for mine, theirs in ((self.chefer_terms, other.chefer_terms), (self.imagenet_s_terms, other.imagenet_s_terms)):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        return self

    def result(self) -> dict:
        out: dict = {}
        if self.chefer_seen:
            n = self.chefer.images
            values = self.chefer.result() if n else {}
            out.update({"seg_pixel_accuracy": values.get("pixel_accuracy"), "seg_miou": values.get("miou"),
                        "seg_map": float(self.chefer_terms[0] / n) if n else None,
                        "seg_mf1": float(self.chefer_terms[1] / n) if n else None, "n_seg": n})
        if self.imagenet_s_seen:
            state = self.imagenet_s
            n = state.images if state is not None else 0
            values = state.result() if n else {}
            out.update({"imagenet_s_miou": values.get("miou"),
                        "imagenet_s_fmeasure": float(self.imagenet_s_terms[0] / n) if n else None,
                        "imagenet_s_accuracy": float(self.imagenet_s_terms[1] / n) if n else None,
                        **{f"imagenet_s_miou_{b}": _finite(values.get(f"miou_{b}")) for b in SIZE_BINS},
                        "n_imagenet_s": n})
        return out


def _finite(value):
    return None if value is None or value != value else value


class _DatasetState:
    """A dataset-level protocol's state over pairs, built pair by pair (`add`) and merged by addition
    (`a + b`, e.g. shards): the same sums the run records hold."""

    FIELD = ""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        check_parameters(DEFAULT_TOLERANCE, interval)
        self.interval = float(interval)
        self.sums = ProtocolSums()

    def _add_state(self, state) -> "_DatasetState":
        self.sums.add({self.FIELD: state})
        return self

    def __add__(self, other: "_DatasetState") -> "_DatasetState":
        if type(other) is not type(self) or other.interval != self.interval:
            raise ValueError(f"only {type(self).__name__}s of one threshold step add up")
        total = type(self)(self.interval)
        total.sums += self.sums
        total.sums += other.sums
        return total


class MaxBoxAcc(_DatasetState):
    """MaxBoxAccV2 (wsolevaluation) over pairs: `add(heatmap, gt_boxes)` per pair, `result()` ->
    boxacc@0.3/0.5/0.7 and maxboxacc_v2."""

    FIELD = "maxboxacc_state"

    def add(self, heatmap: np.ndarray, gt_boxes: list[list[float]]) -> "MaxBoxAcc":
        return self._add_state(maxboxacc_state(heatmap, gt_boxes, self.interval))

    def result(self) -> dict:
        return self.sums.result()


class PxAP(_DatasetState):
    """PxAP (wsolevaluation's pixel PR-AUC) over pairs: `add(heatmap, mask)` per pair, `result()` -> pxap."""

    FIELD = "pxap_state"

    def add(self, heatmap: np.ndarray, mask: np.ndarray) -> "PxAP":
        return self._add_state(pxap_state(heatmap, mask, self.interval))

    def result(self) -> dict:
        return {k: v for k, v in self.sums.result().items() if k == "pxap"}


PROTOCOL_COLUMNS = ["mask_iou", "n_mask", "pointing", "energy_pointing", "boxacc@0.3", "boxacc@0.5", "boxacc@0.7",
                    "maxboxacc_v2", "pxap", "seg_pixel_accuracy", "seg_miou", "seg_map", "seg_mf1", "n_seg",
                    "imagenet_s_miou", "imagenet_s_fmeasure", "imagenet_s_accuracy",
                    *(f"imagenet_s_miou_{b}" for b in SIZE_BINS), "n_imagenet_s", "p_miou_pair_mean",
                    "p_miou_class_mean", "n_points", *FAITH_COLUMNS]
"""Table columns of the protocols beyond `box`, in this order, where a run has them."""
