"""Map post-processing shared by the methods (spec §3)."""
from __future__ import annotations

import cv2
import numpy as np
import torch


def minmax_(maps: torch.Tensor | np.ndarray, eps: float = 1e-8):
    """Per-map `M -= min(M); M /= max(M) + eps` over the last two axes (in place where possible)."""
    if isinstance(maps, torch.Tensor):
        flat = maps.flatten(-2)
        flat = flat - flat.amin(dim=-1, keepdim=True)
        return (flat / (flat.amax(dim=-1, keepdim=True) + eps)).view_as(maps)
    maps = maps - maps.min(axis=(-2, -1), keepdims=True)
    return maps / (maps.max(axis=(-2, -1), keepdims=True) + eps)


def grid_maps_to_raw(maps: torch.Tensor, raw_size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) grid maps -> (P, H, W) float32 raw-size heatmaps in [0, 1]:
    relu, min-max (eps 1e-8), OpenCV INTER_LINEAR resize to (W, H), relu, min-max again.

    The first stage runs on the maps' device; only the small grid maps travel to the host, where
    OpenCV does the resize exactly as the original implementation did.
    """
    grid = minmax_(maps.float().clamp_min(0)).cpu().numpy()
    width, height = raw_size
    out = np.empty((grid.shape[0], height, width), dtype=np.float32)
    for i, m in enumerate(grid):
        out[i] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return minmax_(np.maximum(out, 0)).astype(np.float32, copy=False)
