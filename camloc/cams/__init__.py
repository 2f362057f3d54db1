"""The CAM engine: the method registry, the method options, the shared per-image context, masked batches and
post-processing. The methods themselves are in `camloc.methods`. Its names are imported on first use, so that
reading the option manifest (`camloc.cams.manifest`, for the command line's help) imports no torch."""
_EXPORTS = {"CamContext": "camloc.cams.context", "compute_heatmaps": "camloc.cams.engine",
            "METHODS": "camloc.cams.registry", "MethodSpec": "camloc.cams.registry",
            "list_methods": "camloc.cams.registry", "register_method": "camloc.cams.registry",
            "resolve_methods": "camloc.cams.registry"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'camloc.cams' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
