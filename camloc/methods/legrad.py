"""LeGrad (Bousselham et al. 2024, "LeGrad: An explainability method for vision transformers via
feature formation sensitivity"), as `legrad-torch` 1.1 computes it for CLIP, on class-token and
average-pooled ViTs (OpenAI's sequence-first blocks and open_clip's batch-first ones alike, and timm
trunks pooled by their class token or by averaging, where the trunk's norm, fc_norm and heads stand for
ln_post and proj), and as its SigLIP path computes it on attention-pool heads (below).

For each of the last K blocks l (`--legrad-layers K`, default 2 as the reference's layer_index=-2;
0 = every block): the image feature read at that block, f_l = normalise(ln_post(mean over ALL tokens
of the block output) @ proj), scored s_l = sum_p <t_p, f_l[p]> (t_p normalised text embeddings); its
gradient w.r.t. the block's own attention probabilities, clamped >= 0, averaged over heads and over
all query rows, class-token column dropped -> a (g, g) grid per prompt; the grids summed over blocks,
upsampled bilinearly by the patch size (align_corners=False) to the input size and min-max
normalised without epsilon (postprocess `resize`: that n x n map is resized to the image).

The blocks before the first used one are not run again: their output is the image's one forward's
(`CamContext.block_inputs`, shared with the other methods; when LeGrad is the image's only method and
nothing has run that forward, a forward that stops at the first used block), and only the K used blocks run,
on P copies
of that input, with their attention unfused and kept for the backward (the reference runs the whole
tower on the P copies). Every block's gradient comes from ONE backward: each used block after the first
reads its input as a fresh leaf, so s_l reaches only block l's own attention (the reference's per-layer
gradient) while the forward values are unchanged.

Attention-pool heads (SigLIP's "map"; WalBouss/LeGrad `compute_legrad_siglip`, wrapper.py at 8c2ca90,
utils.py at c5c7b20): for each of the last K blocks, the block's output goes through the pool
(`trunk.attn_pool`), the pooled feature is normalised and scored against the prompts, and the gradient
is taken w.r.t. that pool application's own query probabilities (heads x 1 x N), clamped >= 0,
averaged over heads: one (g, g) grid per block, summed. The reference's correction follows: the same
grids for the empty prompt "a photo of a", min-max normalised; where they exceed
`--legrad-correction` (its 0.8; 1 = off) the map is set to 0. Then min-max (no epsilon) and the
bilinear upsampling by the patch size (the reference's order: normalise, then upsample). The
reference feeds the raw block output to the pool; the model itself applies `trunk.norm` first (and
`fc_norm`, the heads after it, identities on SigLIP), and camloc reads the feature through the model's
own head by default: `--legrad-official` reproduces the reference's (a deviation from the model).
Each prompt is scored on its own copy of the image (the reference sums all prompts into one map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.methods.hila import capturing_attention, latent_pool_with_probs
from camloc.cams.options import at_least, between, method_option
from camloc.cams.postprocess import minmax_
from camloc.cams.registry import register_method
from camloc.models.families import (check_run_block, dense_tokens, encoder_pass, has_blocks, run_block,
                                    vit_blocks)

LAYERS = method_option("legrad_layers", int, 2, "LeGrad: the last K blocks used (the reference's 2; 0 = every "
                       "block).", at_least("--legrad-layers", 0, " (0 = every block)"))
DEFAULT_LAYERS = LAYERS.default


CORRECTION = method_option("legrad_correction", float, 0.8, "LeGrad on attention-pool heads (SigLIP): zero the map "
                           "where the empty prompt's normalised map exceeds this (the reference's 0.8; 1 = off).",
                           between("--legrad-correction", 0, 1, low_open=True, meaning=" (1 = off)"))
OFFICIAL = method_option("legrad_official", bool, False, "LeGrad on attention-pool heads: pool the raw block "
                         "output as the reference code does, instead of through the model's final norm.")
EMPTY_PROMPT = "a photo of a"  # the reference's empty text for the correction


@register_method("legrad", families=frozenset({"vit", "vit-avg", "timm-vit"}), uses_gradients=True,
                 postprocess="resize", params=("legrad_layers", "legrad_correction", "legrad_official"),
                 description="LeGrad (Bousselham et al. 2024): gradients of each block's pooled feature w.r.t. "
                             "its attention, last --legrad-layers blocks.")
def legrad(ctx: CamContext) -> torch.Tensor:
    visual = ctx.model.visual
    family = ctx.model.family
    blocks = vit_blocks(visual)
    depth = len(blocks)
    k = int(ctx.options.get("legrad_layers", DEFAULT_LAYERS))
    first = 0 if k <= 0 or k >= depth else depth - k
    used = list(range(first, depth))
    if family.pooling == "map":
        return _legrad_pool(ctx, used)
    n_prompts = len(ctx.prompts)
    if not getattr(ctx.model, "_run_block_checked", False):
        check_run_block(visual, family, ctx.block_inputs(0)[1])
        ctx.model._run_block_checked = True
    if ctx.owns_forward("legrad"):  # alone on the image: the forward stops at its first block (the rest would
        start = encoder_pass(visual, family, ctx.input, until=first)[2][-1]  # run twice)
    else:
        start = ctx.block_inputs(first)[1][0]  # the image's one forward, shared: only the used blocks run again
    captured: list[torch.Tensor] = []
    outputs: dict[int, torch.Tensor] = {}
    x = start.expand(n_prompts, -1, -1).clone().requires_grad_(True)  # P copies of block `first`'s input
    with capturing_attention(visual, captured, only=used), torch.enable_grad():
        for i in used:
            if i > first:  # a fresh leaf: block i's score reaches only block i's own attention
                x = x.detach().requires_grad_(True)
            x = outputs[i] = run_block(visual, family, i, x)
        text = ctx.text_features.to(torch.float32)
        total = 0
        for i in used:
            tokens = outputs[i]  # (P, N, D)
            if has_blocks(visual):
                pooled = visual.ln_post(tokens.mean(dim=1)) @ visual.proj
            else:  # timm trunk: its norm, fc_norm and heads on the tokens' mean
                pooled = dense_tokens(visual, tokens.mean(dim=1, keepdim=True))[:, 0]
            feature = pooled.float() / pooled.float().norm(dim=-1, keepdim=True)
            total = total + (feature * text).sum()
        probs = captured
        grads = torch.autograd.grad(total, probs)  # one batched backward for every block and prompt
    tokens_n = probs[0].shape[-1]
    grid = int(round((tokens_n - family.prefix) ** 0.5))
    total_grid = 0
    for g in grads:
        g = g.float().view(n_prompts, -1, tokens_n, tokens_n).clamp_min(0).mean(dim=1).mean(dim=1)  # (P, N)
        total_grid = total_grid + g[:, family.prefix:].reshape(n_prompts, grid, grid)
    patch = ctx.model.input_size // grid
    up = F.interpolate(total_grid[:, None], scale_factor=patch, mode="bilinear", align_corners=False)[:, 0]
    return minmax_(up.detach(), eps=0)


def _legrad_pool(ctx: CamContext, used: list[int]) -> torch.Tensor:
    """LeGrad's SigLIP path (see the module docstring): (P, n, n). The blocks' outputs come from the image's
    one forward: each block's output is the next one's input, the last one's the target layer's output."""
    visual = ctx.model.visual
    trunk = visual.trunk
    official = bool(ctx.options.get("legrad_official", OFFICIAL.default))
    threshold = float(ctx.options.get("legrad_correction", CORRECTION.default))
    n_prompts = len(ctx.prompts)
    _, inputs = ctx.block_inputs(0)
    last = ctx.target_output
    outputs = {i: inputs[i + 1] if i + 1 < len(inputs) else last for i in used}
    text = ctx.text_features.float()
    empty = ctx.model.text_features([EMPTY_PROMPT]).float()[0] if threshold < 1 else None
    probs, scores, empty_scores = [], 0, 0
    with torch.enable_grad():
        for i in used:
            tokens = outputs[i].expand(n_prompts, -1, -1).clone().requires_grad_(True)
            pooled, query = latent_pool_with_probs(trunk.attn_pool, tokens if official else trunk.norm(tokens))
            if not official:
                pooled = visual.head(trunk.head(trunk.fc_norm(pooled)))
            feature = F.normalize(pooled.float(), dim=-1)
            scores = scores + (feature * text).sum()
            if empty is not None:
                empty_scores = empty_scores + (feature @ empty).sum()
            probs.append(query)
        grads = torch.autograd.grad(scores, probs, retain_graph=empty is not None)
        empty_grads = torch.autograd.grad(empty_scores, probs) if empty is not None else None
    prefix = ctx.model.family.prefix
    tokens_n = probs[0].shape[-1]
    grid = int(round((tokens_n - prefix) ** 0.5))

    def summed(gradients) -> torch.Tensor:
        total = 0
        for g in gradients:  # (P, heads, 1, N): clamp, mean over heads, the query's row
            total = total + g.float().clamp_min(0).mean(dim=1)[:, 0, prefix:].reshape(n_prompts, grid, grid)
        return total

    maps = summed(grads)
    if empty_grads is not None:
        maps = maps.masked_fill(minmax_(summed(empty_grads), eps=0) > threshold, 0)
    maps = minmax_(maps, eps=0)
    patch = ctx.model.input_size // grid
    return F.interpolate(maps[:, None], scale_factor=patch, mode="bilinear", align_corners=False)[:, 0].detach()
