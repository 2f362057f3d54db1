"""Model families as data: where the CAM target layer is, how its output becomes a (C, h, w) grid,
the part of the image encoder after it (the "head"), and how gradients map onto the grid (docs/protocol.md §1).
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
    # The embedding reads only the class token, so patch-token gradients are exactly zero (docs/protocol.md §1):
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
    """The parts of one transformer block the attention methods recombine (batch-first tensors), for the
    `clip` package's and open_clip's blocks (`nn.MultiheadAttention`) and timm's (`Block` with a fused
    `qkv`, `EvaBlock` with fused or separate q/k/v projections, q/k biases, rotary position embeddings
    (`rope`: the trunk's, `block_ropes`), LayerScale `ls1`/`gamma_1`, a sub-LayerNorm after the attention).

    `ln_1(x)`, then `qkv(y)` -> q, k, v per head (the q/k norms and the rotary embedding applied, as the
    model does), any attention `a` over them, `merge(a @ v)` -> the attention's output projection,
    `ls_1` on it for the residual, and `ffn(x)` for the block's second half: the original attention
    recombined this way is the block's own forward (tests/test_open_clip.py checks every family)."""

    def __init__(self, block: torch.nn.Module, rope: torch.Tensor | None = None):
        self.block = block
        attn = block.attn
        self.timm = not isinstance(attn, nn.MultiheadAttention)
        self.heads = attn.num_heads
        self.rope = rope
        if self.timm:
            if getattr(attn, "gate", None) is not None:
                raise TypeError(f"{type(attn).__name__} with gated attention is not supported")
            self.ln_1 = block.norm1
            self.out_proj = attn.proj
            self.ls_1 = _scale(block, "ls1", "gamma_1")
            self.ls_2 = _scale(block, "ls2", "gamma_2")
            self.norm_2 = block.norm2
            self.prefix = int(getattr(attn, "num_prefix_tokens", 0))
        else:
            self.ln_1 = block.ln_1
            self.out_proj = attn.out_proj
            self.ls_1 = getattr(block, "ls_1", torch.nn.Identity())
            self.ls_2 = getattr(block, "ls_2", torch.nn.Identity())
            self.norm_2 = block.ln_2
            self.prefix = 0
        if self.rope is not None and not self.timm:
            raise TypeError("rotary position embeddings belong to timm blocks")

    def in_proj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ln_1-ed tokens (B, N, D) -> the q, k, v projections (B, N, D) each, before heads, norms, rotary."""
        attn = self.block.attn
        if not self.timm:
            return F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if getattr(attn, "qkv", None) is None:  # EVA's separate projections
            return attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(y)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(y) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(y, attn.qkv.weight, bias)
        return qkv.chunk(3, dim=-1)

    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ln_1-ed tokens (B, N, D) -> q, k, v (B, heads, N, d), as the model's attention forms them."""
        batch, n, _ = y.shape
        q, k, v = (t.reshape(batch, n, self.heads, -1).transpose(1, 2) for t in self.in_proj(y))
        if self.timm:
            attn = self.block.attn
            q, k = attn.q_norm(q), attn.k_norm(k)
            if self.rope is not None:
                from timm.layers import apply_rot_embed_cat

                half = getattr(attn, "rotate_half", False)
                p = self.prefix
                q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], self.rope, half=half)], dim=2).type_as(v)
                k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], self.rope, half=half)], dim=2).type_as(v)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> the attention's output projection of (B, N, D) (timm: after its sub-norm)."""
        batch, heads, n, d = o.shape
        o = o.transpose(1, 2).reshape(batch, n, heads * d)
        if self.timm:
            o = self.block.attn.norm(o)
        return self.out_proj(o)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls_2(self.block.mlp(self.norm_2(x)))


class _Gamma(nn.Module):
    def __init__(self, gamma: torch.Tensor):
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


def _scale(block: nn.Module, layer_scale: str, gamma: str) -> nn.Module:
    """timm's LayerScale module (`ls1`) or EVA's bare `gamma_1` parameter, as one callable."""
    if hasattr(block, layer_scale):
        return getattr(block, layer_scale)
    value = getattr(block, gamma, None)
    return torch.nn.Identity() if value is None else _Gamma(value)


def has_blocks(visual: nn.Module) -> bool:
    """A ViT tower with `transformer.resblocks` (OpenAI's and open_clip's own ViTs)."""
    return hasattr(getattr(visual, "transformer", None), "resblocks")


def vit_blocks(visual: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a ViT tower: `transformer.resblocks` or a timm trunk's `blocks`; [] otherwise."""
    if has_blocks(visual):
        return list(visual.transformer.resblocks)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "num_prefix_tokens"):
        return list(trunk.blocks)
    return []


def block_ropes(visual: nn.Module) -> list | None:
    """The rotary position embedding each block of a timm EVA trunk receives at the model's input size
    (timm's `Eva._pos_embed` without dynamic sizes or patch dropout), or None without rotary embeddings."""
    trunk = getattr(visual, "trunk", None)
    rope = getattr(trunk, "rope", None)
    if rope is None:
        return None
    if getattr(trunk, "dynamic_img_size", False):
        raise TypeError("EVA trunks with dynamic image sizes are not supported")
    embed = rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=trunk.patch_embed.grid_size)
    if getattr(trunk, "rope_mixed", False):
        return [embed[i] for i in range(len(trunk.blocks))]
    return [embed] * len(trunk.blocks)


def run_block(visual: nn.Module, family: Family, index: int, x: torch.Tensor) -> torch.Tensor:
    """Block `index` of a ViT tower on batch-first tokens (B, N, D), called as the tower calls it (OpenAI's
    sequence-first blocks on (N, B, D), a timm EVA block with its rotary embedding) -> batch-first output.
    `check_run_block` tests it against the tower's own forward."""
    block = vit_blocks(visual)[index]
    if family.batch_dim == 1:
        return block(x.transpose(0, 1)).transpose(0, 1)
    ropes = block_ropes(visual)
    return block(x) if ropes is None else block(x, rope=ropes[index])


class _Stop(Exception):
    pass


def check_run_block(visual: nn.Module, family: Family, inputs: list[torch.Tensor]) -> None:
    """`run_block` of the second-to-last block on its input from the tower's forward (`encoder_pass`'s block
    inputs) gives the last block's input, or a method that re-runs blocks would be silently wrong: refuse."""
    if len(inputs) < 2:
        return
    with torch.no_grad():
        ours = run_block(visual, family, len(inputs) - 2, inputs[-2]).float()
    theirs = inputs[-1].float()
    tolerance = 1e-4 if inputs[-1].dtype == torch.float32 else 1e-2
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=tolerance,
                                                         atol=tolerance * float(theirs.abs().max())):
        raise TypeError(f"{type(vit_blocks(visual)[-1]).__name__} blocks called one at a time do not reproduce the "
                        "tower's forward (a block argument camloc does not pass?); this method cannot run on it")


def block_access(visual: nn.Module, index: int) -> BlockAccess:
    """`BlockAccess` of block `index` of a ViT tower, with its rotary embedding where the trunk has one."""
    blocks = vit_blocks(visual)
    ropes = block_ropes(visual)
    return BlockAccess(blocks[index], None if ropes is None else ropes[index])


def check_block_access(visual: nn.Module, family: Family, x: torch.Tensor, index: int = -1,
                       features: torch.Tensor | None = None) -> None:
    """Refuse (ModelError) a tower whose blocks camloc's `BlockAccess` does not read right: block `index`'s
    attention recombined as the original from its batch-first input `x` (1, N, D) must give the block's own
    output, within float rounding (1e-4 of its range in fp32, 1e-2 in half precision); on a class-token
    pooled tower, with the image's embedding `features`, the class token through `dense_tokens` must give
    it. A block variant the attention methods were not written for (post-norm blocks, parallel blocks,
    another attention scale) then stops with one line instead of giving maps of a forward the model never
    runs."""
    from camloc.errors import ModelError

    blocks = vit_blocks(visual)
    block = blocks[index]
    try:
        access = block_access(visual, index % len(blocks))
    except (AttributeError, TypeError) as exc:
        raise ModelError(f"the attention methods cannot read {type(block).__name__} blocks ({exc})") from None
    kwargs = {"rope": access.rope} if access.rope is not None else {}
    with torch.no_grad():
        q, k, v = access.qkv(access.ln_1(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        y = x + access.ls_1(access.merge(attn @ v))
        y = y + access.ffn(y)
        own = block(x.transpose(0, 1) if family.batch_dim == 1 else x, **kwargs)
        own = own.transpose(0, 1) if family.batch_dim == 1 else own
    scale = float(own.float().abs().max()) or 1.0
    tolerance = 1e-4 if x.dtype == torch.float32 else 1e-2
    if not float((y.float() - own.float()).abs().max()) <= tolerance * scale:
        raise ModelError(f"camloc's reading of the {type(block).__name__} blocks does not reproduce their forward "
                         "(another block layout or attention scale); the attention methods are not available for "
                         "this model")
    if features is not None and family.pooling == "token" and index in (-1, len(blocks) - 1):
        with torch.no_grad():  # the class token through `dense_tokens` is the model's own embedding
            pooled = dense_tokens(visual, own)[:, 0].float()
        reference = features.float()
        if not float((pooled - reference).abs().max()) <= tolerance * (float(reference.abs().max()) or 1.0):
            raise ModelError(f"camloc's per-token reading of {type(visual).__name__}'s head does not reproduce its "
                             "embedding; the dense methods are not available for this model")


def dense_tokens(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Every token of the last block's output (B, N, D) through the rest of the tower as a token of its
    own -> (B, N, E): OpenAI's and open_clip's ViTs ln_post and proj (MaskCLIP's dense features);
    timm trunks the final norm, the pool's per-token part and the projections (`trunk.norm`, `fc_norm`,
    `trunk.head`, `visual.head`). An attention-pool head (SigLIP's "map") is applied to each token as
    if its query attended to that token alone (softmax weight 1): kv's value part, proj, then the pool's
    residual MLP, as MaskCLIP reads the ResNet attention pool through its value path."""
    if has_blocks(visual):
        x = visual.ln_post(tokens)
        return x @ visual.proj if visual.proj is not None else x
    trunk = visual.trunk
    x = trunk.norm(tokens)
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        x = pool_value_path(pool, x)
    return visual.head(trunk.head(trunk.fc_norm(x)))


def pool_value_path(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's AttentionPoolLatent on every token alone (one latent query, attention weight 1 on the token)."""
    if getattr(pool, "latent_len", 1) != 1:
        raise TypeError("attention pools with several latent queries are not supported")
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    dim = x.shape[-1]
    v = pool.kv(x)[..., dim:]  # kv's output is [k; v] along the channels
    out = pool.proj_drop(pool.proj(v))
    return out + pool.mlp(pool.norm(out)) if pool.mlp is not None else out


def encoder_pass(visual: nn.Module, family: Family, x: torch.Tensor, until: int | None = None) -> tuple:
    """One forward of a batch `x` through the image tower, capturing what the one-forward methods read:
    (the target layer's raw output, the image embeddings (B, E), the batch-first input of every block
    of a ViT tower (`vit_blocks`), or None for other towers). Nothing is differentiated. With `until` (a block
    index of a ViT tower, negative from the end) the forward stops at that block's input, for methods that run
    the blocks from there on themselves: the first two are then None, and the block inputs end with that one."""
    captured: list[torch.Tensor] = []
    inputs: dict[int, torch.Tensor] = {}
    blocks = vit_blocks(visual)
    if until is not None and not blocks:
        raise ValueError(f"{type(visual).__name__} has no transformer blocks")
    last = len(blocks) - 1 if until is None else until % len(blocks)
    handles = [] if until is not None else [family.target_layer(visual).register_forward_hook(
        lambda m, args, out: captured.append(out))]
    handles += [block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
                for i, block in enumerate(blocks[:last + 1])]
    if until is not None:
        def stop(module, args):
            raise _Stop

        handles.append(blocks[last].register_forward_pre_hook(stop))  # after the input's own hook
    features = None
    try:
        with torch.no_grad():
            features = visual(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    seq_first = family.batch_dim == 1
    block_inputs = [inputs[i].transpose(0, 1) if seq_first else inputs[i] for i in range(last + 1)] if blocks else None
    return (None if until is not None else captured[-1].detach()), features, block_inputs
