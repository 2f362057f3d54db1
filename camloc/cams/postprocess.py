"""Map post-processing shared by the methods (docs/protocol.md §3)."""
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
    maps /= top + eps  # in place: maps is already a fresh array
    return maps


def resize_maps(maps: np.ndarray, raw_size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) float32 -> (P, H, W) with OpenCV INTER_LINEAR, the original's resize."""
    width, height = raw_size
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def to_native(kind: str, maps: torch.Tensor) -> np.ndarray:
    """A method's maps (P, h, w) at its native resolution, normalised to [0, 1] on the device, then
    moved to the host: the form the heatmap cache stores. `kind` is the method's `postprocess`:
    `grid` (relu, min-max eps 1e-8), `resize_minmax` (GroupCAM: min-max without eps; min-max commutes
    with the linear resize), `resize_minmax_rise` (RISE: the same here, eps 1e-9 after the resize),
    `resize` (HilaCAM: already normalised by the method)."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)  # a NaN map never reaches a table
    if kind == "grid":
        maps = minmax_(maps.clamp_min(0))
    elif kind in ("resize_minmax", "resize_minmax_rise"):
        maps = minmax_(maps, eps=0)
    elif kind != "resize":
        raise ValueError(f"unknown post-processing kind {kind!r}")
    return maps.cpu().numpy()


def native_to_raw(kind: str, native: np.ndarray, raw_size: tuple[int, int]) -> np.ndarray:
    """Native maps (P, h, w) -> raw-size heatmaps (P, H, W) float32 (docs/protocol.md §3): OpenCV INTER_LINEAR
    resize to (W, H), then `grid`: relu and min-max (eps 1e-8); `resize_minmax`: min-max without eps;
    `resize`: nothing more. Deterministic, so cached native maps re-derive the same raw maps."""
    raw = resize_maps(np.asarray(native, dtype=np.float32), raw_size)
    if kind == "grid":
        raw = minmax_(np.maximum(raw, 0, out=raw))
    elif kind == "resize_minmax":
        raw = minmax_(raw, eps=0)
    elif kind == "resize_minmax_rise":  # RISE's own: h -= min; h /= max + 1e-9 (after its resize)
        raw = minmax_(raw, eps=1e-9)
    return raw.astype(np.float32, copy=False)


def grid_maps_to_raw(maps: torch.Tensor, raw_size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) grid maps -> (P, H, W) float32 raw-size heatmaps in [0, 1]: relu, min-max (eps 1e-8)
    on the device, OpenCV INTER_LINEAR resize to (W, H) on the host, relu, min-max again. Only the
    small grid maps travel to the host."""
    return native_to_raw("grid", to_native("grid", maps), raw_size)
