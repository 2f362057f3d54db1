"""The image tower as stages for the model-randomisation sanity check (Adebayo et al. 2018, "Sanity
Checks for Saliency Maps", cascading randomisation): the head (everything after the last block),
then every block from the top down, then the stem (everything before the first block). Each stage is
a list of the tower's parameters by name, and every parameter belongs to exactly one stage; a tower
with a parameter camloc cannot place is refused rather than left trained.

Re-drawing: each tensor is replaced by independent normal draws with the trained tensor's own mean and
standard deviation (one-element tensors are kept; a constant matrix, such as the zero-initialised
last convolution of an untrained ResNet's residual branches, gets the spread 1 / sqrt(fan-in), and a
constant vector, such as an untrained LayerNorm's ones, stays). Adebayo et al. re-initialise with the layers'
initialisers; matching each tensor's first two moments is the family-independent version of that: the
learnt structure is gone while the activations keep their scale, so a map that stays the same is not
explained by a collapsed (all-zero, all-NaN) forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from camloc.errors import ModelError
from camloc.models.families import vit_blocks

STEM = ("conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "class_embedding", "positional_embedding", "ln_pre",
        "trunk.patch_embed", "trunk.cls_token", "trunk.reg_token", "trunk.pos_embed", "trunk.norm_pre", "trunk.stem")
"""Parameters before the first block: OpenAI/open_clip ViT and ResNet stems, timm trunks' embeddings
(timm's ViT `norm_pre` runs before its blocks; ConvNeXt's is parameter-free)."""
HEAD = ("ln_post", "proj", "attn_pool", "attnpool", "trunk.norm", "trunk.fc_norm", "trunk.attn_pool", "trunk.head",
        "head")
"""Parameters after the last block: ln_post/proj, the ResNet attention pool, timm's final norm and
pooling heads (SigLIP's attention pool), open_clip's projection head."""


@dataclass(frozen=True)
class Stage:
    name: str
    parameters: tuple[str, ...]
    """Names in `visual.named_parameters()`."""


def _blocks(visual: nn.Module) -> list[str]:
    """The tower's blocks bottom-up, as parameter-name prefixes: a ViT's transformer blocks (`vit_blocks`), a
    ModifiedResNet's bottlenecks, or a ConvNeXt trunk's stages (downsample and blocks, a stage at a time)."""
    modules = vit_blocks(visual)
    trunk = getattr(visual, "trunk", None)
    if not modules and all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        modules = [block for i in range(1, 5) for block in getattr(visual, f"layer{i}")]
    elif not modules and trunk is not None and hasattr(trunk, "stages"):
        modules = list(trunk.stages)
    if not modules:
        raise ModelError(f"the sanity check does not know the blocks of a {type(visual).__name__} image tower")
    names = {id(module): name for name, module in visual.named_modules()}
    return [names[id(module)] for module in modules]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cascade_stages(visual: nn.Module) -> list[Stage]:
    """The tower's stages in cascading order: head, the blocks top-down, stem."""
    blocks = _blocks(visual)
    names = [n for n, _ in visual.named_parameters()]
    by_block = {b: tuple(n for n in names if _under(n, b)) for b in blocks}
    placed = {n for group in by_block.values() for n in group}
    rest = [n for n in names if n not in placed]
    head = tuple(n for n in rest if any(_under(n, p) for p in HEAD) and not any(_under(n, p) for p in STEM))
    stem = tuple(n for n in rest if any(_under(n, p) for p in STEM))
    unplaced = [n for n in rest if n not in head and n not in stem]
    if unplaced:
        raise ModelError(f"the sanity check cannot place {', '.join(unplaced[:3])} of the {type(visual).__name__} "
                         "image tower in its cascade (head, blocks, stem)")
    stages = [Stage("head", head)] if head else []
    stages += [Stage(b, by_block[b]) for b in reversed(blocks) if by_block[b]]
    if stem:
        stages.append(Stage("stem", stem))
    return stages


@torch.no_grad()
def redraw_(visual: nn.Module, stage: Stage, generator: torch.Generator) -> int:
    """Re-draw the stage's parameters in place (see the module docstring); the number of values drawn.
    Draws are made on the CPU in float32 from `generator`, so a seed gives the same model on any device."""
    params = dict(visual.named_parameters())
    drawn = 0
    for name in stage.parameters:
        p = params[name]
        if p.numel() < 2:
            continue
        trained = p.detach().float()
        mean, std = float(trained.mean()), float(trained.std())
        if std == 0 and p.ndim >= 2:  # a zero-initialised branch (untrained models): a fan-in spread
            std = (p.shape[0] / p.numel()) ** 0.5
        values = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std + mean
        p.copy_(values.to(device=p.device, dtype=p.dtype))
        drawn += p.numel()
    return drawn
