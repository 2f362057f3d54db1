"""The explainability field's segmentation benchmarks, as mergeable states (shards and resumes add them up).

- `ImagenetSegState`: ImageNet-Segmentation (Guillaumin et al.; 4,276 images, one foreground mask each) as
  hila-chefer/Transformer-Explainability scores it (`baselines/ViT/imagenet_seg_eval.py` and `utils/metrices.py` at
  6b4f311): the map at the model's input size, min-max normalised (a constant map, whose normalisation is 0/0, is
  0 everywhere and all background); foreground where it exceeds its own mean; per image the pixel counts correct /
  labelled and the 2-class (background, foreground) intersection and union, summed over the dataset; pixel
  accuracy = sum correct / sum labelled, IoU per class = sum intersection / sum union, mIoU their mean (the
  reference adds `np.spacing(1)` to each denominator, so does camloc); mAP = the mean over images of the average
  precision of the two-channel scores (1 - R, R) against the one-hot mask, both channels pooled (sklearn's
  `average_precision_score`, NaN -> 0); mF1 = the mean over images of the F1 of the binary foreground (sklearn's
  `f1_score`, NaN -> 0).
- `ImagenetSState`: ImageNet-S (LUSSeg; 50 / 300 / 919 classes, masks as RGB PNG with class id R + 256 G, 0 =
  other, 1000 = ignore) as LUSSeg/ImageNet-S `evaluation/metric.py` and `evaluator.py` (at d8e3cd0 / 89bce0f)
  accumulate it: per class the predicted, labelled and intersecting pixels summed over the dataset, IoU = TP / (T + P
  - TP + 1e-10) for every class id 0..K (absent classes count as 0, as the reference's mean does); the mean
  F-measure (beta = 0.3, foreground = id > 0); the image-level accuracy (the predicted class with the most pixels
  is present in the mask); and IoU by object size: each class of an image falls in the bin of its share of the
  image's pixels (ceil of the percentage: <= 5, <= 25, <= 50, > 50), its pixels and the image's "other" pixels are
  counted into that bin's sums, and a bin's mIoU is over the classes labelled in it. Pixels labelled 1000 are dropped
  from every count here (the evaluator files read here do not drop them themselves; its loader, `tools.py`, was not
  available to read): the object-size shares are still of the whole image, as the reference counts them.

As run protocols (`--protocols chefer-seg,imagenet-s`, one record per (image, class) pair; `chefer_seg_pair`,
`imagenet_s_pair`):
- `chefer-seg` scores a pair's raw-size map against its class mask after resizing both to SEG_SIZE x SEG_SIZE (the
  map bilinearly, the mask by nearest neighbour), as the reference scores the model's 224 x 224 input.
- `imagenet-s` predicts the pair's class where the pair's map (at the label map's size) exceeds its own mean (the
  binarisation above) and "other" (0) elsewhere, and scores that prediction against the image's whole label map.

Values are fractions in [0, 1] (the papers print percentages)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

SPACING = float(np.spacing(1, dtype=np.float64))
SIZE_BINS = ("S", "MS", "ML", "L")
"""ImageNet-S's object-size bins: <= 5 %, <= 25 %, <= 50 %, > 50 % of the image."""
IMAGENET_S_IGNORE = 1000
SEG_SIZE = 224
"""The square size ImageNet-Segmentation's reference scores maps and masks at (its model input)."""


def normalised_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float32 as the reference does; a constant map (0/0) becomes 0 everywhere."""
    r = np.asarray(heatmap, np.float32)
    low, high = float(r.min()), float(r.max())
    if not high > low:
        return np.zeros_like(r)
    return (r - np.float32(low)) / np.float32(high - low)


def mean_binarised(heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(the map min-max normalised, its foreground: strictly above its own mean, whether the map is constant).
    A constant map is 0 everywhere and all background, as the reference's 0/0 after its NaN -> 0."""
    h = np.asarray(heatmap, np.float32)
    constant = not float(h.max()) > float(h.min())
    r = normalised_map(h)
    return r, np.zeros(r.shape, bool) if constant else r > r.mean(dtype=np.float32), constant


@dataclass
class ImagenetSegState:
    """Sums over images of ImageNet-Segmentation's counts (see the module)."""

    correct: int = 0
    labeled: int = 0
    intersect: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    union: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    ap_sum: float = 0.0
    f1_sum: float = 0.0
    images: int = 0

    def add(self, heatmap: np.ndarray, mask: np.ndarray) -> "ImagenetSegState":
        """One image: `heatmap` (H, W) at the model's input size (upsampled as the method's maps are), `mask`
        (H, W) of 0 (background) and 1 (foreground) at the same size (resized with nearest neighbours)."""
        from sklearn.metrics import average_precision_score, f1_score

        heatmap, mask = np.asarray(heatmap), np.asarray(mask)
        if heatmap.shape != mask.shape:
            raise ValueError(f"map {heatmap.shape} and mask {mask.shape} differ in size")
        values = set(np.unique(mask).tolist())
        if not values <= {0, 1}:
            raise ValueError(f"mask values must be 0 and 1, found {sorted(values)[:5]}")
        r, fg, constant = mean_binarised(heatmap)
        truth = mask.astype(bool)
        self.correct += int((fg == truth).sum())
        self.labeled += int(truth.size)
        for c, (p, t) in enumerate(((~fg, ~truth), (fg, truth))):
            inter = int((p & t).sum())
            self.intersect[c] += inter
            self.union[c] += int(p.sum()) + int(t.sum()) - inter
        scores = np.zeros(2 * r.size, np.float32) if constant else np.concatenate([(1 - r).ravel(), r.ravel()])
        target = np.concatenate([(~truth).ravel(), truth.ravel()]).astype(np.int64)
        self.ap_sum += float(np.nan_to_num(average_precision_score(target, scores)))
        self.f1_sum += float(np.nan_to_num(f1_score(truth.ravel().astype(np.int64), fg.ravel().astype(np.int64),
                                                    zero_division=0)))
        self.images += 1
        return self

    def __iadd__(self, other: "ImagenetSegState") -> "ImagenetSegState":
        self.correct += other.correct
        self.labeled += other.labeled
        self.intersect += other.intersect
        self.union += other.union
        self.ap_sum += other.ap_sum
        self.f1_sum += other.f1_sum
        self.images += other.images
        return self

    def result(self) -> dict:
        iou = self.intersect / (SPACING + self.union)
        return {"pixel_accuracy": self.correct / (SPACING + self.labeled), "iou_background": float(iou[0]),
                "iou_foreground": float(iou[1]), "miou": float(iou.mean()),
                "map": self.ap_sum / self.images if self.images else float("nan"),
                "mf1": self.f1_sum / self.images if self.images else float("nan"), "images": self.images}

    def to_record(self) -> dict:
        return {"correct": self.correct, "labeled": self.labeled, "intersect": self.intersect.tolist(),
                "union": self.union.tolist(), "ap_sum": self.ap_sum, "f1_sum": self.f1_sum, "images": self.images}

    @classmethod
    def from_record(cls, record: dict) -> "ImagenetSegState":
        return cls(int(record["correct"]), int(record["labeled"]), np.asarray(record["intersect"], np.int64),
                   np.asarray(record["union"], np.int64), float(record["ap_sum"]), float(record["f1_sum"]),
                   int(record["images"]))


@dataclass
class ImagenetSState:
    """Sums over images of ImageNet-S's counts for classes 0..`num_classes` (0 = other; see the module)."""

    num_classes: int
    pred: np.ndarray = None
    label: np.ndarray = None
    intersect: np.ndarray = None
    sized: np.ndarray = None
    """(4 bins, 3 counts: pred, label, intersect, K + 1 classes)."""
    fmeasure_sum: float = 0.0
    accuracy_sum: float = 0.0
    images: int = 0

    def __post_init__(self):
        k = self.num_classes + 1
        for name in ("pred", "label", "intersect"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(k, np.int64))
        if self.sized is None:
            self.sized = np.zeros((len(SIZE_BINS), 3, k), np.int64)

    def _counts(self, p: np.ndarray, t: np.ndarray) -> np.ndarray:
        k = self.num_classes + 1
        return np.stack([np.bincount(p, minlength=k), np.bincount(t, minlength=k), np.bincount(p[p == t], minlength=k)])

    def add(self, pred: np.ndarray, gt: np.ndarray, beta: float = 0.3) -> "ImagenetSState":
        """One image: `pred` and `gt` (H, W) class ids 0..K (`gt` may hold 1000 = ignore)."""
        pred, gt = np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
        k = self.num_classes + 1
        keep = gt != IMAGENET_S_IGNORE
        bad = np.unique(gt[keep][(gt[keep] < 0) | (gt[keep] >= k)])
        if bad.size:
            raise ValueError(f"label class ids must lie in 0..{k - 1} or be {IMAGENET_S_IGNORE}; found {bad[:5].tolist()}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted class ids must lie in 0..{k - 1}")
        p, t = pred[keep], gt[keep]
        counts = self._counts(p, t)
        self.pred += counts[0]
        self.label += counts[1]
        self.intersect += counts[2]
        truth, output = t > 0, p > 0  # the F-measure of foreground (any class) against "other"
        tp, n_true, n_pred = float((truth & output).sum()), float(truth.sum()), float(output.sum())
        recall, precision = tp / (n_true + 1e-20), tp / (n_pred + 1e-20)
        self.fmeasure_sum += (1 + beta) * precision * recall / (beta * precision + recall + 1e-20)
        top = int(np.argmax(counts[0][1:])) + 1  # image-level accuracy: the most predicted class is present
        self.accuracy_sum += float(counts[1][top] > 0 and counts[0][top] > 0)
        whole = np.bincount(gt.ravel())  # shares of the whole image, the ignored pixels counted (as the reference)
        bins: dict[int, list[int]] = {}
        for c in np.unique(t[t > 0]):
            share = math.ceil(100.0 * whole[c] / whole.sum())
            bins.setdefault(0 if share <= 5 else 1 if share <= 25 else 2 if share <= 50 else 3, []).append(int(c))
        for b, classes in bins.items():  # a bin's sums: its classes' pixels and the image's "other" pixels
            chosen = (t == 0) | np.isin(t, classes)
            self.sized[b] += self._counts(p[chosen], t[chosen])
        self.images += 1
        return self

    def __iadd__(self, other: "ImagenetSState") -> "ImagenetSState":
        if other.num_classes != self.num_classes:
            raise ValueError(f"ImageNet-S states of {self.num_classes} and {other.num_classes} classes cannot merge")
        for name in ("pred", "label", "intersect", "sized"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.fmeasure_sum += other.fmeasure_sum
        self.accuracy_sum += other.accuracy_sum
        self.images += other.images
        return self

    def result(self) -> dict:
        iou = self.intersect / (self.pred + self.label - self.intersect + 1e-10)
        out = {"miou": float(iou.mean()), "fmeasure": self.fmeasure_sum / self.images if self.images else float("nan"),
               "accuracy": self.accuracy_sum / self.images if self.images else float("nan"), "images": self.images}
        for b, name in enumerate(SIZE_BINS):
            p, t, i = self.sized[b]
            present = t > 0
            out[f"miou_{name}"] = float((i / (p + t - i + 1e-10))[present].mean()) if present.any() else float("nan")
        return out

    def to_record(self, sparse: bool = False) -> dict:
        """The sums as JSON; `sparse`: only the class ids with a count (`ids`), as one image's record holds them."""
        arrays = {"pred": self.pred, "label": self.label, "intersect": self.intersect, "sized": self.sized}
        out: dict = {"num_classes": self.num_classes}
        if sparse:
            ids = np.flatnonzero(self.pred + self.label + self.intersect + self.sized.sum(axis=(0, 1)))
            out["ids"] = ids.tolist()
            arrays = {k: v[..., ids] for k, v in arrays.items()}
        out.update({k: v.tolist() for k, v in arrays.items()})
        return {**out, "fmeasure_sum": self.fmeasure_sum, "accuracy_sum": self.accuracy_sum, "images": self.images}

    @classmethod
    def from_record(cls, record: dict) -> "ImagenetSState":
        state = cls(int(record["num_classes"]))
        ids = record.get("ids")
        for name in ("pred", "label", "intersect", "sized"):
            values = np.asarray(record[name], np.int64)
            if ids is None:
                getattr(state, name)[...] = values
            elif len(ids):
                getattr(state, name)[..., np.asarray(ids, np.int64)] = values
        state.fmeasure_sum, state.accuracy_sum = float(record["fmeasure_sum"]), float(record["accuracy_sum"])
        state.images = int(record["images"])
        return state


def chefer_seg_pair(heatmap: np.ndarray, mask: np.ndarray) -> dict:
    """One pair's `chefer-seg` record: `ImagenetSegState` of the raw-size map and bool mask at SEG_SIZE squared."""
    import cv2

    h = np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if h.shape != np.asarray(mask).shape:
        raise ValueError(f"map {h.shape} and mask {np.asarray(mask).shape} differ in size")
    small = cv2.resize(h, (SEG_SIZE, SEG_SIZE), interpolation=cv2.INTER_LINEAR)
    truth = cv2.resize(np.asarray(mask, np.uint8), (SEG_SIZE, SEG_SIZE), interpolation=cv2.INTER_NEAREST)
    return ImagenetSegState().add(small, (truth > 0).astype(np.uint8)).to_record()


def imagenet_s_pair(heatmap: np.ndarray, labels: np.ndarray, class_id: int, num_classes: int) -> dict:
    """One pair's `imagenet-s` record: the map's foreground (above its own mean after min-max) predicted as
    `class_id`, the rest as other (0), scored against the image's label map (ids 0..K, 1000 ignored); sparse."""
    h = np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if h.shape != labels.shape:
        raise ValueError(f"map {h.shape} and label map {labels.shape} differ in size")
    _, fg, _ = mean_binarised(h)
    pred = np.where(fg, int(class_id), 0)
    return ImagenetSState(int(num_classes)).add(pred, labels).to_record(sparse=True)


POINT_THRESHOLD = 0.5


def point_counts(heatmap: np.ndarray, points) -> np.ndarray:
    """One (image, class) pair's point confusion counts (tp, fn, fp, tn) for OpenImages V7 point labels: the map
    min-max normalised (a constant map is all background) and foreground where it exceeds 0.5; each point
    `(x, y, yes)` in pixels is read at the pixel (floor, clipped into the image) and counted as a yes or no point.
    This follows the only public reconstruction of GEM's and LeGrad's p-mIoU (no official script exists)."""
    r = normalised_map(np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0, posinf=0.0, neginf=0.0))
    fg = r > np.float32(POINT_THRESHOLD)
    height, width = fg.shape
    counts = np.zeros(4, np.int64)  # tp, fn, fp, tn
    for x, y, yes in points:
        inside = fg[min(max(int(math.floor(y)), 0), height - 1), min(max(int(math.floor(x)), 0), width - 1)]
        counts[(0 if inside else 1) if yes else (2 if inside else 3)] += 1
    return counts


def point_miou(counts) -> float:
    """The mean of the foreground IoU tp / (tp + fp + fn) and the background IoU tn / (tn + fp + fn), each
    denominator + 1e-8 as the reconstruction computes them (an empty class scores 0)."""
    tp, fn, fp, tn = (float(c) for c in counts)
    return (tp / (tp + fp + fn + 1e-8) + tn / (tn + fp + fn + 1e-8)) / 2


@dataclass
class PointsState:
    """p-mIoU over (image, class) pairs, both averages (the papers do not say which they use): `pair_mean`, the
    mean over pairs of each pair's p-mIoU (the reconstruction's); `class_mean`, per class the counts summed over
    its pairs, its p-mIoU from them, averaged over classes. The per-pair terms are summed as exact fractions, so
    states merged in any order (shards, resumes) give one run's values bit for bit."""

    miou_sum: Fraction = Fraction(0)
    pairs: int = 0
    per_class: dict = field(default_factory=dict)

    def add(self, heatmap: np.ndarray, points, category) -> "PointsState":
        return self.add_counts(point_counts(heatmap, points), category)

    def add_counts(self, counts, category) -> "PointsState":
        """One pair's (tp, fn, fp, tn), as `point_counts` gives them and a run's record holds them."""
        counts = np.asarray(counts, np.int64)
        self.miou_sum += Fraction(point_miou(counts))
        self.pairs += 1
        self.per_class[category] = self.per_class.get(category, np.zeros(4, np.int64)) + counts
        return self

    def __iadd__(self, other: "PointsState") -> "PointsState":
        self.miou_sum += other.miou_sum
        self.pairs += other.pairs
        for category, counts in other.per_class.items():
            self.per_class[category] = self.per_class.get(category, np.zeros(4, np.int64)) + counts
        return self

    def result(self) -> dict:
        classes = [point_miou(self.per_class[c]) for c in sorted(self.per_class, key=str)]
        return {"p_miou_pair_mean": float(self.miou_sum / self.pairs) if self.pairs else float("nan"),
                "p_miou_class_mean": float(np.mean(classes)) if classes else float("nan"), "pairs": self.pairs,
                "classes": len(classes)}
