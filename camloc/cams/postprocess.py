"""Map post-processing shared by the methods (spec §3)."""
from __future__ import annotations

import cv2
import numpy as np
import torch


def minmax_(maps: torch.Tensor | np.ndarray, eps: float = 1e-8):
    """Per-map `M -= min(M); M /= max(M) + eps` over the last two axes. With `eps=0` the division is
    by the bare range (as the original does for GroupCAM and HilaCAM); a constant map becomes zeros."""
    if isinstance(maps, torch.Tensor):
        flat = maps.flatten(-2)
        flat = flat - flat.amin(dim=-1, keepdim=True)
        top = flat.amax(dim=-1, keepdim=True)
        if eps == 0:
            top = torch.where(top > 0, top, torch.ones_like(top))
        return (flat / (top + eps)).view_as(maps)
    maps = maps - maps.min(axis=(-2, -1), keepdims=True)
    top = maps.max(axis=(-2, -1), keepdims=True)
    if eps == 0:
        top = np.where(top > 0, top, 1)
    return maps / (top + eps)


def resize_maps(maps: np.ndarray, raw_size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) float32 -> (P, H, W) with OpenCV INTER_LINEAR, the original's resize."""
    width, height = raw_size
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def grid_maps_to_raw(maps: torch.Tensor, raw_size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) grid maps -> (P, H, W) float32 raw-size heatmaps in [0, 1]:
    relu, min-max (eps 1e-8), OpenCV INTER_LINEAR resize to (W, H), relu, min-max again.

    The first stage runs on the maps' device; only the small grid maps travel to the host, where
    OpenCV does the resize exactly as the original implementation did.
    """
    grid = minmax_(maps.float().clamp_min(0)).cpu().numpy()
    return minmax_(np.maximum(resize_maps(grid, raw_size), 0)).astype(np.float32, copy=False)


def input_maps_to_raw(maps: torch.Tensor, raw_size: tuple[int, int]) -> np.ndarray:
    """GroupCAM: (P, n, n) un-normalised maps -> resize to (W, H), then min-max without eps (spec §3)."""
    return minmax_(resize_maps(maps.float().cpu().numpy(), raw_size), eps=0).astype(np.float32, copy=False)


def normalized_maps_to_raw(maps: torch.Tensor, raw_size: tuple[int, int]) -> np.ndarray:
    """HilaCAM: maps already min-max normalised by the method -> resize to (W, H) only (spec §3)."""
    return resize_maps(maps.float().cpu().numpy(), raw_size)
