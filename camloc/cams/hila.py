"""HilaCAM (Chefer et al. 2021, "Generic attention-model explainability"), ViT only (spec §3).

Attention probabilities are captured from the `clip` package's own `nn.MultiheadAttention` modules
with hooks: a pre-hook asks for per-head weights, a forward hook keeps them. The weights PyTorch
returns are a view of the softmax output that the attention product used, so the gradient is taken
at that tensor (the view's base). No model code is copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.cams.postprocess import minmax_
from camloc.cams.registry import DEFAULT_OPTIONS, register_method

HILA_SIZE = 224  # the original interpolates the relevance to a fixed 224 x 224


def _ask_for_weights(module, args, kwargs):
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def attention_probs_and_scores(ctx: CamContext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward of P copies of the image (one per prompt): every block's attention probabilities
    (P * heads, T, T), still in the graph, and each copy's score for its own prompt (P,)."""
    visual = ctx.model.visual
    captured: list[torch.Tensor] = []
    handles = []
    for block in visual.transformer.resblocks:
        handles.append(block.attn.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
        handles.append(block.attn.register_forward_hook(lambda m, a, out: captured.append(out[1])))
    try:
        x = ctx.input.expand(len(ctx.prompts), -1, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            features = visual(x).float()
    finally:
        for handle in handles:
            handle.remove()
    probs = []
    for weights in captured:
        base = weights._base
        if base is None or base.dim() != 3:
            raise RuntimeError("this torch version does not return attention weights as a view of the softmax "
                               "output; HilaCAM cannot take their gradient")
        probs.append(base)
    features = features / features.norm(dim=-1, keepdim=True)
    scores = ctx.model.logit_scale * (features * ctx.text_features).sum(dim=-1)
    return probs, scores


@register_method("hilacam", families=frozenset({"vit"}), uses_gradients=True, postprocess="resize",
                 params=("start_layer",))
def hilacam(ctx: CamContext) -> torch.Tensor:
    """HilaCAM: R = I; for each block from --start-layer, R += mean_heads(relu(dP * P)) R; map = R[0, 1:]."""
    start = int(ctx.options.get("start_layer", DEFAULT_OPTIONS["start_layer"]))
    probs, scores = attention_probs_and_scores(ctx)
    blocks = probs[start:]
    grads = torch.autograd.grad(scores.sum(), blocks)
    n_prompts = len(ctx.prompts)
    tokens = blocks[0].shape[-1]
    relevance = torch.eye(tokens, device=scores.device).expand(n_prompts, tokens, tokens)
    for p, dp in zip(blocks, grads):
        cam = (dp.float() * p.float()).clamp_min(0).view(n_prompts, -1, tokens, tokens).mean(dim=1)
        relevance = relevance + cam @ relevance
    grid = int(round((tokens - 1) ** 0.5))
    maps = relevance[:, 0, 1:].reshape(n_prompts, 1, grid, grid).detach()
    maps = F.interpolate(maps, size=(HILA_SIZE, HILA_SIZE), mode="bilinear", align_corners=False)[:, 0]
    return minmax_(maps, eps=0)  # min-max without eps, as the original
