"""The geometry of sliding-window inference, as the reference wrapper does it (SCLIP's `forward_slide`,
mmsegmentation's `slide_inference`): the image is resized so its short side is S (long side capped at
2048, mmcv's `imrescale` rounding), cut into crops of C x C with stride T, the last crop of each row and
column aligned to the image's end; each crop's logit grid is upsampled bilinearly to the crop, added
into a canvas (zero outside the crop: the wrapper's padding), and the canvas is divided by how many crops
cover each pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LONG_SIDE_CAP = 2048  # mmseg's Resize(scale=(2048, S), keep_ratio=True)


def rescaled_size(width: int, height: int, short_side: int, long_cap: int = LONG_SIDE_CAP) -> tuple[int, int]:
    """(W', H') of mmcv's keep-ratio rescale: factor min(long_cap / long side, short_side / short side),
    each side int(side * factor + 0.5)."""
    factor = min(long_cap / max(width, height), short_side / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every crop, rows first: grids = max(side - crop + stride - 1, 0) // stride + 1
    per side; a crop that would pass the end is moved back to end there (never before 0)."""
    boxes = []
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def crops(image: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """(3, H, W) -> the crops (n, 3, C, C) (every crop is C x C when the image is at least C on each side)."""
    return torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])


def stitch(grids: torch.Tensor, boxes: list[tuple[int, int, int, int]], height: int, width: int) -> torch.Tensor:
    """(n, K, g, g) per-crop logit grids -> (K, H, W): each upsampled bilinearly (align_corners False) to
    its crop, summed into the canvas, divided by the number of crops covering each pixel."""
    canvas = grids.new_zeros((grids.shape[1], height, width))
    count = grids.new_zeros((1, height, width))
    for grid, (y1, y2, x1, x2) in zip(grids, boxes):
        canvas[:, y1:y2, x1:x2] += F.interpolate(grid[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                 align_corners=False)[0]
        count[:, y1:y2, x1:x2] += 1
    if (count == 0).any():
        raise ValueError("the crops do not cover the image")
    return canvas / count
