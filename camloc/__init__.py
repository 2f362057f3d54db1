"""camloc: where is CLIP looking? Zero-shot localization benchmarks for CAM methods on OpenAI CLIP.

Pipeline: models (CLIP + family adapters) -> cams (engine + methods) -> heatmaps -> evaluators
(box, IoU, meters) -> runner (records, tables).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
