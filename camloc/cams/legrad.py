"""LeGrad (Bousselham et al. 2024, "LeGrad: An explainability method for vision transformers via
feature formation sensitivity"), as `legrad-torch` 1.1 computes it for CLIP, on class-token and
average-pooled ViTs (OpenAI's sequence-first blocks and open_clip's batch-first ones alike).

For each of the last K blocks l (`--legrad-layers K`, default 2 as the reference's layer_index=-2;
0 = every block): the image feature read at that block, f_l = normalise(ln_post(mean over ALL tokens
of the block output) @ proj), scored s_l = sum_p <t_p, f_l[p]> (t_p normalised text embeddings); its
gradient w.r.t. the block's own attention probabilities, clamped >= 0, averaged over heads and over
all query rows, class-token column dropped -> a (g, g) grid per prompt; the grids summed over blocks,
upsampled bilinearly by the patch size (align_corners=False) to the input size and min-max
normalised without epsilon (postprocess `resize`: that n x n map is resized to the image).

All P prompts run as one batch of P copies of the image and every block's gradient comes from ONE
backward: each used block after the first reads its input as a fresh leaf, so s_l reaches only block
l's own attention (the reference's per-layer gradient) while the forward values are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.cams.hila import capturing_attention
from camloc.cams.postprocess import minmax_
from camloc.cams.options import at_least, method_option
from camloc.cams.registry import register_method

LAYERS = method_option("legrad_layers", int, 2, "LeGrad: the last K blocks used (the reference's 2; 0 = every "
                       "block).", at_least("--legrad-layers", 0, " (0 = every block)"))
DEFAULT_LAYERS = LAYERS.default


def _blocks(visual):
    return list(visual.transformer.resblocks)


@register_method("legrad", families=frozenset({"vit", "vit-avg"}), uses_gradients=True, postprocess="resize",
                 params=("legrad_layers",),
                 description="LeGrad (Bousselham et al. 2024): gradients of each block's pooled feature w.r.t. "
                             "its attention, last --legrad-layers blocks.")
def legrad(ctx: CamContext) -> torch.Tensor:
    visual = ctx.model.visual
    family = ctx.model.family
    blocks = _blocks(visual)
    depth = len(blocks)
    k = int(ctx.options.get("legrad_layers", DEFAULT_LAYERS))
    first = 0 if k <= 0 or k >= depth else depth - k
    used = list(range(first, depth))
    n_prompts = len(ctx.prompts)
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i in used:
        handles.append(blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)))
        if i > first:  # a fresh leaf: block i's score reaches only block i's own attention
            handles.append(blocks[i].register_forward_pre_hook(
                lambda m, args: (args[0].detach().requires_grad_(True), *args[1:])))
    captured: list[torch.Tensor] = []
    x = ctx.input.expand(n_prompts, -1, -1, -1).clone().requires_grad_(True)
    try:
        with capturing_attention(visual, captured), torch.enable_grad():
            visual(x)
            text = ctx.text_features.to(torch.float32)
            total = 0
            for i in used:
                tokens = outputs[i]
                tokens = tokens.transpose(0, 1) if family.batch_dim == 1 else tokens  # -> (P, N, D)
                pooled = visual.ln_post(tokens.mean(dim=1)) @ visual.proj
                feature = pooled.float() / pooled.float().norm(dim=-1, keepdim=True)
                total = total + (feature * text).sum()
            probs = [captured[i] for i in used]
            grads = torch.autograd.grad(total, probs)  # one batched backward for every block and prompt
    finally:
        for handle in handles:
            handle.remove()
    tokens_n = probs[0].shape[-1]
    grid = int(round((tokens_n - family.prefix) ** 0.5))
    total_grid = 0
    for g in grads:
        g = g.float().view(n_prompts, -1, tokens_n, tokens_n).clamp_min(0).mean(dim=1).mean(dim=1)  # (P, N)
        total_grid = total_grid + g[:, family.prefix:].reshape(n_prompts, grid, grid)
    patch = ctx.model.input_size // grid
    up = F.interpolate(total_grid[:, None], scale_factor=patch, mode="bilinear", align_corners=False)[:, 0]
    return minmax_(up.detach(), eps=0)
