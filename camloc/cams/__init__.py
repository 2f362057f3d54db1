"""CAM methods on CLIP: the registry, the shared per-image context, the engine."""
from camloc.cams.context import CamContext
from camloc.cams.engine import compute_heatmaps
from camloc.cams.registry import METHODS, MethodSpec, list_methods, register_method, resolve_methods

__all__ = ["METHODS", "CamContext", "MethodSpec", "compute_heatmaps", "list_methods", "register_method",
           "resolve_methods"]
