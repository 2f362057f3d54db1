"""Model families as data: where the CAM target layer is, how its output becomes a (C, h, w) grid,
the part of the image encoder after it (the "head"), and how gradients map onto the grid (spec §1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
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
    pooling: str = "token"
    """Transformers: how the embedding reads the tokens (token: the class token; avg: the patch tokens'
    mean; map: an attention-pool query), which HilaCAM's relevance reads out."""
    prefix: int = 1
    """Transformers: leading non-patch tokens (class token, registers)."""


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

FAMILY_NAMES = ("rn", "vit", "vit-avg", "timm-vit", "convnext")
"""rn: ModifiedResNet (OpenAI's layout, both backends); vit: class-token pooled ViT (OpenAI, open_clip);
vit-avg: open_clip ViT pooled by averaging the patch tokens; timm-vit: open_clip's timm trunks with
tokens (SigLIP/SigLIP2 attention-pool, EVA02, PE-Core); convnext: timm convolutional trunks."""
FAMILY_LABELS = {"rn": "ResNet", "vit": "ViT", "vit-avg": "average-pooled ViT",
                 "timm-vit": "timm-trunk ViT", "convnext": "ConvNeXt"}
FAMILIES = {f.name: f for f in (RESNET, VIT)}


def tokens_to_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, L, D) batch-first tokens with `prefix` leading non-patch tokens -> (B, D, g, g)."""
    batch, length, dim = tokens.shape
    grid = math.isqrt(length - prefix)
    if grid * grid != length - prefix:
        raise ValueError(f"target has {length - prefix} patch tokens, not a square grid")
    return tokens[:, prefix:].transpose(1, 2).reshape(batch, dim, grid, grid)


def open_clip_vit(visual: nn.Module) -> Family:
    """open_clip's own VisionTransformer (batch-first blocks since open_clip 2.26): target the last
    block's output; the head is the model's own pooling (`_pool`: class token or patch average,
    ln_post before or after) and projection. Class-token pooling reads only the class token, so its
    gradient is broadcast over the grid as for OpenAI's ViT; average pooling has real patch gradients."""
    pool = getattr(visual, "pool_type", "tok")
    if getattr(visual, "attn_pool", None) is not None:
        raise TypeError("open_clip ViTs with an attention-pool head (CoCa) are not supported")
    prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0

    def head(vis: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = vis._pool(tokens)
        return pooled @ vis.proj if vis.proj is not None else pooled

    token_pooled = pool == "tok" and prefix == 1
    return Family(
        name="vit" if token_pooled else "vit-avg",
        description=f"open_clip VisionTransformer ({pool} pooling): target visual.transformer.resblocks[-1] output",
        target_layer=lambda vis: vis.transformer.resblocks[-1],
        to_grid=lambda x: tokens_to_grid(x, prefix),
        head=head,
        grad_to_grid=(lambda g: g[:, 0][:, :, None, None]) if token_pooled else (lambda g: tokens_to_grid(g, prefix)),
        batch_dim=0,
        pooling="token" if token_pooled else "avg",
        prefix=prefix,
    )


def timm_trunk(visual: nn.Module) -> Family:
    """open_clip's TimmModel: a timm trunk (`visual.trunk`) and open_clip's projection (`visual.head`).
    Transformers (blocks + norm; SigLIP's attention-pool head, EVA02, PE-Core): target the last
    block, patch tokens after timm's `num_prefix_tokens`, head = trunk.norm, trunk.forward_head,
    visual.head; every token's gradient is real. ConvNeXt (stages): target the last stage, head =
    trunk.norm_pre (if any), trunk.forward_head, visual.head."""
    trunk = visual.trunk
    if hasattr(trunk, "blocks") and hasattr(trunk, "num_prefix_tokens"):
        prefix = int(trunk.num_prefix_tokens)
        pool = getattr(trunk, "global_pool", "")
        # a class-token pooled trunk (EVA02 CLIP) reads only the class token: broadcast its gradient
        token_pooled = pool == "token" and prefix >= 1

        def head(vis: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
            return vis.head(vis.trunk.forward_head(vis.trunk.norm(tokens)))

        return Family(
            name="timm-vit",
            description=f"open_clip timm trunk {type(trunk).__name__} ({pool or 'no'} pooling): target "
                        f"trunk.blocks[-1] output, {prefix} prefix tokens",
            target_layer=lambda vis: vis.trunk.blocks[-1],
            to_grid=lambda x: tokens_to_grid(x, prefix),
            head=head,
            grad_to_grid=(lambda g: g[:, 0][:, :, None, None]) if token_pooled else (lambda g: tokens_to_grid(g, prefix)),
            batch_dim=0,
            pooling="token" if token_pooled else ("map" if pool == "map" else "avg"),
            prefix=prefix,
        )
    if hasattr(trunk, "stages"):
        def conv_head(vis: nn.Module, x: torch.Tensor) -> torch.Tensor:
            norm_pre = getattr(vis.trunk, "norm_pre", None)
            return vis.head(vis.trunk.forward_head(norm_pre(x) if norm_pre is not None else x))

        return Family(
            name="convnext",
            description=f"open_clip timm trunk {type(trunk).__name__}: target trunk.stages[-1] output",
            target_layer=lambda vis: vis.trunk.stages[-1],
            to_grid=lambda x: x,
            head=conv_head,
            grad_to_grid=lambda g: g,
            batch_dim=0,
        )
    raise TypeError(f"unsupported timm trunk {type(trunk).__name__} (neither transformer blocks nor conv stages)")


def family_of(model: nn.Module) -> Family:
    from camloc.models.loading import import_clip

    clip_model = import_clip().model

    if isinstance(model.visual, clip_model.ModifiedResNet):
        return RESNET
    if isinstance(model.visual, clip_model.VisionTransformer):
        return VIT
    kind = type(model.visual).__module__ + "." + type(model.visual).__name__
    if kind == "open_clip.modified_resnet.ModifiedResNet":
        return RESNET  # OpenAI's layout: layer4, attnpool
    if kind == "open_clip.transformer.VisionTransformer":
        return open_clip_vit(model.visual)
    if kind == "open_clip.timm_model.TimmModel":
        return timm_trunk(model.visual)
    raise TypeError(f"unsupported CLIP vision tower {type(model.visual).__name__}")


class BlockAccess:
    """The parts of one transformer block the dense methods recombine (batch-first tensors)."""

    def __init__(self, block: torch.nn.Module):
        self.block = block
        attn = block.attn
        self.heads = attn.num_heads
        self.weight, self.bias = attn.in_proj_weight, attn.in_proj_bias
        self.out_proj = attn.out_proj
        self.ls_1 = getattr(block, "ls_1", torch.nn.Identity())
        self.ls_2 = getattr(block, "ls_2", torch.nn.Identity())

    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ln_1-ed tokens (B, N, D) -> q, k, v (B, heads, N, d)."""
        batch, n, dim = y.shape
        q, k, v = F.linear(y, self.weight, self.bias).chunk(3, dim=-1)
        return tuple(t.reshape(batch, n, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> out_proj((B, N, D))."""
        batch, heads, n, d = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(batch, n, heads * d))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls_2(self.block.mlp(self.block.ln_2(x)))


def has_blocks(visual: nn.Module) -> bool:
    """A ViT tower with `transformer.resblocks` (OpenAI's and open_clip's own ViTs)."""
    return hasattr(getattr(visual, "transformer", None), "resblocks")


def encoder_pass(visual: nn.Module, family: Family, x: torch.Tensor) -> tuple:
    """One forward of a batch `x` through the image tower, capturing what the one-forward methods read:
    (the target layer's raw output, the image embeddings (B, E), the batch-first input of every block
    of a `transformer.resblocks` ViT tower, or None for other towers). Nothing is differentiated."""
    captured: list[torch.Tensor] = []
    handles = [family.target_layer(visual).register_forward_hook(lambda m, args, out: captured.append(out))]
    inputs: dict[int, torch.Tensor] = {}
    blocks = list(visual.transformer.resblocks) if has_blocks(visual) else []
    handles += [block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
                for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            features = visual(x)
    finally:
        for handle in handles:
            handle.remove()
    seq_first = family.batch_dim == 1
    block_inputs = [inputs[i].transpose(0, 1) if seq_first else inputs[i] for i in range(len(blocks))] if blocks else None
    return captured[-1].detach(), features, block_inputs
