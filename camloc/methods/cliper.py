"""CLIPer's CLIP-only stage (Sun et al., ICCV 2025, "CLIPer: hierarchically improving spatial representation of
CLIP for open-vocabulary semantic segmentation"; linsun449/cliper.code `modified_clip/model.py` and
`ovs/pipeline.py`, read only: the repository has no licence), its "early-layer fusion", from the image's one
forward of a d-block ViT. Two versions of the official code, `--cliper-variant`:

- `85fbe81` (the default; the newest commit of the repository camloc has read): step 3 below, except that the
  last level's scores are zeroed in place, so the mean runs over ALL levels including the zeroed last one, and
  the propagation multiplies by the attention transposed: map = A_mean^T @ S_d + mean(S_1..S_d). Its threshold
  is a config value (`attention_thr`: 0.2 in its configs read here; `--cliper-threshold`). Its sliding-window
  fusion (`sliding_crop_size`, 0 = off in its configs) is not here.
- `0bfad0d` (the code of the paper's release, as camloc first followed it): as written below.


1. A = the sum over blocks 1..d-1 of their own attention probabilities, per head.
2. The feature levels: ln_1(x_i), the normalised input of each block i < d, and the last block's input x_d.
   Each level goes through the last block's ln_1, its value projection, a fused attention made from A, and
   out_proj (no residual, no FFN), then the rest of the tower per token (`dense_tokens`).
   The fused attention: A is divided by its column sums and then by its row sums, then symmetrised, less
   its column means, clamped at 0, and row-normalised. The reference divides A in place, once more for each
   level, so level k (1-based) sees k rounds of column and row division; camloc does the same.
3. Every level's patch tokens are scored with `--cliper-scale` (100) times the cosine, in a softmax over the
   image's prompts, the `--cliper-background` words and the prompts' mean embedding. S_k are the prompts'
   columns. The last level's S_d is zeroed below 0.2 of its per-prompt maximum. Then
   map = mean over heads of the last fused attention (patch rows and columns) @ S_d + the mean of S_1..S_d-1.

Deviations: the reference's second stage (Stable Diffusion self-attention, "fine-grained compensation") and
its ablation switches (`attn_type`, `fuse_feature`) are not here. Its background words pass through its prompt
templates, and camloc scores them as written, like CLIP-ES's. Its prompt templates are averaged (camloc scores
the given prompts). Its input keeps the aspect ratio at a 336 px short side, with resized position embeddings;
camloc uses the model's input size, as every method does. Its score threshold/background step (`cam_to_label`)
is a segmentation step; `--protocols ovseg` takes the argmax instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.methods.clip_es import background_words, word_list
from camloc.cams.context import CamContext
from camloc.methods.dense import DENSE_FAMILIES, square_grid
from camloc.cams.options import between, method_option, one_of
from camloc.cams.registry import register_method
from camloc.errors import ModelError
from camloc.models.families import dense_tokens

BACKGROUND = method_option("cliper_background", str, "background", "CLIPer: comma list of background words in the "
                           "softmax beside the prompts and their mean (the reference's ADE20K and PASCAL-Context "
                           "word; its VOC list has 25; empty = none), scored as written.", word_list)
SCALE = method_option("cliper_scale", float, 100.0, "CLIPer: logit scale of its softmax over the prompts (the "
                      "reference's 100).", between("--cliper-scale", 0, 1000, low_open=True))
VARIANTS = ("85fbe81", "0bfad0d")
VARIANT = method_option("cliper_variant", str, "85fbe81", "CLIPer: which commit of the official code to follow: 85fbe81 "
                        "(the newest read: the last level zeroed in place, the mean over all levels, the attention "
                        "transposed in the propagation) or 0bfad0d (the paper's release).",
                        one_of("--cliper-variant", VARIANTS))
THRESHOLD = method_option("cliper_threshold", float, 0.2, "CLIPer: the last level's scores below this fraction of "
                          "their per-prompt maximum are zeroed before the attention propagates them (the "
                          "reference's 0.2).", between("--cliper-threshold", 0, 1))


def fused_attention(summed: torch.Tensor) -> torch.Tensor:
    """CLIPer's attention from the blocks' summed attention (..., N, N): symmetrised, less its column means,
    clamped at 0 and row-normalised. `summed` must already carry its column/row division rounds."""
    a = (summed + summed.transpose(-2, -1)) / 2
    a = (a - a.mean(dim=-2, keepdim=True)).clamp(min=0)
    return a / a.sum(dim=-1, keepdim=True)


@register_method("cliper", segments=True, shares_forward=True, block_inputs_only=True, prompt_coupled=True, families=DENSE_FAMILIES,
                 postprocess="resize_minmax", params=("cliper_background", "cliper_scale", "cliper_threshold", "cliper_variant"),
                 description="CLIPer (Sun et al. 2025), CLIP-only stage: every block's normalised input through the "
                             "last block with the summed attention, scores propagated; one forward.")
def cliper(ctx: CamContext) -> torch.Tensor:
    scale = float(ctx.options.get("cliper_scale", SCALE.default))
    threshold = float(ctx.options.get("cliper_threshold", THRESHOLD.default))
    variant = ctx.options.get("cliper_variant", VARIANT.default)
    words = list(background_words(ctx, BACKGROUND))
    depth, prefix = ctx.depth, ctx.model.family.prefix
    if depth < 2:
        raise ModelError(f"CLIPer fuses the blocks before the last one, and {ctx.model.name} has {depth} block")
    _, inputs = ctx.block_inputs(0)
    with torch.no_grad():
        summed, levels = 0, []
        for index in range(depth - 1):
            access = ctx.block_access(index)
            y = access.ln_1(inputs[index])
            q, k, _ = access.qkv(y)
            summed = summed + torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1).float()
            levels.append(y)
        levels.append(inputs[-1])
        last = ctx.block_access(-1)
        outputs = []
        for level in levels:
            summed = summed / summed.sum(dim=-2, keepdim=True)  # the reference's in-place rounds, one per level
            summed = summed / summed.sum(dim=-1, keepdim=True)
            attention = fused_attention(summed)
            _, _, v = last.qkv(last.ln_1(level))
            outputs.append(last.merge(attention.to(v.dtype) @ v))
        dense = dense_tokens(ctx.model.visual, torch.cat(outputs)).float()[:, prefix:]  # (levels, patches, E)
        texts = ctx.text_features
        if words:
            texts = torch.cat([texts, ctx.model.text_features(words).to(texts.dtype)])
        texts = torch.cat([texts, F.normalize(ctx.text_features.mean(dim=0, keepdim=True), dim=-1)])
        scores = torch.softmax(scale * F.normalize(dense, dim=-1) @ texts.T, dim=-1)[..., :len(ctx.prompts)]
        final = scores[-1]
        final = final.masked_fill(final < final.amax(dim=0, keepdim=True) * threshold, 0)
        propagate = attention[0].mean(dim=0)[prefix:, prefix:]
        if variant == "0bfad0d":
            return square_grid(propagate @ final + scores[:-1].mean(dim=0))
        levels_mean = (scores[:-1].sum(dim=0) + final) / len(scores)  # the zeroed last level counts too
        return square_grid(propagate.T @ final + levels_mean)
