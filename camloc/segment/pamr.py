"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, "Single-stage semantic segmentation from image
labels", CVPR 2020; visinf/1-stage-wseg), the refinement NACLIP, CASS and ResCLIP run on the stitched
logits, written out from its definition:

for each pixel i and its 8 neighbours j at each dilation d (the image edge-replicated by d), the image
affinity is a_ij = -|I_i - I_j| / (1e-8 + 0.1 sigma_i), averaged over the colour channels, where sigma_i is
the (unbiased) standard deviation of the 9 x len(dilations) values of the 3 x 3 neighbourhoods of every
dilation, per channel; softmax over the 8 x len(dilations) neighbours; then `steps` times, each class map
m_i <- sum_j softmax(a)_ij m_j.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifted(x: torch.Tensor, dilation: int, offsets) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, len(offsets), H, W): the value at (y + dy d, x + dx d), edges replicated."""
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    return torch.stack([padded[..., dilation + dy * dilation:dilation + dy * dilation + height,
                               dilation + dx * dilation:dilation + dx * dilation + width]
                        for dy, dx in offsets], dim=2)


def pamr(image: torch.Tensor, mask: torch.Tensor, steps: int, dilations=(8, 16)) -> torch.Tensor:
    """Refine `mask` (B, K, H, W) with the affinities of `image` (B, 3, H, W) (same size)."""
    image, mask = image.float(), mask.float()
    if image.shape[-2:] != mask.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    centre_and_neighbours = [(0, 0)] + OFFSETS
    local = torch.cat([_shifted(image, d, centre_and_neighbours) for d in dilations], dim=2)
    sigma = local.std(dim=2, keepdim=True)  # (B, 3, 1, H, W)
    neighbours = torch.cat([_shifted(image, d, OFFSETS) for d in dilations], dim=2)
    affinity = -(image[:, :, None] - neighbours).abs() / (1e-8 + 0.1 * sigma)
    weights = torch.softmax(affinity.mean(dim=1, keepdim=True), dim=2)  # (B, 1, P, H, W)
    for _ in range(steps):
        mask = (torch.cat([_shifted(mask, d, OFFSETS) for d in dilations], dim=2) * weights).sum(dim=2)
    return mask
