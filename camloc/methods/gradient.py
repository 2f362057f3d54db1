"""The gradient family (docs/protocol.md §3): a few lines each on the shared A (C, h, w) and G (P, C, h, w).

On ViT, G is the class-token gradient (P, C, 1, 1), broadcast over the grid (docs/protocol.md §1); camloc applies
that rule to LayerCAM too, where the original implementation gave all-zero ViT maps.
"""
from __future__ import annotations

import torch

from camloc.cams.context import CamContext
from camloc.cams.registry import register_method


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """M_p = sum_c w_pc A_c: (P, C) x (C, h, w) -> (P, h, w)."""
    return torch.einsum("pc,chw->phw", weights, activations)


@register_method("gradcam", shares_forward=True, uses_gradients=True)
def gradcam(ctx: CamContext) -> torch.Tensor:
    """GradCAM: w_c = mean_hw G_c; M = sum_c w_c A_c."""
    return weighted_sum(ctx.gradients.mean(dim=(2, 3)), ctx.activations)


@register_method("gradcam++", shares_forward=True, uses_gradients=True)
def gradcam_plus_plus(ctx: CamContext) -> torch.Tensor:
    """GradCAM++: a = G^2 / (2 G^2 + sum_hw(A_c) G^3 + 1e-6) (0 where G = 0); w_c = sum_hw relu(G) a."""
    grads, acts = ctx.gradients, ctx.activations
    g2 = grads.pow(2)
    sum_acts = acts.sum(dim=(1, 2))[None, :, None, None]
    alpha = g2 / (2 * g2 + sum_acts * g2 * grads + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return weighted_sum((grads.clamp_min(0) * alpha).sum(dim=(2, 3)), acts)


@register_method("xgradcam", shares_forward=True, uses_gradients=True)
def xgradcam(ctx: CamContext) -> torch.Tensor:
    """XGradCAM: w_c = sum_hw(G_c A_c) / (sum_hw(A_c) + 1e-7)."""
    grads, acts = ctx.gradients, ctx.activations
    weights = (grads * acts).sum(dim=(2, 3)) / (acts.sum(dim=(1, 2)) + 1e-7)
    return weighted_sum(weights, acts)


@register_method("layercam", shares_forward=True, uses_gradients=True)
def layercam(ctx: CamContext) -> torch.Tensor:
    """LayerCAM: M = sum_c relu(G_c) * A_c (element-wise)."""
    return (ctx.gradients.clamp_min(0) * ctx.activations).sum(dim=1)
