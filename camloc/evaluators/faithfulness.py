"""Faithfulness protocols: does the map order the pixels the way the model uses them?

Each is scored with the model (its forwards on perturbed copies of the image), on the pair's raw-size
map (the map every protocol scores), with CLIP's zero-shot text targets. Definitions, and their sources:

- `deletion-rise` / `insertion-rise` (Petsiuk, Das and Saenko, "RISE: Randomized input sampling for
  explanation of black-box models", BMVC 2018; eclique/RISE `evaluation.py`, `CausalMetric` and `auc`).
  The map is resized (OpenCV INTER_LINEAR) to the model's n x n input, the same squash the image gets;
  pixels are ranked by it, highest first (ties in row-major order). At point i = 0..S (S = `steps`)
  the first `i * n² // S` ranked pixels are moved: deletion starts from the image and replaces them by
  the baseline; insertion starts from the baseline and puts the image's pixels back. The baseline is
  in the model's normalised input: `zero` (0 there = the mean colour of the model's normalisation,
  what RISE's `torch.zeros_like` on normalised tensors gives), `blur` (Gaussian, 11 x 11, sigma 5:
  RISE's `gkern(11, 5)`, here the normalised sampled Gaussian) or `mean` (the image's own per-channel
  mean). RISE's defaults: deletion to zero, insertion from blur. The score at each point is the softmax
  probability of the pair's prompt among the image's prompts (CLIP's logits: exp(logit_scale) * cos
  + logit_bias), or its cosine (`score="cosine"`); a softmax over one prompt is 1 whatever the image,
  so such pairs record no curve (None). AUC = RISE's trapezoid `(sum(a) - a[0]/2 - a[-1]/2) / S`.
  Lower deletion and higher insertion are better. RISE's own step count is pixels per step (224 at
  224 x 224, i.e. S = 224, the default here); S that divides n² gives RISE's points exactly.
- `deletion-eclip` (Zhao et al., "Gradient-based visual explanation for transformer-based CLIP",
  ICML 2024; Cyang-Zhao/Grad-Eclip `imagenet_eval_deletion.py` at 5c1b5cc): at the image's own
  resolution, L = 100 steps of `max(1, int(H * W / (2 L)))` pixels each, in map order, are replaced by
  uniform random RGB values (`uint8(rand * 255)`), so at most half of the pixels; the image is
  preprocessed (camloc's squash) and classified zero-shot over the dataset's prompts every 10 steps,
  plus the clean image: 11 points. Each record keeps the rank of the pair's prompt at each point (0 =
  top-1), so any top-k is a function of the records; the summary gives the top-1 accuracy per point,
  its AUC (the same trapezoid over the 11 points) and the accuracy at 50 % (the last point). The
  vocabulary is the run's prompts (every pair's class; --limit and --classes narrow it). Deviations: the random
  values are drawn once per image (seeded by the run's seed and the image id) so every method sees the
  same noise; the images are not capped at 640 pixels on the short side; camloc's prompt template,
  not the 80 ImageNet templates, makes the classifier.
- `road` (Rong et al., "A consistent and efficient evaluation strategy for attribution methods",
  ICML 2022), pytorch-grad-cam's definition (`metrics/road.py`, `perturbation_confidence.py`): on the
  model's input with the map resized to it and min-max scaled to [0, 1], MoRF at percentile p keeps
  the pixels whose map value is below `np.percentile(map, p)` (p = 80 removes the top 20 %), LeRF the
  pixels whose `1 - map` is below its p-th percentile (p = 20 removes the lowest 80 %); the removed
  pixels are filled by the noisy linear imputer (each missing pixel the weighted mean of its 8
  neighbours, 1/6 axial and 1/12 diagonal, one sparse linear system per image, plus 0.01 x N(0, 1)
  noise). Value = score(imputed) - score(image) with the score above. Summary: MoRF and LeRF averaged
  over the percentiles and pairs, and pytorch-grad-cam's `ROADCombined` = (LeRF - MoRF) / 2. Quantus'
  ROAD counts its percentages the other way (percent removed, most relevant first) and scores
  accuracy, not a confidence: its numbers are not these.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from fractions import Fraction

import cv2
import numpy as np
import torch

FAITH_PROTOCOLS = ("deletion-rise", "insertion-rise", "deletion-eclip", "road")
BASELINES = ("zero", "blur", "mean")
SCORES = ("softmax", "cosine")
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01
ECLIP_STEPS = 100
ECLIP_EVERY = 10
BLUR_SIZE, BLUR_SIGMA = 11, 5.0


@dataclass
class FaithSettings:
    """Every setting of the faithfulness protocols (recorded in the run identity as `faith`)."""

    steps: int = 224
    baseline_deletion: str = "zero"
    baseline_insertion: str = "blur"
    score: str = "softmax"
    road_percentiles: list = field(default_factory=lambda: list(ROAD_PERCENTILES))
    road_noise: float = ROAD_NOISE
    eclip_steps: int = ECLIP_STEPS
    eclip_every: int = ECLIP_EVERY

    @classmethod
    def resolve(cls, steps: int = 224, baseline: str | None = None, score: str = "softmax",
                road_percentiles=None) -> "FaithSettings":
        """The settings of the options (`--faith-steps`, `--faith-baseline` for both curves, else RISE's
        zero / blur, `--faith-score`, `--road-percentiles`), checked: a bad one is an OptionError."""
        from camloc.errors import OptionError

        if not (isinstance(steps, int) and steps >= 1):
            raise OptionError(f"--faith-steps must be a whole number of 1 or more, got {steps!r}")
        if baseline is not None and baseline not in BASELINES:
            raise OptionError(f"--faith-baseline {baseline!r} is not one of {', '.join(BASELINES)}")
        if score not in SCORES:
            raise OptionError(f"--faith-score {score!r} is not one of {', '.join(SCORES)}")
        percentiles = parse_percentiles(road_percentiles)
        return cls(steps=steps, baseline_deletion=baseline or "zero", baseline_insertion=baseline or "blur",
                   score=score, road_percentiles=percentiles)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "baseline_deletion": self.baseline_deletion,
                "baseline_insertion": self.baseline_insertion, "score": self.score,
                "road_percentiles": list(self.road_percentiles), "road_noise": self.road_noise,
                "eclip_steps": self.eclip_steps, "eclip_every": self.eclip_every}


def parse_percentiles(value) -> list:
    """`"10,20"` or a list -> sorted unique numbers in (0, 100); None -> pytorch-grad-cam's 10..90."""
    from camloc.errors import OptionError

    if value is None:
        return list(ROAD_PERCENTILES)
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = sorted({float(v) for v in items if str(v).strip()})
    except ValueError:
        raise OptionError(f"--road-percentiles must be a comma list of numbers in (0, 100), got {value!r}") from None
    if not numbers or not all(0 < p < 100 for p in numbers):
        raise OptionError(f"--road-percentiles must be a comma list of numbers in (0, 100), got {value!r}")
    return [int(p) if p == int(p) else p for p in numbers]


def auc(values) -> float:
    """RISE's trapezoid over equally spaced points, on [0, 1]: (sum - first/2 - last/2) / (n - 1)."""
    a = np.asarray(values, dtype=np.float64)
    return float((a.sum() - a[0] / 2 - a[-1] / 2) / (len(a) - 1))


def input_map(heatmap: np.ndarray, size: int) -> np.ndarray:
    """The raw-size map resized to the model's size x size input (the image's squash), float64."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return cv2.resize(h, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float64)


def pixel_ranks(saliency: np.ndarray) -> np.ndarray:
    """Each pixel's place in the map order (0 = highest; ties in row-major order), the map's shape."""
    order = np.argsort(-saliency.ravel(), kind="stable")
    ranks = np.empty(order.size, np.int64)
    ranks[order] = np.arange(order.size)
    return ranks.reshape(saliency.shape)


def rise_counts(n_pixels: int, steps: int) -> list[int]:
    """Pixels moved at points 0..steps."""
    return [i * n_pixels // steps for i in range(steps + 1)]


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """(3, n, n) -> the same blurred by an 11 x 11 Gaussian of sigma 5 (zero padding, as RISE's conv2d)."""
    t = np.arange(BLUR_SIZE) - BLUR_SIZE // 2
    g = np.exp(-t ** 2 / (2 * BLUR_SIGMA ** 2))
    kernel = torch.as_tensor(np.outer(g, g) / np.outer(g, g).sum(), dtype=x.dtype)
    weight = kernel.expand(x.shape[0], 1, BLUR_SIZE, BLUR_SIZE).contiguous()
    return torch.nn.functional.conv2d(x[None], weight, padding=BLUR_SIZE // 2, groups=x.shape[0])[0]


def baseline_image(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The image a removed pixel takes its value from, in the model's normalised input (3, n, n)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x)
    if kind == "mean":
        return x.mean(dim=(1, 2), keepdim=True).expand_as(x).clone()
    raise ValueError(f"unknown baseline {kind!r}")


def rise_images(x: torch.Tensor, ranks: np.ndarray, counts: list[int], mode: str, substrate: torch.Tensor) -> torch.Tensor:
    """The perturbed inputs (len(counts), 3, n, n) at the given pixel counts: `deletion` moves the first
    count ranked pixels from `x` to `substrate`; `insertion` from `substrate` to `x`."""
    r = torch.as_tensor(ranks, device=x.device)
    moved = torch.stack([r < k for k in counts])[:, None]  # (K, 1, n, n)
    first, second = (x, substrate) if mode == "deletion" else (substrate, x)
    return torch.where(moved, second[None], first[None])


def eclip_images(image: np.ndarray, heatmap: np.ndarray, noise: np.ndarray, steps: int = ECLIP_STEPS,
                 every: int = ECLIP_EVERY) -> list[np.ndarray]:
    """Grad-ECLIP's deletion sequence of an (H, W, 3) uint8 image: after every `every` of `steps` steps of
    `max(1, int(H W / (2 steps)))` pixels (map order, highest first), the image with those pixels
    replaced by `noise`'s."""
    h, w = heatmap.shape
    order = np.argsort(-np.asarray(heatmap, dtype=np.float64).ravel(), kind="stable")
    once = max(1, int(h * w / (2 * steps)))
    flat, source = image.reshape(-1, 3).copy(), noise.reshape(-1, 3)
    out = []
    for step in range(1, steps + 1):
        idx = order[(step - 1) * once:step * once]
        flat[idx] = source[idx]
        if step % every == 0:
            out.append(flat.reshape(h, w, 3).copy())
    return out


def image_noise(seed: int, image_id, shape: tuple[int, int]) -> np.ndarray:
    """The random RGB values (H, W, 3) uint8 of one image's Grad-ECLIP deletion (per run seed and image)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode())])
    return (rng.random((*shape, 3)) * 255.0).astype(np.uint8)


def road_keep(saliency: np.ndarray, percentile: float, kind: str) -> np.ndarray:
    """pytorch-grad-cam's keep mask (True = kept) of a [0, 1] map: `morf` keeps map < its p-th
    percentile; `lerf` keeps 1 - map < the p-th percentile of 1 - map."""
    s = saliency if kind == "morf" else 1 - saliency
    return s < np.percentile(s, percentile)


_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
               ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def impute(x: torch.Tensor, keep: np.ndarray, noise: float = ROAD_NOISE,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation of (C, H, W) `x` where `keep` is False: the missing pixels solve
    `sum_j w_j (v_i - v_j) = 0` over their in-image neighbours j (kept neighbours are constants), one
    sparse system for all channels (scipy's spsolve), plus `noise` x N(0, 1) drawn from `generator`
    as a (C, missing) tensor."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = x.shape
    keep_flat = np.asarray(keep, bool).ravel()
    values = x.detach().cpu().double().numpy().reshape(c, -1)
    missing = np.flatnonzero(~keep_flat)
    if missing.size == 0:
        return x.clone()
    index = np.full(h * w, -1, np.int64)
    index[missing] = np.arange(missing.size)
    ys, xs = np.divmod(missing, w)
    rows, cols, data = [], [], []
    diagonal = np.zeros(missing.size)
    rhs = np.zeros((missing.size, c))
    for (dy, dx), weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (nx >= 0) & (ny < h) & (nx < w)
        eq = np.flatnonzero(inside)
        neighbour = ny[eq] * w + nx[eq]
        diagonal[eq] += weight
        known = keep_flat[neighbour]
        rhs[eq[known]] -= weight * values[:, neighbour[known]].T
        rows.append(eq[~known])
        cols.append(index[neighbour[~known]])
        data.append(np.full(int((~known).sum()), weight))
    rows.append(np.arange(missing.size))
    cols.append(np.arange(missing.size))
    data.append(-diagonal)
    system = coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(missing.size, missing.size)).tocsc()
    solution = spsolve(system, rhs)
    solution = torch.as_tensor(np.asarray(solution).reshape(missing.size, c), dtype=torch.float32).t()
    out = x.detach().cpu().float().reshape(c, -1).clone()
    out[:, missing] = solution + noise * torch.randn(solution.shape, generator=generator)
    return out.reshape(c, h, w).to(x.dtype)


def road_seed(seed: int, image_id, category_id, method: str, kind: str, percentile) -> int:
    """The noise seed of one imputation: fixed per run seed, pair, method, direction and percentile."""
    return zlib.crc32(f"{seed}/{image_id}/{category_id}/{method}/{kind}/{percentile}".encode())


# ---- dataset level -------------------------------------------------------------------------------------

FAITH_COLUMNS = ["deletion_rise", "insertion_rise", "n_rise", "deletion_eclip", "deletion_eclip@50%",
                 "road_morf", "road_lerf", "road_combined"]
"""Table columns of the faithfulness protocols, where a run has them."""


class FaithSums:
    """Exact sums of the faithfulness values over records (merge by `+=`: shards equal one run)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.auc: dict[str, list] = {}  # name -> [sum, n]
        self.curves: dict[str, list] = {}  # name -> [elementwise sum (Fractions), n]
        self.eclip_hits: list[int] | None = None
        self.eclip_n = 0
        self.road: dict[str, list] = {}  # morf/lerf -> [sum of per-pair means, n]

    def add(self, record: dict) -> None:
        for name in ("deletion_rise", "insertion_rise"):
            if name in record:
                self.seen.add(name)
                value = record[name]
                if value is None:
                    continue
                total = self.auc.setdefault(name, [Fraction(0), 0])
                total[0] += Fraction(value["auc"])
                total[1] += 1
                self._add_curve(name, [Fraction(v) for v in value["curve"]])
        if "deletion_eclip" in record:
            self.seen.add("deletion_eclip")
            ranks = record["deletion_eclip"]["ranks"]
            hits = [int(r == 0) for r in ranks]
            if self.eclip_hits is not None and len(self.eclip_hits) != len(hits):
                raise ValueError("deletion-eclip curves of different lengths cannot be merged")
            self.eclip_hits = hits if self.eclip_hits is None else [a + b for a, b in zip(self.eclip_hits, hits)]
            self.eclip_n += 1
        if "road" in record:
            self.seen.add("road")
            value = record["road"]
            if value is not None:
                for kind in ("morf", "lerf"):
                    total = self.road.setdefault(kind, [Fraction(0), 0])
                    total[0] += sum(Fraction(v) for v in value[kind]) / len(value[kind])
                    total[1] += 1

    def _add_curve(self, name: str, curve: list) -> None:
        if name not in self.curves:
            self.curves[name] = [curve, 1]
            return
        total = self.curves[name]
        if len(total[0]) != len(curve):
            raise ValueError(f"{name} curves of different lengths cannot be merged")
        total[0] = [a + b for a, b in zip(total[0], curve)]
        total[1] += 1

    def __iadd__(self, other: "FaithSums") -> "FaithSums":
        self.seen |= other.seen
        for name, (s, n) in other.auc.items():
            total = self.auc.setdefault(name, [Fraction(0), 0])
            total[0] += s
            total[1] += n
        for name, (curve, n) in other.curves.items():
            if name not in self.curves:
                self.curves[name] = [list(curve), n]
            else:
                self.curves[name] = [[a + b for a, b in zip(self.curves[name][0], curve)], self.curves[name][1] + n]
        if other.eclip_hits is not None:
            self.eclip_hits = (list(other.eclip_hits) if self.eclip_hits is None
                               else [a + b for a, b in zip(self.eclip_hits, other.eclip_hits)])
        self.eclip_n += other.eclip_n
        for kind, (s, n) in other.road.items():
            total = self.road.setdefault(kind, [Fraction(0), 0])
            total[0] += s
            total[1] += n
        return self

    def result(self) -> dict:
        out: dict = {}
        curves: dict = {}
        for name in ("deletion_rise", "insertion_rise"):
            if name in self.seen:
                s, n = self.auc.get(name, [0, 0])
                out[name] = float(s / n) if n else None
                if name in self.curves:
                    curve, k = self.curves[name]
                    curves[name] = [float(v / k) for v in curve]
        if self.seen & {"deletion_rise", "insertion_rise"}:
            out["n_rise"] = max(self.auc.get(n, [0, 0])[1] for n in ("deletion_rise", "insertion_rise"))
        if "deletion_eclip" in self.seen and self.eclip_n:
            accuracy = [h / self.eclip_n for h in self.eclip_hits]
            curves["deletion_eclip"] = accuracy
            out["deletion_eclip"] = auc(accuracy)
            out["deletion_eclip@50%"] = accuracy[-1]
        if "road" in self.seen:
            morf, lerf = (float(self.road[k][0] / self.road[k][1]) if self.road.get(k, [0, 0])[1] else None
                          for k in ("morf", "lerf"))
            out.update({"road_morf": morf, "road_lerf": lerf,
                        "road_combined": (lerf - morf) / 2 if morf is not None and lerf is not None else None})
        if curves:
            out["faith_curves"] = curves
        return out
