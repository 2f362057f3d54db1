"""`CamContext`: what the methods share for one image and P prompts, each computed at most once.

One forward pass of the image encoder records the target-layer output; the P gradients
d s_p / d A come from ONE backward through the part of the encoder after the target layer, with the
activations repeated P times (the backbone before the target layer needs no backward at all).
"""
from __future__ import annotations

from functools import cached_property

import torch
from PIL import Image

from camloc.models.clip_model import ClipModel


class CamContext:
    def __init__(self, model: ClipModel, image: Image.Image, prompts: list[str], options: dict | None = None):
        if not prompts:
            raise ValueError("at least one prompt is needed")
        self.model = model
        self.prompts = list(prompts)
        self.raw_size = image.size  # (W, H)
        self.input = model.preprocess(image)  # (1, 3, n, n)
        self.options = dict(options or {})

    @cached_property
    def text_features(self) -> torch.Tensor:
        """(P, E) normalised fp32."""
        return self.model.text_features(self.prompts)

    @cached_property
    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One image-encoder forward: (raw target output, detached; image embedding (1, E))."""
        captured = []
        layer = self.model.family.target_layer(self.model.visual)
        handle = layer.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with torch.no_grad():
                features = self.model.visual(self.input)
        finally:
            handle.remove()
        return captured[-1].detach(), features

    @cached_property
    def activations(self) -> torch.Tensor:
        """A: target activations (C, h, w), fp32."""
        raw, _ = self._forward
        return self.model.family.to_grid(raw)[0].float()

    @cached_property
    def image_scores(self) -> torch.Tensor:
        """s_p(x) of the unmasked image, (P,) fp32."""
        _, features = self._forward
        return self.model.scores(features, self.text_features)[0]

    @cached_property
    def gradients(self) -> torch.Tensor:
        """G = d s_p / d A for all P prompts: (P, C, h, w), or (P, C, 1, 1) on ViT (class token), fp32."""
        raw, _ = self._forward
        family = self.model.family
        n_prompts = len(self.prompts)
        sizes = [-1] * raw.dim()
        sizes[family.batch_dim] = n_prompts
        repeated = raw.expand(*sizes).clone().requires_grad_(True)
        with torch.enable_grad():
            features = family.head(self.model.visual, repeated).float()
            features = features / features.norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale * (features * self.text_features).sum(dim=-1)  # s_p of copy p
            (grad,) = torch.autograd.grad(scores.sum(), repeated)
        return family.grad_to_grid(grad).float()
