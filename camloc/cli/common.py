"""Shared CLI pieces: error reporting and options used by several commands."""
from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts: busy-waiting threads crawl on small machines

import typer
from rich.console import Console
from rich.markup import escape

from camloc.config import CLIP_ES_BACKGROUND
from camloc.errors import CamlocError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one yellow line each, not Python's file:line + source form."""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}")


warnings.showwarning = _show_warning

ModelOption = typer.Option(..., "--model", "-m", help="CLIP name (see `camloc list models`), tiny-rn/tiny-vit, random-<name>, or a checkpoint path.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
PrecisionOption = typer.Option("auto", "--precision", help="Encoder precision: auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16. Scores are always fp32.")
CacheOption = typer.Option(None, "--cache-dir", help="Folder for downloaded CLIP weights [default: $CAMLOC_CACHE_DIR or ~/.cache/clip].")
ThresholdOption = typer.Option("otsu", "--threshold", help="Binarisation for boxes: otsu, or a single value in [0, 1].")
TopkOption = typer.Option("auto", "--topk", help="gScoreCAM: channels kept, or auto: 300 for OpenAI models (the paper), ResNets and ConvNeXt, 100 for open_clip transformers (the gScoreCAM authors' advice for 768-channel ViTs); recorded as resolved. Capped at the channel count with a warning.")
GroupingOption = typer.Option("kmeans", "--grouping", help="GroupCAM channel groups: kmeans (the original CLIP port) or chunk (the GroupCAM paper).")
StartLayerOption = typer.Option(0, "--start-layer", help="HilaCAM: first block used (0 = all blocks, -1 = the last only).")
ChunkOption = typer.Option("auto", "--chunk-size", help="Masked images per encoder batch: a number, or auto (16 on CPU, 8 above 288 px inputs; from free memory on CUDA).")
ImageBatchOption = typer.Option("auto", "--image-batch", help="Images per device step: their encoder forward runs as one batch for the one-forward methods (gradient family, dense methods, CLIP-ES, Grad-ECLIP); a number, or auto (8; 1 when a masked-forward method runs). The maps of one image at a time, up to float rounding.")
CompileOption = typer.Option("auto", "--compile", help="Masked forwards (ScoreCAM, gScoreCAM, GroupCAM, RISE) through torch.compile in static chunk shapes: on, off, or auto (off on the CPU, where it does not pay; off on CUDA until measured there). Maps equal the eager ones within float rounding.")
DataRootOption = typer.Option(None, "--data-root", help="Folder holding the datasets as their archives extract [default: $CAMLOC_DATA or ./data].")
SplitOption = typer.Option(None, "--split", help="Dataset split [default: val2017 (coco), train2017 (coco-train-balanced), test (partimagenet), validation (ade20k-scenes)].")
AnnFileOption = typer.Option(None, "--ann-file", help="Annotation file, overriding the data-root layout.")
ImageDirOption = typer.Option(None, "--image-dir", help="Image folder, overriding the data-root layout.")
PerClassOption = typer.Option(100, "--per-class", help="coco-train-balanced: images drawn per class.")
IncludeStuffOption = typer.Option(False, "--include-stuff", help="COCO: also evaluate stuff categories (panoptic detection JSON: ids above 90), refused by default.")
AdeExtentOption = typer.Option(None, "--ade-extent", help="ade20k-scenes, full release: ground truth from the visible pixels (visible, the default) or the amodal JSON polygons (amodal).")
MaxPixelsOption = typer.Option(None, "--max-pixels", help="Accept images up to this many pixels (Pillow refuses more than about 89 million as a decompression bomb).")
SkipBadRecordsOption = typer.Option(False, "--skip-bad-records", help="Skip (and count) record lines that are not valid records instead of stopping.")
ProtocolsOption = typer.Option("box", "--protocols", help="Comma list of box (always scored), mask-iou, pointing, maxboxacc, pxap (see the README's Protocols).")
PointingToleranceOption = typer.Option(15.0, "--pointing-tolerance", help="Pointing game: a hit within this many pixels of the ground truth.")
CamCurveIntervalOption = typer.Option(0.01, "--cam-curve-interval", help="MaxBoxAccV2 and PxAP: step of the threshold sweep (wsolevaluation's cam_curve_interval).")
SubsetSeedOption = typer.Option(None, "--subset-seed", help="Seed of the random --limit subset and of coco-train-balanced's draw (default 0 there).")


RiseMasksOption = typer.Option(8000, "--rise-masks", help="RISE: number of random masks (the original's default 8000).")
RiseCellOption = typer.Option(8, "--rise-cell", help="RISE: grid cells per side (s).")
RiseP1Option = typer.Option(0.1, "--rise-p1", help="RISE: probability that a grid cell is kept.")
RiseMasksFileOption = typer.Option(None, "--rise-masks-file", help="RISE: use these masks (.npz with key masks, (N, n, n) float32) instead of drawing them from --seed.")


LegradLayersOption = typer.Option(2, "--legrad-layers", help="LeGrad: the last K blocks used (the reference's 2; 0 = every block).")


GemBlocksOption = typer.Option(6, "--gem-blocks", help="GEM: last blocks on the self-self path (gem-torch's default depth 7 = 6 blocks).")
NaclipStdOption = typer.Option(5.0, "--naclip-std", help="NACLIP: standard deviation of the Gaussian neighbourhood, in patches (the reference's 5).")
BackgroundOption = typer.Option(CLIP_ES_BACKGROUND, "--background", help="CLIP-ES: comma list of background words scored in the softmax beside the image's prompts (CLIP-ES's COCO list), as written: no prompt template is applied.")
ContrastOption = typer.Option("empty", "--contrast", help="CLIP Surgery's redundant-feature removal: none, empty (subtract the empty prompt's embedding: the reference's single-text demo), labels (the image's prompts, >= 2 needed) or dataset (every prompt of the dataset; eval and threshold-search).")
EclipOfficialOption = typer.Option(False, "--eclip-official", help="Grad-ECLIP: recompute the last block with one attention head over all channels, as the official code does (a deviation from the model's forward), instead of the model's real heads.")
GemIterationsOption = typer.Option(1, "--gem-iterations", help="GEM: self-self refinement iterations (the reference's 1).")


# The method parameters every computing command (eval, explain, threshold-search) takes: parameter name ->
# (type, option). `with_method_options` adds them to a command; `Settings.method_options` reads them.
METHOD_OPTIONS = {
    "topk": (str, TopkOption), "grouping": (str, GroupingOption), "start_layer": (int, StartLayerOption),
    "rise_masks": (int, RiseMasksOption), "rise_cell": (int, RiseCellOption), "rise_p1": (float, RiseP1Option),
    "rise_masks_file": (Optional[Path], RiseMasksFileOption), "legrad_layers": (int, LegradLayersOption),
    "gem_blocks": (int, GemBlocksOption), "gem_iterations": (int, GemIterationsOption),
    "naclip_std": (float, NaclipStdOption), "background": (str, BackgroundOption), "contrast": (str, ContrastOption),
    "eclip_official": (bool, EclipOfficialOption),
}


def with_method_options(command):
    """Give a typer command the METHOD_OPTIONS, placed before its `chunk_size` option: they reach the
    command as one dict, its `method_values` parameter (name -> value as given on the command line)."""
    signature = inspect.signature(command)
    params = [p for name, p in signature.parameters.items() if name != "method_values"]
    at = next(i for i, p in enumerate(params) if p.name == "chunk_size")
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)
             for name, (kind, option) in METHOD_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in METHOD_OPTIONS}
        return command(**kwargs, method_values=values)

    wrapper.__signature__ = signature.replace(parameters=params[:at] + added + params[at:])
    return wrapper


def method_options(topk: int | str, grouping: str, start_layer: int, rise_masks: int = 8000, rise_cell: int = 8,
                   rise_p1: float = 0.1, rise_masks_file=None, legrad_layers: int = 2, gem_blocks: int = 6,
                   gem_iterations: int = 1, naclip_std: float = 5.0, background: str = CLIP_ES_BACKGROUND,
                   contrast: str = "empty", eclip_official: bool = False) -> dict:
    """The method parameters that change results (recorded in configs and summaries). `topk` may be
    "auto", resolved per model family once the model is loaded (`camloc.cams.registry.resolve_options`)."""
    if topk != "auto":
        try:
            topk = int(topk)
        except (TypeError, ValueError):
            raise CamlocError(f"--topk {topk!r} must be a number of channels or auto") from None
        if topk < 1:
            raise CamlocError(f"--topk must be at least 1, got {topk}")
    if grouping not in ("kmeans", "chunk"):
        raise CamlocError(f"--grouping {grouping!r} is not one of kmeans, chunk")
    if legrad_layers < 0:
        raise CamlocError(f"--legrad-layers must be 0 (every block) or more, got {legrad_layers}")
    if not naclip_std > 0:
        raise CamlocError(f"--naclip-std must be positive, got {naclip_std}")
    if gem_blocks < 1 or gem_iterations < 0:
        raise CamlocError(f"--gem-blocks must be at least 1 and --gem-iterations 0 or more (got {gem_blocks}, "
                          f"{gem_iterations})")
    if rise_masks < 1 or rise_cell < 1 or not 0 < rise_p1 <= 1:
        raise CamlocError(f"RISE needs --rise-masks >= 1, --rise-cell >= 1 and 0 < --rise-p1 <= 1 (got {rise_masks}, "
                          f"{rise_cell}, {rise_p1})")
    background = parse_background(background)
    if contrast not in CONTRASTS:
        raise CamlocError(f"--contrast {contrast!r} is not one of {', '.join(CONTRASTS)}")
    file = str(Path(rise_masks_file).resolve()) if rise_masks_file else None
    if file and not Path(file).is_file():
        raise CamlocError(f"--rise-masks-file {rise_masks_file} does not exist")
    return {"topk": topk, "grouping": grouping, "start_layer": start_layer, "rise_masks": int(rise_masks),
            "rise_cell": int(rise_cell), "rise_p1": float(rise_p1), "rise_masks_file": file,
            "legrad_layers": int(legrad_layers), "gem_blocks": int(gem_blocks), "gem_iterations": int(gem_iterations),
            "naclip_std": float(naclip_std), "background": background, "contrast": contrast,
            "eclip_official": bool(eclip_official)}


CONTRASTS = ("none", "empty", "labels", "dataset")


def parse_background(value) -> str:
    """--background: a comma list (or, from a config file, a list) of words -> "w1,w2,..." without blanks
    or repeats. Empty is refused: a softmax over one prompt alone is constant, its gradient zero."""
    words = value if isinstance(value, (list, tuple)) else str(value).split(",")
    words = list(dict.fromkeys(w.strip() for w in words if str(w).strip()))
    if not words:
        raise CamlocError("--background is empty: CLIP-ES needs at least one background word (a softmax over a "
                          "single prompt is constant and its map all zeros); give e.g. --background ground,sky")
    return ",".join(words)


def positive_or_auto(value: str, option: str) -> int | str:
    """A count option that takes a positive number or `auto`."""
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise CamlocError(f"{option} {value!r} must be a positive number or auto")
    return size


def parse_chunk_size(value: str) -> int | str:
    return positive_or_auto(value, "--chunk-size")


def parse_image_batch(value: str) -> int | str:
    return positive_or_auto(value, "--image-batch")


def parse_compile(value: str) -> str:
    from camloc.models.encoder import check_compile

    return check_compile(value)


def parse_threshold(value: str) -> str | float:
    if value == "otsu":
        return value
    try:
        t = float(value)
    except ValueError:
        raise CamlocError(f"--threshold {value!r} is neither 'otsu' nor a number in [0, 1]") from None
    if not 0 <= t <= 1:
        raise CamlocError(f"--threshold {value} is outside [0, 1]")
    return t


def reports_errors(fn):
    """Turn `CamlocError` into one red line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CamlocError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a full disk, a read-only or forbidden output: one line, not a traceback
            from camloc.runfiles import write_error_line

            line = write_error_line(exc)
            if line is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(line)}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: results written so far are kept; run the same command again to resume")
            sys.exit(130)

    return wrapper
