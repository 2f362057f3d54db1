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
from rich.markup import escape

from camloc.errors import CamlocError
from camloc.run.progress import err_console  # the progress bars' console: warnings print above a running bar


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one yellow line each, not Python's file:line + source form."""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}")


warnings.showwarning = _show_warning

ModelOption = typer.Option(..., "--model", "-m", help="CLIP name (see `camloc list models`), tiny-rn/tiny-vit, random-<name>, or a checkpoint path.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
PrecisionOption = typer.Option("auto", "--precision", help="Encoder precision: auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16. Scores are always fp32.")
CacheOption = typer.Option(None, "--cache-dir", help="Folder for downloaded CLIP weights [default: $CAMLOC_CACHE_DIR or ~/.cache/clip].")
ThresholdOption = typer.Option("otsu", "--threshold", help="Binarisation for boxes: otsu, or a single value in [0, 1].")
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
ProtocolsOption = typer.Option("box", "--protocols", help="Comma list of box (always scored), mask-iou, pointing, maxboxacc, pxap, chefer-seg, imagenet-s, points, and the faithfulness protocols deletion-rise, insertion-rise, deletion-eclip, road (these run the model on perturbed images; see docs/protocols.md).")
FaithStepsOption = typer.Option(224, "--faith-steps", help="deletion-rise/insertion-rise: points of the curve besides the first (RISE: 224 at 224x224).")
FaithBaselineOption = typer.Option(None, "--faith-baseline", help="deletion-rise/insertion-rise: what removed pixels become, zero (the normalisation's mean colour), blur or mean, for both curves [default: RISE's zero for deletion, blur for insertion].")
FaithScoreOption = typer.Option("softmax", "--faith-score", help="deletion-rise/insertion-rise/road: softmax (probability of the prompt among the image's prompts) or cosine.")
RoadPercentilesOption = typer.Option(None, "--road-percentiles", help="road: comma list of percentiles (pytorch-grad-cam's: MoRF p removes the pixels at or above the map's p-th percentile) [default: 10,20,...,90].")
FaithBatchOption = typer.Option(64, "--faith-batch", help="Faithfulness protocols: perturbed images per forward (memory only; results do not depend on it).")
PointingToleranceOption = typer.Option(15.0, "--pointing-tolerance", help="Pointing game: a hit within this many pixels of the ground truth.")
CamCurveIntervalOption = typer.Option(0.01, "--cam-curve-interval", help="MaxBoxAccV2 and PxAP: step of the threshold sweep (wsolevaluation's cam_curve_interval).")
SubsetSeedOption = typer.Option(None, "--subset-seed", help="Seed of the random --limit subset and of coco-train-balanced's draw (default 0 there).")


def comma_list(value):
    """A comma list option ("a, b,c") -> ["a", "b", "c"]; None and lists (from a config file) as they are."""
    if value is None or isinstance(value, list):
        return value
    return [v.strip() for v in str(value).split(",") if v.strip()]


def method_typer_options() -> dict:
    """The built-in methods' options as typer options: parameter name -> (annotation, typer.Option), read from
    their manifest (`camloc.cams.manifest`, kept equal to the live table by a test) so that building the command
    line imports no method (and no torch); each shown under its methods' help panel."""
    from camloc.cams.manifest import KINDS, read

    out = {}
    for o in read():
        kind = KINDS[o["kind"]]
        panel = "Method options" + (f": {', '.join(o['methods'])}" if o["methods"] else "")
        out[o["name"]] = (Optional[Path] if kind is Path else kind,
                          typer.Option(o["default"], "--" + o["name"].replace("_", "-"), help=o["help"],
                                       rich_help_panel=panel))
    return out


PluginOption = typer.Option([], "--plugin", help="A plug-in to load first: a .py file or a module name; repeatable (also $CAMLOC_PLUGINS, comma-separated, and installed packages' camloc.plugins entry points). Its source is part of the run's identity.")
MethodOptionOption = typer.Option([], "--method-option", help="NAME=VALUE: any method option by its name, a plug-in's included; repeatable.")


def method_option_pairs(pairs: list[str]) -> dict:
    """`--method-option NAME=VALUE` pairs -> {name: value}, each checked and converted by its option."""
    from camloc.errors import OptionError

    if not pairs:
        return {}
    from camloc.cams.options import OPTIONS, all_options

    known = all_options()
    out = {}
    for pair in pairs:
        name, sep, value = str(pair).partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise OptionError(f"--method-option {pair!r} must be NAME=VALUE")
        if name not in known:
            raise OptionError(f"--method-option {name}: no method declares it; the options are: {', '.join(known)}")
        option = OPTIONS[name]
        if option.kind is bool:
            words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}
            if value.strip().lower() not in words:
                raise OptionError(f"--method-option {name}={value}: {option.flag} is a switch, true or false")
            value = words[value.strip().lower()]
        out[name] = option.parse(value)
    return out


class with_method_options:
    """Give a typer command the methods' options, placed before its `chunk_size` option, and `--plugin` /
    `--method-option`: plug-ins are loaded before anything else runs, and the options reach the command as
    one dict, its `method_values` parameter (name -> value; a `--method-option` pair wins), with the pairs
    alone in `method_extra` where the command takes it. The signature is read from the option table when
    typer builds the command, so an option declared by any of camloc's method modules is a flag of its own;
    a plug-in's options (loaded after the command line is read) are given with `--method-option`."""

    HIDDEN = ("method_values", "method_extra")

    def __init__(self, command):
        self.command = command
        functools.update_wrapper(self, command)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.command)
        params = [p for name, p in signature.parameters.items() if name not in self.HIDDEN]
        at = next(i for i, p in enumerate(params) if p.name == "chunk_size")
        added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)
                 for name, (kind, option) in method_typer_options().items()]
        added += [inspect.Parameter("plugin", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=PluginOption,
                                    annotation=list[str]),
                  inspect.Parameter("method_option", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=MethodOptionOption, annotation=list[str])]
        return signature.replace(parameters=params[:at] + added + params[at:])

    def __call__(self, **kwargs):
        from camloc.plugins import load_plugins

        load_plugins(kwargs.pop("plugin", None) or [])
        extra = method_option_pairs(kwargs.pop("method_option", None) or [])
        values = {name: kwargs.pop(name) for name in method_typer_options() if name in kwargs}
        values.update(extra)
        if "method_extra" in inspect.signature(self.command).parameters:
            kwargs["method_extra"] = extra
        return self.command(**kwargs, method_values=values)


def parse_chunk_size(value: str) -> int | str:
    from camloc.cams.options import count_or_auto

    return count_or_auto(value, "--chunk-size")


def parse_image_batch(value: str) -> int | str:
    from camloc.cams.options import count_or_auto

    return count_or_auto(value, "--image-batch")


def parse_compile(value: str) -> str:
    from camloc.models.encoder import check_compile

    return check_compile(value)


def parse_threshold(value: str) -> str | float:
    from camloc.evaluators.boxes import check_threshold

    return check_threshold(value)


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
            from camloc.run.files import write_error_line

            line = write_error_line(exc)
            if line is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(line)}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: results written so far are kept; run the same command again to resume")
            sys.exit(130)

    return wrapper
