"""The CAM engine: one image, P prompts, several methods, shared work."""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from camloc.cams.context import CamContext, Ledger, synchronize
from camloc.cams.postprocess import native_to_raw, to_native
from camloc.cams.registry import MethodSpec, resolve_methods
from camloc.models.clip_model import ClipModel


def compute_native(
    model: ClipModel,
    image: Image.Image,
    prompts: list[str],
    methods: str | list[str] | list[MethodSpec],
    options: dict | None = None,
    context: CamContext | None = None,
    seconds: dict | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """{method: (post-processing kind, (P, h, w) normalised maps at the method's native resolution)}.
    `native_to_raw(kind, maps, image.size)` gives the raw-size heatmaps; `seconds` (a dict) gets each
    method's time on the device (`compute_raw`)."""
    raw = compute_raw(model, image, prompts, methods, options, context, seconds)
    return {name: (kind, to_native(kind, maps)) for name, (kind, maps) in raw.items()}


def compute_raw(model: ClipModel, image: Image.Image, prompts: list[str], methods, options: dict | None = None,
                context: CamContext | None = None, seconds: dict | None = None) -> dict:
    """{method: (post-processing kind, (P, h, w) maps exactly as the method computes them, before any
    post-processing, as a tensor on the model's device)}: what `explain --native` saves. `seconds` (a dict)
    gets each method's device time on the image, the device synchronised before each clock read: its own
    work plus an even share of every value it reads that the methods share (the encoder forward, text
    features, gradients; `Ledger`)."""
    if methods and isinstance(methods, list) and isinstance(methods[0], MethodSpec):
        specs = methods
    else:
        specs = resolve_methods(methods, model.family, model.name)
    ctx = context or CamContext(model, image, prompts, options, methods=[s.name for s in specs])
    if seconds is None:
        return {spec.name: (spec.postprocess, run_method(spec, ctx)) for spec in specs}
    ledger = ctx.__dict__.setdefault("ledger", Ledger())
    out, own = {}, {}
    for spec in specs:
        ledger.method, spent = spec.name, ledger.spent
        started = time.perf_counter()
        out[spec.name] = (spec.postprocess, run_method(spec, ctx))
        synchronize(model.device)
        own[spec.name] = time.perf_counter() - started - (ledger.spent - spent)
    ledger.method = None
    seconds.update(ledger.method_seconds(own))
    return out


def run_method(spec: MethodSpec, ctx: CamContext):
    """`spec.compute` on the image's context, or on its unbatched twin for a method whose maps must not see a
    batch's rounding (`MethodSpec.unbatched`)."""
    return spec.compute(ctx.alone() if spec.unbatched else ctx)


def compute_heatmaps(
    model: ClipModel,
    image: Image.Image,
    prompts: list[str],
    methods: str | list[str] | list[MethodSpec],
    options: dict | None = None,
    context: CamContext | None = None,
) -> dict[str, np.ndarray]:
    """Heatmaps at raw image size for every method and prompt: {method: (P, H, W) float32}.

    All methods share one `CamContext`, so the forward pass, the batched backward and (for the
    score family) the masked embeddings are computed once for the image.
    """
    native = compute_native(model, image, prompts, methods, options, context)
    return {name: native_to_raw(kind, maps, image.size) for name, (kind, maps) in native.items()}
