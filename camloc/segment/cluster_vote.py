"""CLIPtrase's cluster vote (Shao et al., ECCV 2024; leaves162/CLIPtrase `clip_self_correlation.py` and
`clip_utils/attn2.py` at 8fb4d74, MIT as of 8815df1, read, not copied): a post-step of its harness over the class map
of a whole centre-cropped image (`--ovseg-geometry centre-crop`, one window).

- S: the second-to-last block's token self-similarity, per head the mean of the cosines of q with q, k with k and v
  with v (its `self_out_weight` weights), averaged over the heads; each patch's row minus the class token's row,
  clamped at 0: A (hw, hw).
- DBSCAN (scikit-learn, Euclidean, `eps`, `min_samples`) clusters the patches by their rows of A; with no cluster the
  class map stays as it is.
- Each cluster's mean row of A, as an h x w map, is resized bilinearly to 4h x 4w, median-filtered (SciPy, size 7,
  its default reflecting border), resized bilinearly to the class map's size; each pixel joins the cluster whose map
  is largest there.
- Each cluster's pixels take the class most of them were predicted (a tie goes to the smallest class index, and,
  where the dataset has a background class, background, which the reference appends after the classes, last).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from camloc.errors import OptionError

RATIO = 4
"""The reference's smoothing scale: cluster maps at 4 x the patch grid, median filter of size 2 x 4 - 1."""


def token_self_similarity(ctx, block: int) -> torch.Tensor:
    """(N, N) for block `block`'s input (0-based): per head the mean of cos(q_i, q_j), cos(k_i, k_j) and
    cos(v_i, v_j), averaged over the heads (CLIPtrase's `self_out_weight` attention weights)."""
    _, inputs = ctx.block_inputs(block)
    access = ctx.block_access(block)
    with torch.no_grad():
        q, k, v = access.qkv(access.ln_1(inputs[0]))  # (1, heads, N, d)
        total = 0
        for t in (q, k, v):
            unit = F.normalize(t.float(), dim=-1)
            total = total + unit @ unit.transpose(-2, -1)
        return (total / 3.0)[0].mean(dim=0)


def cluster_vote(pred: torch.Tensor, similarity: torch.Tensor, grid: tuple[int, int], eps: float, min_samples: int,
                 prefix: int = 1, background: bool = False) -> torch.Tensor:
    """The class map `pred` (H, W) after CLIPtrase's cluster vote over the token self-similarity (N, N) of a
    `grid` (h, w) of patches after `prefix` tokens (the class token's row is the one subtracted)."""
    from scipy.ndimage import median_filter
    from sklearn.cluster import DBSCAN

    h, w = grid
    if prefix < 1:
        raise OptionError("ovseg cluster_vote subtracts the class token's row, and this model has no class token")
    rows = (similarity[prefix:, prefix:] - similarity[0:1, prefix:]).clamp(min=0).cpu()
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(rows.numpy())
    clusters = sorted(int(c) for c in np.unique(labels) if c >= 0)
    if not clusters:
        return pred
    labels = torch.from_numpy(labels)
    maps = torch.stack([rows[labels == c].mean(dim=0) for c in clusters]).reshape(len(clusters), h, w)
    maps = F.interpolate(maps[None], size=(RATIO * h, RATIO * w), mode="bilinear", align_corners=False)[0].numpy()
    maps = torch.from_numpy(np.stack([median_filter(m, size=RATIO * 2 - 1) for m in maps]))
    maps = F.interpolate(maps[None], size=tuple(pred.shape), mode="bilinear", align_corners=False)[0]
    member = maps.argmax(dim=0)
    out = pred.clone()
    for index in range(len(clusters)):
        region = member == index
        values, counts = torch.unique(pred[region], return_counts=True)
        if not len(values):
            continue
        if background:  # the reference's background is its last class: among tied counts it loses
            order = torch.where(values == 0, torch.iinfo(values.dtype).max, values)
            best = counts.max()
            out[region] = values[counts == best][order[counts == best].argmin()]
        else:
            out[region] = values[counts.argmax()]
    return out
