"""CLIP loading, model families (target layer, reshape, gradient rule) and preprocessing."""
from camloc.models.clip_model import ClipModel, resolve_device, resolve_precision
from camloc.models.families import FAMILIES, Family, family_of
from camloc.models.loading import default_cache_dir, list_models, load_clip
from camloc.models.preprocess import load_image, preprocess
from camloc.models.specs import ALL_SPECS, ModelSpec

__all__ = [
    "ALL_SPECS", "FAMILIES", "ClipModel", "Family", "ModelSpec", "default_cache_dir", "family_of",
    "list_models", "load_clip", "load_image", "preprocess", "resolve_device", "resolve_precision",
]
