"""`camloc explain`: one image's heatmaps, boxes and scores; optional raw heatmaps and a figure."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (CacheOption, ChunkOption, CompileOption, DeviceOption, MaxPixelsOption, ModelOption,
                               PrecisionOption, ThresholdOption, err_console, parse_chunk_size,
                               parse_compile, parse_threshold, reports_errors, with_method_options)
from camloc.errors import CamlocError


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise CamlocError(f"--gt-box {text!r} must be four numbers x1,y1,x2,y2")
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
    from camloc.cams import resolve_methods
    from camloc.cams.registry import check_method_options, resolve_options
    from camloc.evaluators import box_from_heatmap
    from camloc.models import ClipModel, load_image
    from camloc.models.preprocess import exif_rotated, set_max_pixels
    from camloc.models.specs import family_hint
    from camloc.viz import FIGURE_SUFFIXES

    set_max_pixels(max_pixels)
    if out is not None:
        if not out.suffix:
            out = out.with_suffix(".png")  # matplotlib would add it anyway: say the real name
        elif out.suffix.lower() not in FIGURE_SUFFIXES:
            raise CamlocError(f"--out {out}: pictures are written as {', '.join(FIGURE_SUFFIXES)}; use one of them")

    thr = parse_threshold(threshold)
    parse_compile(compile_mode)
    from camloc.cams.options import parse_method_options

    options = {**parse_method_options(method_values),
               "chunk_size": parse_chunk_size(chunk_size), "seed": seed}
    if figure not in (None, "pipeline", "compare"):
        raise CamlocError(f"--figure {figure!r} is not one of pipeline, compare")
    gt_boxes = [_parse_box(b) for b in gt_box]
    if family_hint(model):  # fail on a bad method before any weights are fetched
        resolve_methods(method, family_hint(model), model)
    pil = load_image(image, exif_transpose=exif_transpose)
    if not exif_transpose:
        from PIL import Image

        with Image.open(image) as raw:
            if exif_rotated(raw):
                err_console.print(f"[yellow]note:[/] {image} has an EXIF orientation: it is processed as stored (the "
                                  "frame datasets' boxes use), which differs from how viewers show it; pass "
                                  "--exif-transpose to process it as displayed")
    clip_model = ClipModel.load(model, device=device, precision=precision, cache_dir=cache_dir)
    clip_model.encoder.configure(compile_mode)
    specs = resolve_methods(method, clip_model.family.name, clip_model.name)
    options = resolve_options(clip_model, options)
    check_method_options(clip_model, [s.name for s in specs], options)
    clip_model.prompt_problems(prompt)
    if save_heatmap is not None and save_heatmap.suffix not in (".npy", ".npz"):
        raise CamlocError(f"--save-heatmap {save_heatmap} must end in .npy or .npz")
    if save_heatmap is not None and save_heatmap.suffix == ".npy" and len(specs) > 1:
        raise CamlocError(f"--save-heatmap {save_heatmap}: several methods need an .npz file (keyed by method)")

    from camloc.cams import CamContext

    from camloc.cams.engine import compute_raw
    from camloc.cams.postprocess import native_to_raw, to_native

    if native and save_heatmap is None:
        raise CamlocError("--native says how to save the maps: give --save-heatmap FILE too")
    ctx = CamContext(clip_model, pil, prompt, options, methods=[s.name for s in specs])
    raw = compute_raw(clip_model, pil, prompt, specs, context=ctx)
    heatmaps = {m: native_to_raw(kind, to_native(kind, maps), pil.size) for m, (kind, maps) in raw.items()}
    scores = ctx.image_scores.tolist()

    if save_heatmap is not None:
        import numpy as np

        save_heatmap.parent.mkdir(parents=True, exist_ok=True)
        chosen = {m: maps.detach().float().cpu().numpy() for m, (_, maps) in raw.items()} if native else heatmaps
        arrays = {m: (h[0] if len(prompt) == 1 else h) for m, h in chosen.items()}
        if save_heatmap.suffix == ".npy":
            np.save(save_heatmap, next(iter(arrays.values())))
        else:
            np.savez_compressed(save_heatmap, **arrays)

    results = []
    for i, text in enumerate(prompt):
        results.append({
            "prompt": text,
            "score": scores[i],
            "methods": {m: {"box": box_from_heatmap(h[i], thr)} for m, h in heatmaps.items()},
        })
    if out is not None:
        from camloc.viz import comparison_figure, pipeline_figure

        out.parent.mkdir(parents=True, exist_ok=True)
        if (figure or ("pipeline" if len(heatmaps) == 1 else "compare")) == "pipeline":
            rows = [(f"{m}\n'{text}'", heatmaps[m][i]) for i, text in enumerate(prompt) for m in heatmaps]
            pipeline_figure(pil, rows, out, threshold=thr, gt_boxes=gt_boxes)
        else:
            comparison_figure(pil, prompt, heatmaps, out, threshold=thr, gt_boxes=gt_boxes)

    report = {"image": str(image), "size": list(pil.size), "exif_transposed": exif_transpose,
              "model": clip_model.name, "threshold": thr,
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
