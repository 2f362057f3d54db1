"""camloc: where is CLIP looking? Zero-shot localization benchmarks for localization-map methods
(the CAMs of the gScoreCAM paper, RISE, LeGrad, the training-free dense methods, ...) on CLIP models
from OpenAI's `clip` package, open_clip and Hugging Face checkpoints.

Pipeline: models (backends + family adapters) -> cams (engine + methods) -> heatmaps -> evaluators
(box, mask IoU, pointing, MaxBoxAccV2, PxAP) -> runner (records, tables) -> report.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
