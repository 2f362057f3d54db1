"""camloc: where is CLIP looking? Zero-shot localization benchmarks for localization-map methods
(the CAMs of the gScoreCAM paper, RISE, LeGrad, the training-free dense methods, ...) on CLIP models
from OpenAI's `clip` package, open_clip and Hugging Face checkpoints.

Pipeline: models (backends + family adapters) -> cams (engine + methods, their options) -> run
(identity, pipeline, finishing, rescore, sharding, heatmap cache) -> evaluators (box, mask IoU,
pointing, MaxBoxAccV2, PxAP) -> report (tables, HTML, figures). `camloc.api` is the Python face
(re-exported here, imported on first use so `import camloc` stays light); `camloc.cli` the command line.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "load_model": "camloc.api", "explain": "camloc.api", "evaluate": "camloc.api", "Explanation": "camloc.api",
    "list_methods": "camloc.api", "list_models": "camloc.api", "list_datasets": "camloc.api",
    "rescore": "camloc.api", "report_table": "camloc.api", "sanity": "camloc.api", "wrap_model": "camloc.api",
    "box_from_heatmap": "camloc.evaluators.boxes", "iou": ("camloc.evaluators.iou", "box_iou"),
    "best_iou": "camloc.evaluators.iou", "mask_iou": "camloc.evaluators.protocols",
    "pointing_hit": "camloc.evaluators.protocols", "energy_pointing": "camloc.evaluators.protocols",
    "MaxBoxAcc": "camloc.evaluators.protocols", "PxAP": "camloc.evaluators.protocols",
    "SegmentationState": "camloc.evaluators.segmentation",
    "ClipModel": "camloc.models.clip_model", "errors": ("camloc.errors", None),
    # the author surface of a method of one's own (docs/methods.md)
    "register_method": "camloc.cams.registry", "method_option": "camloc.cams.options",
    "CamContext": "camloc.cams.context", "MethodSpec": "camloc.cams.registry", "load_plugin": "camloc.plugins",
    "register_dataset": "camloc.datasets.registry",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'camloc' has no attribute {name!r}")
    target = _EXPORTS[name]
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = importlib.import_module(module) if attribute is None else getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
