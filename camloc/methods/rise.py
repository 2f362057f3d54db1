"""RISE (Petsiuk et al., BMVC 2018, "RISE: Randomized input sampling for explanation of black-box
models"), as the original gScoreCAM code ships it (`pytorch_grad_cam/rise.py`), on any family.

N random binary s x s grids (each cell on with probability p1) are upsampled bilinearly to
(s + 1) * cell pixels (cell = ceil(n / s); half-pixel centres, mirrored borders: the closed form of
the original's `skimage.transform.resize(order=1, mode="reflect")`) and cropped at a random shift to
n x n. The masked images `mask * x` (x the normalised input) are encoded once and scored against ALL
prompts with one matrix product, so P prompts cost one prompt's forwards. Saliency =
sum_i score_i * mask_i / N / p1 per prompt (score = the CLIP logit), resized to the raw image with
OpenCV INTER_LINEAR and min-max normalised with eps 1e-9 (postprocess `resize_minmax_rise`).

The masks are drawn from NumPy's legacy generator seeded with `--seed` in the original's order (all
grids, then each mask's row and column shift), so `--seed S` reproduces the original's masks for
`np.random.seed(S)`; `--rise-masks-file FILE.npz` (key `masks`, (N, n, n) float32) uses given masks.
Masks are built chunk by chunk on the fly (8000 masks at 224 px would be 1.6 GB).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from camloc.cams.context import CamContext
from camloc.cams.masked import encode_in_chunks
from camloc.cams.options import at_least, method_option
from camloc.cams.registry import register_method
from camloc.errors import OptionError


def _probability(value: float) -> float:
    if not 0 < value <= 1:
        raise OptionError(f"RISE needs 0 < --rise-p1 <= 1, got {value}")
    return value


MASKS = method_option("rise_masks", int, 8000, "RISE: number of random masks (the original's default 8000).",
                      at_least("--rise-masks", 1))
CELL = method_option("rise_cell", int, 8, "RISE: grid cells per side (s).", at_least("--rise-cell", 1))
P1 = method_option("rise_p1", float, 0.1, "RISE: probability that a grid cell is kept.", _probability)
MASKS_FILE = method_option("rise_masks_file", Path, None, "RISE: use these masks (.npz with key masks, (N, n, n) "
                           "float32) instead of drawing them from --seed.")
DEFAULTS = {option.name: option.default for option in (MASKS, CELL, P1)}


def upsampling_matrix(s: int, size: int) -> np.ndarray:
    """(size, s) float64: bilinear interpolation from s cells to `size` pixels, half-pixel centres,
    source coordinates mirrored at the borders (skimage's order=1, mode="reflect")."""
    out = np.zeros((size, s))
    for o in range(size):
        c = (o + 0.5) * s / size - 0.5
        if c < 0:
            c = -c
        if c > s - 1:
            c = 2 * (s - 1) - c
        low = int(math.floor(c))
        frac = c - low
        out[o, low] += 1 - frac
        if frac > 0:
            out[o, low + 1] += frac
    return out


def draw_grids(n_masks: int, s: int, p1: float, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(grids (N, s, s) bool, shifts (N, 2) int) in the original's order of draws."""
    rng = np.random.RandomState(seed)
    grids = rng.rand(n_masks, s, s) < p1
    cell = math.ceil(size / s)
    shifts = np.array([(rng.randint(0, cell), rng.randint(0, cell)) for _ in range(n_masks)], dtype=np.int64)
    return grids, shifts


class RiseMasks:
    """The N masks of one input size, built on demand from the grids and shifts (or given)."""

    def __init__(self, size: int, n_masks: int, s: int, p1: float, seed: int, file: str | None = None):
        self.size, self.p1 = size, p1
        self.given = None
        if file:
            path = Path(file)
            if not path.is_file():
                raise OptionError(f"--rise-masks-file {path} does not exist")
            with np.load(path) as data:
                if "masks" not in data.files:
                    raise OptionError(f"--rise-masks-file {path} has no 'masks' array (keys: {', '.join(data.files)})")
                masks = data["masks"].astype(np.float32)
            if masks.ndim != 3 or masks.shape[1:] != (size, size):
                raise OptionError(f"--rise-masks-file {path} holds masks of shape {masks.shape}; this model needs "
                                  f"(N, {size}, {size})")
            self.given = masks
            self.n = len(masks)
        else:
            if n_masks < 1 or s < 1 or not 0 < p1 <= 1:
                raise OptionError(f"RISE needs --rise-masks >= 1, --rise-cell >= 1 and 0 < --rise-p1 <= 1 (got "
                                  f"{n_masks}, {s}, {p1})")
            self.grids, self.shifts = draw_grids(n_masks, s, p1, size, seed)
            cell = math.ceil(size / s)
            self.up = upsampling_matrix(s, (s + 1) * cell)
            self.n = n_masks

    def chunk(self, rows: slice) -> np.ndarray:
        """Masks rows as (B, n, n) float32."""
        if self.given is not None:
            return self.given[rows]
        n = self.size
        out = []
        for grid, (x, y) in zip(self.grids[rows], self.shifts[rows]):
            full = self.up @ grid.astype(np.float64) @ self.up.T
            out.append(full[x:x + n, y:y + n])
        return np.stack(out).astype(np.float32)


@register_method("rise", masked_forwards=True, postprocess="resize_minmax_rise",
                 params=("rise_masks", "rise_cell", "rise_p1", "rise_masks_file", "seed"),
                 description="RISE (Petsiuk et al. 2018): score-weighted sum of N random masks; any family.")
def rise(ctx: CamContext) -> torch.Tensor:
    options = {**DEFAULTS, **ctx.options}
    size = ctx.model.input_size
    masks = RiseMasks(size, int(options["rise_masks"]), int(options["rise_cell"]), float(options["rise_p1"]),
                      int(options.get("seed", 0)), options.get("rise_masks_file"))
    device = ctx.model.device
    x = ctx.input.float()
    saliency = torch.zeros(len(ctx.prompts), size * size, dtype=torch.float64, device=device)
    start = 0
    while start < masks.n:
        rows = slice(start, min(start + ctx.chunk_size, masks.n))
        chunk = torch.from_numpy(masks.chunk(rows)).to(device)
        feats = encode_in_chunks(ctx, chunk.shape[0], lambda r: x * chunk[r][:, None])
        scores = ctx.model.scores(feats, ctx.text_features)  # (B, P): every prompt from one forward
        saliency += scores.double().T @ chunk.double().flatten(1)
        ctx.rise_forwards += chunk.shape[0]
        start = rows.stop
    saliency = saliency / masks.n / masks.p1
    return saliency.reshape(len(ctx.prompts), size, size).float()
