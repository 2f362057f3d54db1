"""HilaCAM (Chefer et al. 2021, "Generic attention-model explainability") on every ViT family (docs/protocol.md §3).

Attention probabilities, still in the graph, from each block of the encoder:
- the `clip` package's and open_clip's own blocks (`nn.MultiheadAttention`): a pre-hook asks for
  per-head weights, a forward hook keeps them; the weights PyTorch returns are a view of the softmax
  output the attention product used, so the gradient is taken at that tensor (the view's base);
- timm trunks (SigLIP, EVA02, PE-Core): timm's fused attention is switched off for the pass, so its
  own unfused path runs, and the probabilities are the output of each block's `attn_drop` (an identity
  in eval mode applied right after the softmax).
The relevance R (R = I; R += mean_heads(relu(dP * P)) R per block) is read out where the embedding
reads the tokens: the class token's row (class-token pooling), the mean of the patch rows (average
pooling), or for an attention-pool head (SigLIP's "map") the pool query's own attention, weighted the
same way, times R. The pool query's probabilities come from camloc's explicit form of timm's
`AttentionPoolLatent`, checked against timm's output on every call. No model code is copied.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.cams.options import method_option
from camloc.cams.postprocess import minmax_
from camloc.cams.registry import register_method
from camloc.errors import OptionError
from camloc.models.families import vit_blocks

START_LAYER = method_option("start_layer", int, 0, "HilaCAM: first block used (0 = all blocks, -1 = the last only); "
                            "checked against the model's blocks once it is loaded.")

HILA_SIZE = 224  # the original interpolates the relevance to a fixed 224 x 224


def _ask_for_weights(module, args, kwargs):
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def attention_blocks(visual) -> list:
    """The encoder's attention modules in order (MultiheadAttention, or timm attentions)."""
    return [block.attn for block in vit_blocks(visual)]


@contextlib.contextmanager
def capturing_attention(visual, captured: list, only: list[int] | None = None):
    """While active, every block's (or the blocks `only`'s) attention probabilities (B*heads or B, heads, T, T)
    are appended to `captured`, in the graph; the other blocks keep their fused attention."""
    handles, fused = [], []
    try:
        for index, attn in enumerate(attention_blocks(visual)):
            if only is not None and index not in only:
                continue
            if isinstance(attn, torch.nn.MultiheadAttention):
                handles.append(attn.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
                handles.append(attn.register_forward_hook(lambda m, a, out: captured.append(_softmax_base(out[1]))))
            elif hasattr(attn, "fused_attn") and hasattr(attn, "attn_drop"):
                fused.append((attn, attn.fused_attn))
                attn.fused_attn = False
                handles.append(attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out)))
            else:
                raise OptionError(f"HilaCAM cannot read the attention of {type(attn).__name__} blocks")
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attn, flag in fused:
            attn.fused_attn = flag


def _softmax_base(weights: torch.Tensor) -> torch.Tensor:
    base = weights._base
    if base is None or base.dim() != 3:
        raise RuntimeError("this torch version does not return attention weights as a view of the softmax "
                           "output; HilaCAM cannot take their gradient")
    return base


def latent_pool_attention(pool, x: torch.Tensor) -> tuple:
    """timm's AttentionPoolLatent written out up to its output projection: (q (B, heads, latent, d) and
    k, v (B, heads, N, d) as the attention uses them, the query's probabilities (B, heads, latent, N), the
    heads' concatenated output (B, latent, D))."""
    batch, n, dim = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, pool.latent_len, pool.num_heads, pool.head_dim)
    q = q.transpose(1, 2)
    k, v = pool.kv(x).reshape(batch, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    probs = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return q, k, v, probs, (probs @ v).transpose(1, 2).reshape(batch, pool.latent_len, dim)


def latent_pool_with_probs(pool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's AttentionPoolLatent written out, returning (its output, the query's probabilities
    (B, heads, latent, N)); checked against timm's own forward by the caller."""
    _, _, _, probs, out = latent_pool_attention(pool, x)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    out = out[:, 0] if pool.pool == "token" else (out.mean(1) if pool.pool == "avg" else out)
    return out, probs


@contextlib.contextmanager
def capturing_pool_query(visual, captured: list):
    """For an attention-pool head: run camloc's explicit form of the pool (checked against timm's) and
    keep the query's probabilities in `captured`."""
    pool = visual.trunk.attn_pool
    original = pool.forward

    def forward(x, attn_mask=None):
        if attn_mask is not None:
            raise OptionError("HilaCAM: attention-pool masks are not supported")
        out, probs = latent_pool_with_probs(pool, x)
        with torch.no_grad():
            expected = original(x.detach())
        if not torch.allclose(out.detach().float(), expected.float(), rtol=1e-4, atol=1e-5):
            raise OptionError("HilaCAM: this timm version's AttentionPoolLatent computes differently from camloc's "
                              "reading of it; HilaCAM is not available for this model")
        captured.append(probs)
        return out

    pool.forward = forward
    try:
        yield
    finally:
        pool.forward = original


def attention_probs_and_scores(ctx: CamContext):
    """One forward of P copies of the image (one per prompt): every block's attention probabilities,
    still in the graph, the pool query's (attention-pool heads) or None, and each copy's score for
    its own prompt (P,)."""
    visual = ctx.model.visual
    captured: list[torch.Tensor] = []
    pool_probs: list[torch.Tensor] = []
    use_pool = ctx.model.family.pooling == "map"
    x = ctx.input.expand(len(ctx.prompts), -1, -1, -1).clone().requires_grad_(True)
    with capturing_attention(visual, captured), (
            capturing_pool_query(visual, pool_probs) if use_pool else contextlib.nullcontext()):
        with torch.enable_grad():
            features = visual(x).float()
    features = features / features.norm(dim=-1, keepdim=True)
    scores = ctx.model.logit_scale * (features * ctx.text_features).sum(dim=-1) + ctx.model.logit_bias
    return captured, (pool_probs[0] if pool_probs else None), scores


@register_method("hilacam", families=frozenset({"vit", "vit-avg", "timm-vit"}), uses_gradients=True,
                 postprocess="resize", params=("start_layer",))
def hilacam(ctx: CamContext) -> torch.Tensor:
    """HilaCAM: R = I; for each block from --start-layer, R += mean_heads(relu(dP * P)) R; map = R read out where the embedding pools (class row)."""
    start = int(ctx.options.get("start_layer", START_LAYER.default))
    probs, pool, scores = attention_probs_and_scores(ctx)
    blocks = probs[start:]
    grads = torch.autograd.grad(scores.sum(), blocks + ([pool] if pool is not None else []))
    n_prompts = len(ctx.prompts)
    tokens = blocks[0].shape[-1]
    relevance = torch.eye(tokens, device=scores.device).expand(n_prompts, tokens, tokens)
    for p, dp in zip(blocks, grads):
        cam = (dp.float() * p.float()).clamp_min(0).view(n_prompts, -1, tokens, tokens).mean(dim=1)
        relevance = relevance + cam @ relevance
    family = ctx.model.family
    prefix = family.prefix
    if family.pooling == "token":
        row = relevance[:, 0]
    elif family.pooling == "avg":
        row = relevance[:, prefix:].mean(dim=1)
    else:  # the pool query's attention, weighted by its gradient, through R
        dq = grads[len(blocks)]
        query = (dq.float() * pool.float()).clamp_min(0).view(n_prompts, -1, tokens).mean(dim=1)  # (P, T)
        row = (query[:, None, :] @ relevance)[:, 0]
    grid = int(round((tokens - prefix) ** 0.5))
    maps = row[:, prefix:].reshape(n_prompts, 1, grid, grid).detach()
    maps = F.interpolate(maps, size=(HILA_SIZE, HILA_SIZE), mode="bilinear", align_corners=False)[:, 0]
    return minmax_(maps, eps=0)  # min-max without eps, as the original
