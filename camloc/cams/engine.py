"""The CAM engine: one image, P prompts, several methods, shared work."""
from __future__ import annotations

import numpy as np
from PIL import Image

from camloc.cams.context import CamContext
from camloc.cams.postprocess import grid_maps_to_raw, input_maps_to_raw, normalized_maps_to_raw
from camloc.cams.registry import MethodSpec, resolve_methods
from camloc.models.clip_model import ClipModel

POSTPROCESSORS = {"grid": grid_maps_to_raw, "resize_minmax": input_maps_to_raw, "resize": normalized_maps_to_raw}


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
    if methods and isinstance(methods, list) and isinstance(methods[0], MethodSpec):
        specs = methods
    else:
        specs = resolve_methods(methods, model.family.name, model.name)
    ctx = context or CamContext(model, image, prompts, options, methods=[s.name for s in specs])
    return {spec.name: POSTPROCESSORS[spec.postprocess](spec.compute(ctx), ctx.raw_size) for spec in specs}
