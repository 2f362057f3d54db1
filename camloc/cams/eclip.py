"""Grad-ECLIP (Zhao et al., ICML 2024, "Gradient-based visual explanation for transformer-based CLIP";
Cyang-Zhao/Grad-Eclip `generate_emap.py`: `clip_encode_dense` and `grad_eclip`) on class-token ViTs.

The last block is recomputed from its input x: y = ln_1(x), q, k, v = the in-projection of y (each N x D),
the attention output o (before out_proj), x' = x + out_proj(o), the FFN, ln_post and proj of the class
token: the image embedding. For each prompt p, with one batched backward for all P prompts:

    map_p(i) = relu( sum_c  d s_p / d o[cls, c] * v[i, c] * w(i) ),
    w(i) = minmax_i cos(out_proj(q)[cls], out_proj(k)[i])   (patch tokens i; out_proj with its bias)

camloc computes o with the model's real multi-head attention (its H heads of D / H channels). The
official code recomputes the block with ONE head over all D channels (`attention_layer(q, k, v, 1)`),
which is not the forward the model runs; `--eclip-official` reproduces that, as a documented deviation.
Both run at the model's input size (the reference feeds the image at its own size with interpolated
position embeddings).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.cams.options import method_option
from camloc.cams.registry import register_method

OFFICIAL = method_option("eclip_official", bool, False, "Grad-ECLIP: recompute the last block with one attention head "
                         "over all channels, as the official code does (a deviation from the model's forward), "
                         "instead of the model's real heads.")


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, heads concatenated (before out_proj): (B, N, D) each -> (B, N, D)."""
    batch, n, dim = q.shape
    split = [t.reshape(batch, n, heads, dim // heads).transpose(1, 2) for t in (q, k, v)]
    attn = torch.softmax(split[0] @ split[1].transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    return (attn @ split[2]).transpose(1, 2).reshape(batch, n, dim)


@register_method("grad-eclip", families=frozenset({"vit"}), uses_gradients=True, params=("eclip_official",),
                 shares_forward=True,
                 description="Grad-ECLIP (Zhao et al. 2024): gradient at the last attention output x values, "
                             "weighted by query-key similarity (--eclip-official: the code's single head).")
def grad_eclip(ctx: CamContext) -> torch.Tensor:
    visual = ctx.model.visual
    family = ctx.model.family
    _, inputs = ctx.block_inputs(ctx.depth - 1)
    x = inputs[-1]  # batch-first (1, N, D)
    access = ctx.block_access(-1)
    heads = 1 if ctx.options.get("eclip_official", OFFICIAL.default) else access.heads
    n_prompts = len(ctx.prompts)
    with torch.no_grad():
        q, k, v = access.in_proj(access.ln_1(x))
        out = attention_output(q, k, v, heads)
        sim = F.cosine_similarity(access.out_proj(q)[0, :1], access.out_proj(k)[0, 1:], dim=-1).float()
        sim = (sim - sim.min()) / (sim.max() - sim.min())
    leaf = out.expand(n_prompts, -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        h = x + access.ls_1(access.out_proj(leaf))
        h = h + access.ffn(h)
        raw = h.transpose(0, 1) if family.batch_dim == 1 else h
        features = family.head(visual, raw).float()
        features = features / features.norm(dim=-1, keepdim=True)
        scores = ctx.model.logit_scale * (features * ctx.text_features).sum(dim=-1) + ctx.model.logit_bias
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
    maps = torch.relu((grad[:, :1].float() * v[:, 1:].float() * sim[None, :, None]).sum(dim=-1))  # (P, N-1)
    side = int(round(maps.shape[1] ** 0.5))
    return maps.reshape(n_prompts, side, side)
