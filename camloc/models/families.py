"""Model families as data: where the CAM target layer is, how its output becomes a (C, h, w) grid,
the part of the image encoder after it (the "head"), and how gradients map onto the grid (spec §1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    target_layer: Callable[[nn.Module], nn.Module]
    """The module whose output is the CAM target, given `model.visual`."""
    to_grid: Callable[[torch.Tensor], torch.Tensor]
    """Raw target output -> activations (B, C, h, w)."""
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(model.visual, raw target output) -> image embedding (B, E): the rest of the encoder."""
    grad_to_grid: Callable[[torch.Tensor], torch.Tensor]
    """Raw gradient w.r.t. the target output -> (B, C, h, w), or (B, C, 1, 1) for the ViT class token."""
    batch_dim: int
    """Batch axis of the raw target output."""


def _vit_tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(L, B, D) tokens, class token first -> (B, D, g, g); any batch, any square grid."""
    length, batch, dim = tokens.shape
    grid = math.isqrt(length - 1)
    if grid * grid != length - 1:
        raise ValueError(f"ViT target has {length - 1} patch tokens, not a square grid")
    return tokens[1:].permute(1, 2, 0).reshape(batch, dim, grid, grid)


def _vit_head(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # VisionTransformer.forward after the transformer: ln_post on the class token, then proj.
    return visual.ln_post(tokens[0]) @ visual.proj


RESNET = Family(
    name="rn",
    description="ModifiedResNet: target visual.layer4[-1] output (post-ReLU, before attnpool)",
    target_layer=lambda visual: visual.layer4[-1],
    to_grid=lambda x: x,
    head=lambda visual, x: visual.attnpool(x),
    grad_to_grid=lambda g: g,
    batch_dim=0,
)

VIT = Family(
    name="vit",
    description="VisionTransformer: target visual.transformer.resblocks[-1] output; class-token gradient",
    target_layer=lambda visual: visual.transformer.resblocks[-1],
    to_grid=_vit_tokens_to_grid,
    head=_vit_head,
    # The embedding reads only the class token, so patch-token gradients are exactly zero (spec §1):
    # use the class-token gradient (B, D) as (B, D, 1, 1), broadcast over the grid.
    grad_to_grid=lambda g: g[0][:, :, None, None],
    batch_dim=1,
)

FAMILIES = {f.name: f for f in (RESNET, VIT)}


def family_of(model: nn.Module) -> Family:
    from camloc.models.loading import import_clip

    clip_model = import_clip().model

    if isinstance(model.visual, clip_model.ModifiedResNet):
        return RESNET
    if isinstance(model.visual, clip_model.VisionTransformer):
        return VIT
    raise TypeError(f"unsupported CLIP vision tower {type(model.visual).__name__}")
