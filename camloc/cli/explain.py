"""`camloc explain`: one image's heatmaps, boxes and scores; optional raw heatmaps and a figure."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (CacheOption, ChunkOption, CompileOption, DeviceOption, MaxPixelsOption, ModelOption,
                               PrecisionOption, ThresholdOption, reports_errors, with_method_options)
from camloc.errors import OptionError


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise OptionError(f"--gt-box {text!r} must be four numbers x1,y1,x2,y2")
    return box


@app.command()
@reports_errors
@with_method_options
def explain(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several."),
    method: str = typer.Option("gscorecam", "--method", help="Method, comma list, or all (see `camloc list methods`)."),
    model: str = ModelOption,
    save_heatmap: Optional[Path] = typer.Option(None, "--save-heatmap", help="Write raw-size float32 heatmaps: FILE.npy (one method) or FILE.npz (keyed by method)."),
    native: bool = typer.Option(False, "--native", help="With --save-heatmap: save each method's maps as it computes them, before any post-processing (its grid, or input size for RISE/LeGrad/HilaCAM)."),
    json_output: bool = typer.Option(False, "--json", help="Print boxes and scores as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a picture (PNG): the Fig. S1 pipeline for one method, a side-by-side method comparison (Fig. S4) for several."),
    figure: Optional[str] = typer.Option(None, "--figure", help="Picture kind: pipeline or compare [default: by the number of methods]."),
    gt_box: list[str] = typer.Option([], "--gt-box", help="Ground-truth box x1,y1,x2,y2 to draw; repeatable."),
    threshold: str = ThresholdOption,
    seed: int = typer.Option(0, "--seed", help="Seed of RISE's random masks."),
    exif_transpose: bool = typer.Option(False, "--exif-transpose", help="Process a photo as displayed (its EXIF orientation applied) instead of as stored, which is the frame datasets' boxes use."),
    max_pixels: Optional[int] = MaxPixelsOption,
    chunk_size: str = ChunkOption,
    compile_mode: str = CompileOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    cache_dir: Optional[str] = CacheOption,
    method_values: dict | None = None,
) -> None:
    """Compute CAM heatmaps of one image for one or more prompts, and their boxes (Algorithm 1)."""
    from camloc.api import explain as explain_image
    from camloc.models.preprocess import set_max_pixels
    from camloc.models.specs import family_hint
    from camloc.report.figures import FIGURE_SUFFIXES

    set_max_pixels(max_pixels)
    if out is not None:
        if not out.suffix:
            out = out.with_suffix(".png")  # matplotlib would add it anyway: say the real name
        elif out.suffix.lower() not in FIGURE_SUFFIXES:
            raise OptionError(f"--out {out}: pictures are written as {', '.join(FIGURE_SUFFIXES)}; use one of them")
    if figure not in (None, "pipeline", "compare"):
        raise OptionError(f"--figure {figure!r} is not one of pipeline, compare")
    gt_boxes = [_parse_box(b) for b in gt_box]
    if save_heatmap is not None and save_heatmap.suffix not in (".npy", ".npz"):
        raise OptionError(f"--save-heatmap {save_heatmap} must end in .npy or .npz")
    if native and save_heatmap is None:
        raise OptionError("--native says how to save the maps: give --save-heatmap FILE too")
    from camloc.api import load_model
    from camloc.cams import resolve_methods

    def check_npy(family: str, model_name: str) -> None:
        if save_heatmap is not None and save_heatmap.suffix == ".npy" and len(
                resolve_methods(method, family, model_name)) > 1:
            raise OptionError(f"--save-heatmap {save_heatmap}: several methods need an .npz file (keyed by method)")

    if family_hint(model):  # fail on a bad method before any weights are fetched
        check_npy(family_hint(model), model)
    clip_model = load_model(model, device=device, precision=precision, cache_dir=cache_dir)
    check_npy(clip_model.family.name, clip_model.name)  # before any map is computed
    result = explain_image(clip_model, image, prompt, method, threshold=threshold, seed=seed,
                           chunk_size=chunk_size, compile=compile_mode, exif_transpose=exif_transpose,
                           **method_values)
    if save_heatmap is not None:
        import numpy as np

        save_heatmap.parent.mkdir(parents=True, exist_ok=True)
        chosen = result.native if native else result.maps
        arrays = {m: (h[0] if len(prompt) == 1 else h) for m, h in chosen.items()}
        if save_heatmap.suffix == ".npy":
            np.save(save_heatmap, next(iter(arrays.values())))
        else:
            np.savez_compressed(save_heatmap, **arrays)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.plot(figure, gt_boxes=gt_boxes, path=out)

    results = result.to_dict()
    report = {"image": str(image), "size": list(result.image.size), "exif_transposed": exif_transpose,
              "model": clip_model.name, "threshold": result.threshold,
              "device": str(clip_model.device), "precision": clip_model.precision, "results": results}
    if json_output:
        typer.echo(json.dumps(report, indent=1))
    else:
        for r in results:
            typer.echo(f"'{r['prompt']}' score {r['score']:.4f}")
            for m, v in r["methods"].items():
                typer.echo(f"  {m:14s} box {v['box']}")
        for path in (save_heatmap, out):
            if path is not None:
                typer.echo(f"wrote {path}")
