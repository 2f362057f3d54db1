"""SC-CLIP (Bai et al., "Self-calibrated CLIP for training-free open-vocabulary segmentation", 2024;
SuleBai/SC-CLIP `clip/model.py` and `scclip_segmentor.py` at 0417ba9, read only: the repository has no
licence). From the image's one forward, with F_i the output of block i (1-based) and d blocks:

1. The penultimate output's patch tokens: outliers by a local-outlier-factor score (the reference's own
   form: squared distances, the k = 30 nearest, each point's reach distance its own k-distance, LOF =
   the neighbours' mean density over its own; the top 5 % above the 0.95 quantile), each outlier replaced
   by the mean of its non-outlier 8-neighbours; its class token c kept aside.
2. Patch similarity M = cos of F_pre's patch tokens (the same outliers replaced); the tokens are
   aggregated with M thresholded at `--scclip-beta` (0.4) and row-normalised.
3. The last block's attention on those tokens alone: mean of softmax((M - mean M) 3, negatives -inf) and
   softmax(k k^T / sqrt(d)), out_proj, no residual or FFN, plus `--scclip-res-cls` (0.3) times c; then
   aggregated again with the thresholded similarity of F_post's patch tokens.
4. Multi-level fusion: the sum of F_start..F_end-1 through the same attention (plus 0.3 times its own class
   token), aggregated the same way, added.

`--scclip-layers pre,post,start-end` counts like the reference's lists of block outputs (0 = block 1's
output): its 8,3,3-10 on ViT-B's 12 blocks; `auto` scales those to the model's depth. The rest of the tower
per token (`dense_tokens`) gives every patch its cosine with the prompts. Deviations: k is at most the
number of patches - 1 (small grids); a tower without a class token (SigLIP) has no class-token term; the
given prompts instead of averaged templates, the whole input instead of sliding windows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.methods.dense import similarity_attention, square_grid
from camloc.cams.options import between, method_option
from camloc.cams.registry import register_method
from camloc.errors import OptionError
from camloc.models.families import dense_tokens

LOF_NEIGHBOURS, LOF_CONTAMINATION = 30, 0.05
REFERENCE_LAYERS, REFERENCE_DEPTH = (8, 3, 3, 10), 12


def _layers(value: str) -> str:
    if str(value) == "auto":
        return "auto"
    try:
        pre, post, span = str(value).split(",")
        start, end = span.split("-")
        numbers = [int(pre), int(post), int(start), int(end)]
    except ValueError:
        raise OptionError(f"--scclip-layers {value!r} must be auto or pre,post,start-end (the reference's 8,3,3-10)")
    if min(numbers) < 0 or numbers[2] >= numbers[3]:
        raise OptionError(f"--scclip-layers {value!r}: indices from 0, start < end")
    return f"{numbers[0]},{numbers[1]},{numbers[2]}-{numbers[3]}"


LAYERS = method_option("scclip_layers", str, "auto", "SC-CLIP: pre,post,start-end block outputs (0 = block 1's; the "
                       "reference's 8,3,3-10 on 12 blocks); auto scales them to the model's depth.", _layers)
BETA = method_option("scclip_beta", float, 0.4, "SC-CLIP: similarities below this are dropped from the aggregation "
                     "(the reference's 0.4).", between("--scclip-beta", 0, 1))
RES_CLS = method_option("scclip_res_cls", float, 0.3, "SC-CLIP: weight of the class token added to every patch "
                        "token after the last block (the reference's 0.3).", between("--scclip-res-cls", 0, 1))


def resolve_layers(value: str, depth: int) -> tuple[int, int, int, int]:
    """(pre, post, start, end) indices into the d - 1 block outputs before the last block."""
    outputs = depth - 1
    if value == "auto":
        pre, post, start, end = (round(i * depth / REFERENCE_DEPTH) for i in REFERENCE_LAYERS)
        pre, post, start = (min(outputs - 1, i) for i in (pre, post, start))
        end = max(start + 1, min(outputs, end))
    else:
        head, span = value.split(",")[:2], value.split(",")[2]
        pre, post = (int(v) for v in head)
        start, end = (int(v) for v in span.split("-"))
    if max(pre, post, start) >= outputs or end > outputs:
        raise OptionError(f"--scclip-layers {value}: {depth} blocks give block outputs 0..{outputs - 1} before the last")
    return pre, post, start, end


def lof_outliers(x: torch.Tensor, neighbours: int, contamination: float) -> torch.Tensor:
    """A (N,) bool mask of the outliers among the rows of `x` by the reference's local outlier factor."""
    distances = torch.cdist(x.float(), x.float()) ** 2
    near, index = torch.topk(distances, k=neighbours + 1, largest=False)
    near, index = near[:, 1:], index[:, 1:]  # the point itself first
    reach = torch.maximum(near, near[:, -1:].expand_as(near))
    density = neighbours / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    score = (density[index] / density[:, None]).mean(dim=1)
    return score > torch.quantile(score, 1 - contamination)


def neighbour_mean(tokens: torch.Tensor, outliers: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, D) patch tokens with each outlier replaced by the mean of its non-outlier 8-neighbours (kept when
    it has none)."""
    keep = (~outliers).to(tokens.dtype).reshape(1, 1, grid, grid)
    grid_tokens = tokens.T.reshape(1, -1, grid, grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[0, 0, 1, 1] = 0
    sums = F.conv2d(F.pad(grid_tokens * keep, (1, 1, 1, 1)), ring.expand(grid_tokens.shape[1], 1, 3, 3),
                    groups=grid_tokens.shape[1])
    counts = F.conv2d(F.pad(keep, (1, 1, 1, 1)), ring)
    update = outliers.reshape(1, 1, grid, grid) & (counts > 0)
    replaced = torch.where(update, sums / counts.clamp_min(1), grid_tokens)
    return replaced.reshape(tokens.shape[1], -1).T


def aggregate(tokens: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    return (similarity / (similarity.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def calibrated_attention(access, tokens: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The last block's attention on patch tokens alone (N, D) -> out_proj output (N, D)."""
    access.prefix = 0  # the tokens are patches only (a rotary embedding starts at the first)
    _, k, v = access.qkv(access.ln_1(tokens[None]))
    attn = similarity_attention(similarity, 1.0, 3.0)
    attn = (attn + torch.softmax(k @ k.transpose(-2, -1) * k.shape[-1] ** -0.5, dim=-1)) / 2
    return access.merge(attn @ v)[0]


def _cosines(tokens: torch.Tensor) -> torch.Tensor:
    t = F.normalize(tokens.float(), dim=-1)
    return t @ t.T


@register_method("scclip", segments=True, shares_forward=True, block_inputs_only=True, unbatched=True, families=frozenset({"vit", "vit-avg", "timm-vit"}),
                 postprocess="resize_minmax", params=("scclip_layers", "scclip_beta", "scclip_res_cls"),
                 description="SC-CLIP (Bai et al. 2024): outlier tokens replaced, similarity aggregation, the last "
                             "block with a calibrated attention and multi-level fusion; one forward.")
def scclip(ctx: CamContext) -> torch.Tensor:
    depth = ctx.depth
    pre, post, start, end = resolve_layers(ctx.options.get("scclip_layers", LAYERS.default), depth)
    beta = float(ctx.options.get("scclip_beta", BETA.default))
    res_cls = float(ctx.options.get("scclip_res_cls", RES_CLS.default))
    prefix = ctx.model.family.prefix
    _, inputs = ctx.block_inputs(1)
    outputs = [x[0] for x in inputs]  # outputs[i]: block i's output (0-based), the reference's feats_list[i]
    with torch.no_grad():
        penultimate = outputs[-1]
        patches = penultimate[prefix:]
        grid = int(round(patches.shape[0] ** 0.5))
        cls = penultimate[:1] if prefix else torch.zeros_like(patches[:1])
        outliers = lof_outliers(patches, min(LOF_NEIGHBOURS, patches.shape[0] - 1), LOF_CONTAMINATION)
        x = neighbour_mean(patches, outliers, grid)
        mid = _cosines(neighbour_mean(outputs[pre][prefix:], outliers, grid)).to(x.dtype)
        access = ctx.block_access(-1)
        x = aggregate(x, mid.masked_fill(mid < beta, 0))
        x = calibrated_attention(access, x, mid) + res_cls * cls
        after = _cosines(outputs[post][prefix:]).to(x.dtype)
        after = after.masked_fill(after < beta, 0)
        x = aggregate(x, after)
        fused = sum(outputs[start:end])
        fused_cls = fused[:1] if prefix else torch.zeros_like(cls)
        x = x + aggregate(calibrated_attention(access, fused[prefix:], mid) + res_cls * fused_cls, after)
        dense = dense_tokens(ctx.model.visual, x[None]).float()[0]
        return square_grid(F.normalize(dense, dim=-1) @ ctx.text_features.T)
