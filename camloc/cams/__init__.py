"""The CAM engine: the method registry, the method options, the shared per-image context, masked batches and
post-processing. The methods themselves are in `camloc.methods`."""
from camloc.cams.context import CamContext
from camloc.cams.engine import compute_heatmaps
from camloc.cams.registry import METHODS, MethodSpec, list_methods, register_method, resolve_methods

__all__ = ["METHODS", "CamContext", "MethodSpec", "compute_heatmaps", "list_methods", "register_method",
           "resolve_methods"]
