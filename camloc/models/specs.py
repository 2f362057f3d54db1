"""CLIP architectures as data: the positional arguments of `clip.model.CLIP`.

`clip_args = (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)`.
The official entries are those of OpenAI's released checkpoints (docs/protocol.md §1); the tiny entries are the
random-init models of the golden fixtures (`tests/golden/README.md` §2).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    clip_args: tuple
    seed: int | None = None  # set for random-init models
    official: bool = False   # downloadable through the `clip` package

    @property
    def family(self) -> str:
        return "rn" if isinstance(self.clip_args[2], tuple) else "vit"

    @property
    def input_size(self) -> int:
        return self.clip_args[1]


_TEXT = (77, 49408)
OFFICIAL_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("RN50", (1024, 224, (3, 4, 6, 3), 64, None, *_TEXT, 512, 8, 12), official=True),
        ModelSpec("RN101", (512, 224, (3, 4, 23, 3), 64, None, *_TEXT, 512, 8, 12), official=True),
        ModelSpec("RN50x4", (640, 288, (4, 6, 10, 6), 80, None, *_TEXT, 640, 10, 12), official=True),
        ModelSpec("RN50x16", (768, 384, (6, 8, 18, 8), 96, None, *_TEXT, 768, 12, 12), official=True),
        ModelSpec("RN50x64", (1024, 448, (3, 15, 36, 10), 128, None, *_TEXT, 1024, 16, 12), official=True),
        ModelSpec("ViT-B/32", (512, 224, 12, 768, 32, *_TEXT, 512, 8, 12), official=True),
        ModelSpec("ViT-B/16", (512, 224, 12, 768, 16, *_TEXT, 512, 8, 12), official=True),
        ModelSpec("ViT-L/14", (768, 224, 24, 1024, 14, *_TEXT, 768, 12, 12), official=True),
        ModelSpec("ViT-L/14@336px", (768, 336, 24, 1024, 14, *_TEXT, 768, 12, 12), official=True),
    ]
}

TINY_SPECS: dict[str, ModelSpec] = {
    "tiny-rn": ModelSpec("tiny-rn", (64, 128, (1, 1, 1, 1), 8, None, *_TEXT, 64, 1, 1), seed=6),
    "tiny-vit": ModelSpec("tiny-vit", (64, 64, 2, 64, 16, *_TEXT, 64, 1, 1), seed=16),
    # the frontier fixtures' multi-head ViT (tests/golden-frontier/README.md §2): width 128, 2 heads, 3 blocks, 96 px
    "tiny-vit-mh": ModelSpec("tiny-vit-mh", (64, 96, 3, 128, 16, *_TEXT, 64, 1, 1), seed=17),
}

# Real-size random-init models (`random-RN50`, ...) for benchmarks: real compute, no weights needed.
RANDOM_SPECS: dict[str, ModelSpec] = {
    f"random-{name}": ModelSpec(f"random-{name}", spec.clip_args, seed=0) for name, spec in OFFICIAL_SPECS.items()
}

ALL_SPECS: dict[str, ModelSpec] = {**OFFICIAL_SPECS, **TINY_SPECS, **RANDOM_SPECS}


def family_hint(name: str) -> str | None:
    """The family of a known model name without building it (None for checkpoint paths)."""
    spec = ALL_SPECS.get(name)
    return spec.family if spec else None
