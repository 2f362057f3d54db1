"""A straightforward gScoreCAM / ScoreCAM, written the way the original implementation runs: one prompt
at a time, a full CLIP forward (image AND text re-encoded) per batch of 64 masked inputs built on the
host, and the gradient from a full backward through the whole model (parameter gradients included).
Used only as the benchmark's baseline; its maps equal camloc's (checked in run.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from camloc.cams.postprocess import grid_maps_to_raw
from camloc.models import ClipModel
from camloc.models.loading import import_clip


def _hooked_grad(model: ClipModel, net: torch.nn.Module, x: torch.Tensor, tokens: torch.Tensor):
    saved = {}
    layer = model.family.target_layer(net.visual)
    h1 = layer.register_forward_hook(lambda m, a, o: saved.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: saved.__setitem__("grad", go[0]))
    try:
        net.zero_grad()
        logits_per_image, _ = net(x, tokens)
        logits_per_image[0, 0].float().backward()
    finally:
        h1.remove(), h2.remove()
    acts = model.family.to_grid(saved["act"].detach())[0].float()
    grads = model.family.grad_to_grid(saved["grad"].detach())[0].float()
    return acts, grads


def straightforward_cam(model: ClipModel, net: torch.nn.Module, image, prompt: str, method: str = "gscorecam",
                        k: int = 300, batch: int = 64) -> np.ndarray:
    """`net`: a separate copy of the CLIP model with trainable parameters (as the original has)."""
    clip = import_clip()
    device = model.device
    x = model.preprocess(image).contiguous()  # NCHW, as the clip package's preprocessing gives
    tokens = clip.tokenize([prompt]).to(device)
    acts, grads = _hooked_grad(model, net, x.clone().requires_grad_(True), tokens)
    channels = acts.shape[0]
    if method == "scorecam":
        chosen, eps = torch.arange(channels), None
    else:
        chosen, eps = grads.mean(dim=(1, 2)).topk(min(k, channels)).indices.cpu(), 1e-6
    acts_host, x_host = acts.cpu(), x.float().cpu()
    n = model.input_size
    scores = torch.zeros(channels)
    with torch.no_grad():
        for start in range(0, len(chosen), batch):
            idx = chosen[start : start + batch]
            up = F.interpolate(acts_host[idx][None], size=(n, n), mode="bilinear", align_corners=True)[0]
            low = up.flatten(1).min(1).values[:, None, None]
            span = up.flatten(1).max(1).values[:, None, None] - low
            masks = (up - low) / (span if eps is None else span + eps)
            masked = (x_host * masks[:, None]).to(device, model.dtype)
            logits_per_image, _ = net(masked, tokens)  # text re-encoded for every batch
            scores[idx] = torch.nan_to_num(logits_per_image[:, 0].float().cpu(), nan=0.0)
    weights = torch.softmax(scores, dim=0).to(acts.device)
    grid = (weights[:, None, None] * acts).sum(0)
    return grid_maps_to_raw(grid[None], image.size)[0]


def trainable_copy(model: ClipModel) -> torch.nn.Module:
    """The model's weights as the clip package builds them (BatchNorm not folded, NCHW), on the same
    device and precision, with requires_grad on, as the original's model is."""
    from camloc.models.clip_model import to_precision
    from camloc.models.loading import load_clip

    net = to_precision(load_clip(model.name)[0].to(model.device), model.dtype).eval()
    return net.requires_grad_(True)
