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
from camloc.errors import OptionError

OFFICIAL = method_option("eclip_official", bool, False, "Grad-ECLIP: recompute the last block with one attention head "
                         "over all channels, as the official code does (a deviation from the model's forward), "
                         "instead of the model's real heads.")


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, heads concatenated (before out_proj): (B, N, D) each -> (B, N, D)."""
    batch, n, dim = q.shape
    split = [t.reshape(batch, n, heads, dim // heads).transpose(1, 2) for t in (q, k, v)]
    attn = torch.softmax(split[0] @ split[1].transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    return (attn @ split[2]).transpose(1, 2).reshape(batch, n, dim)


@register_method("grad-eclip", families=frozenset({"vit", "timm-vit"}), uses_gradients=True, params=("eclip_official",),
                 shares_forward=True, poolings=frozenset({"token", "map"}),
                 description="Grad-ECLIP (Zhao et al. 2024): gradient at the last attention output x values, "
                             "weighted by query-key similarity (--eclip-official: the code's single head).")
def grad_eclip(ctx: CamContext) -> torch.Tensor:
    visual = ctx.model.visual
    family = ctx.model.family
    _, inputs = ctx.block_inputs(ctx.depth - 1)
    x = inputs[-1]  # batch-first (1, N, D)
    access = ctx.block_access(-1)
    if access.timm:
        if ctx.options.get("eclip_official", OFFICIAL.default):
            raise OptionError("--eclip-official recomputes an nn.MultiheadAttention block with one head, as the "
                              f"official code does; {ctx.model.name}'s timm blocks have no such form: drop it")
        if family.pooling == "map":
            return _pool_eclip(ctx)
        if family.pooling != "token":
            raise OptionError(f"grad-eclip needs a class token or an attention-pool head; {ctx.model.name}'s trunk "
                              "averages its tokens")
        return _timm_eclip(ctx, x, access)
    heads = 1 if ctx.options.get("eclip_official", OFFICIAL.default) else access.heads
    n_prompts = len(ctx.prompts)
    with torch.no_grad():
        q, k, v = access.in_proj(access.ln_1(x))
        out = attention_output(q, k, v, heads)
        sim = _minmax(F.cosine_similarity(access.out_proj(q)[0, :1], access.out_proj(k)[0, 1:], dim=-1).float())
    leaf = out.expand(n_prompts, -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        h = x + access.ls_1(access.out_proj(leaf))
        h = h + access.ffn(h)
        raw = h.transpose(0, 1) if family.batch_dim == 1 else h
        (grad,) = torch.autograd.grad(_own_scores(ctx, family.head(visual, raw)).sum(), leaf)
    return _relevance(ctx, grad[:, 0], v[0, 1:], sim)


def _heads_cat(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    batch, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(batch, n, heads * d)


def _relevance(ctx: CamContext, grad: torch.Tensor, values: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """relu(sum_c grad[p, c] * v[i, c] * w(i)) on the patch grid: grad (P, D), values (N patches, D), sim (N,)."""
    maps = torch.relu((grad[:, None, :].float() * values[None].float() * sim[None, :, None]).sum(dim=-1))
    side = int(round(maps.shape[1] ** 0.5))
    return maps.reshape(len(ctx.prompts), side, side)


def _minmax(t: torch.Tensor) -> torch.Tensor:
    return (t - t.min()) / (t.max() - t.min())


def _own_scores(ctx: CamContext, features: torch.Tensor) -> torch.Tensor:
    """(P, E) embeddings, copy p of the image -> s_p: the model's logit of prompt p for copy p (P,)."""
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True)
    return ctx.model.logit_scale * (features * ctx.text_features).sum(dim=-1) + ctx.model.logit_bias


def _timm_eclip(ctx: CamContext, x: torch.Tensor, access) -> torch.Tensor:
    """Grad-ECLIP on a class-token pooled timm trunk (EVA02): the last block's real attention (its q/k
    norms and rotary embeddings), the class row of its output (before the sub-norm and proj) as the
    differentiated point, w(i) = minmax cos(proj(q)[cls], proj(k)[i]) of the heads' concatenated q, k."""
    visual, family = ctx.model.visual, ctx.model.family
    prefix = family.prefix
    with torch.no_grad():
        q, k, v = access.qkv(access.ln_1(x))
        out = _heads_cat(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v)
        q, k, v = _heads_cat(q), _heads_cat(k), _heads_cat(v)
        sim = _minmax(F.cosine_similarity(access.out_proj(q)[0, :1], access.out_proj(k)[0, prefix:], dim=-1).float())
    leaf = out.expand(len(ctx.prompts), -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        h = x + access.ls_1(access.out_proj(access.block.attn.norm(leaf)))
        h = h + access.ffn(h)
        (grad,) = torch.autograd.grad(_own_scores(ctx, family.head(visual, h)).sum(), leaf)
    return _relevance(ctx, grad[:, 0], v[0, prefix:], sim)


def _pool_eclip(ctx: CamContext) -> torch.Tensor:
    """Grad-ECLIP on an attention-pool head (SigLIP), where camloc defines it at the pool's cross-attention,
    the last attention reading the tokens into the embedding (as HilaCAM reads the pool's query): the pool
    query's attention output as the differentiated point, the pool's values of each token, and
    w(i) = minmax cos(proj(q_latent), proj(k_i)); the tokens are the last block's output (the image's one
    forward) after the trunk's norm, as the model pools them."""
    from camloc.methods.hila import latent_pool_attention

    visual, family = ctx.model.visual, ctx.model.family
    trunk = visual.trunk
    pool = trunk.attn_pool
    if getattr(pool, "latent_len", 1) != 1:
        raise OptionError("grad-eclip: attention pools with several latent queries are not supported")
    last = ctx.target_output  # the target layer of timm trunks: the last block's output (1, N, D)
    with torch.no_grad():
        q, k, v, _, out = latent_pool_attention(pool, trunk.norm(last))  # out: (1, 1, D)
        q, k, v = _heads_cat(q), _heads_cat(k), _heads_cat(v)
        sim = _minmax(F.cosine_similarity(pool.proj(q)[0, :1], pool.proj(k)[0, family.prefix:], dim=-1).float())
    leaf = out.expand(len(ctx.prompts), -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        pooled = pool.proj_drop(pool.proj(leaf))
        if pool.mlp is not None:
            pooled = pooled + pool.mlp(pool.norm(pooled))
        features = visual.head(trunk.head(trunk.fc_norm(pooled[:, 0])))
        (grad,) = torch.autograd.grad(_own_scores(ctx, features).sum(), leaf)
    return _relevance(ctx, grad[:, 0], v[0, family.prefix:], sim)
