"""`camloc eval`: evaluate methods on a dataset into a resumable run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import (AdeExtentOption, AnnFileOption, CacheOption, CamCurveIntervalOption, ChunkOption,
                               CompileOption, DataRootOption, DeviceOption, FaithBaselineOption, FaithBatchOption,
                               FaithScoreOption, FaithStepsOption, ImageBatchOption, ImageDirOption, IncludeStuffOption,
                               MaxPixelsOption, PerClassOption, PointingToleranceOption, PrecisionOption,
                               ProtocolsOption, RoadPercentilesOption, SkipBadRecordsOption, SplitOption,
                               SubsetSeedOption, ThresholdOption, comma_list, reports_errors, with_method_options)


@app.command("eval")
@reports_errors
@with_method_options
def eval_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with an [eval] table (see configs/); options given here override it."),
    method: Optional[str] = typer.Option(None, "--method", help="Method, comma list, or all (see `camloc list methods`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="CLIP name (see `camloc list models`), tiny-rn/tiny-vit, random-<name>, or a checkpoint path."),
    dataset: str = typer.Option("demo", "--dataset", "-d", help="Dataset (see `camloc list datasets`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder; an existing one with the same config is resumed. With several models in a config: one subfolder per model."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (a random N with --subset-seed)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma list of class names to keep."),
    subset_seed: Optional[int] = SubsetSeedOption,
    split: Optional[str] = SplitOption,
    per_class: int = PerClassOption,
    data_root: Optional[Path] = DataRootOption,
    ann_file: Optional[Path] = AnnFileOption,
    image_dir: Optional[Path] = ImageDirOption,
    include_stuff: bool = IncludeStuffOption,
    ade_extent: Optional[str] = AdeExtentOption,
    max_pixels: Optional[int] = MaxPixelsOption,
    prompt_template: str = typer.Option("{}", "--prompt-template", help="Prompt with {} for the class name, e.g. 'a photo of a {}.'"),
    threshold: str = ThresholdOption,
    protocols: str = ProtocolsOption,
    pointing_tolerance: float = PointingToleranceOption,
    cam_curve_interval: float = CamCurveIntervalOption,
    faith_steps: int = FaithStepsOption,
    faith_baseline: Optional[str] = FaithBaselineOption,
    faith_score: str = FaithScoreOption,
    road_percentiles: Optional[str] = RoadPercentilesOption,
    faith_batch: int = FaithBatchOption,
    iou: str = typer.Option("gscorecam", "--iou", help="IoU convention: gscorecam (+1 pixels, as the original) or coco."),
    seed: int = typer.Option(0, "--seed", help="Random seed, recorded in the results."),
    chunk_size: str = ChunkOption,
    image_batch: str = ImageBatchOption,
    compile_mode: str = CompileOption,
    force_new: bool = typer.Option(False, "--force-new", help="Discard the results already in --out."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip (and report) pairs whose image file is missing instead of stopping."),
    skip_bad_records: bool = SkipBadRecordsOption,
    save_vis: int = typer.Option(0, "--save-vis", help="Save overlays of the N best, N worst and N random pairs per method under OUT/vis."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: evaluate this share of the images [default: from RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS, else 0/1]."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    save_heatmaps: bool = typer.Option(False, "--save-heatmaps", help="Also store each pair's native-resolution heatmap under OUT/heatmaps, for re-scoring without the model (the records are the same either way)."),
    heatmap_dtype: str = typer.Option("float32", "--heatmap-dtype", help="--save-heatmaps: float32 (rescore reproduces the run exactly) or float16 (half the disk; rescored values within its rounding)."),
    ovseg_preset: str = typer.Option("sclip", "--ovseg-preset", help="--protocols ovseg: sclip (short side 336, crop 224, stride 112, logit scale 40, SCLIP's per-dataset exceptions, its harness's normalisation and position resize), naclip (the same geometry, NACLIP's per-dataset values, PAMR 10 steps), scclip (the same geometry, SC-CLIP's per-dataset values), clearclip (448, 448, 224, logit scale 50, ClearCLIP's per-dataset values and VOC21 names), resclip (SCLIP's geometry, ResCLIP's per-dataset values; VOC21/VOC20, which it segments whole, refused), proxyclip (336, 336, 112, ProxyCLIP's per-dataset values and class files), cliptrase (CLIPtrase's script: the 336 px centre crop, its class lists, the argmax, its DBSCAN cluster vote) or tcl (448, 448, 224); the options below override it."),
    ovseg_short_side: Optional[int] = typer.Option(None, "--ovseg-short-side", help="--protocols ovseg: resize so the short side is this (long side at most 2048)."),
    ovseg_crop: Optional[int] = typer.Option(None, "--ovseg-crop", help="--protocols ovseg: sliding-window crop (a ViT's position embeddings are resized for crops other than its input size)."),
    ovseg_stride: Optional[int] = typer.Option(None, "--ovseg-stride", help="--protocols ovseg: sliding-window stride."),
    ovseg_logit_scale: Optional[float] = typer.Option(None, "--ovseg-logit-scale", help="--protocols ovseg: cosines x this before the softmax over the classes' queries."),
    ovseg_bg_threshold: Optional[float] = typer.Option(None, "--ovseg-bg-threshold", help="--protocols ovseg: pixels whose top probability is below this become class 0 (background)."),
    ovseg_area_threshold: Optional[float] = typer.Option(None, "--ovseg-area-threshold", help="--protocols ovseg: classes predicted on less than this fraction of the foreground are suppressed."),
    ovseg_pamr: Optional[int] = typer.Option(None, "--ovseg-pamr", help="--protocols ovseg: PAMR refinement steps (0 = off; dilations 8 and 16)."),
    ovseg_templates: Optional[str] = typer.Option(None, "--ovseg-templates", help="--protocols ovseg: single (the class names as they are) or imagenet80 (CLIP's 80 ImageNet templates, averaged)."),
    ovseg_geometry: Optional[str] = typer.Option(None, "--ovseg-geometry", help="--protocols ovseg: slide (resize to the short side, sliding windows: the mmseg harnesses) or centre-crop (resize to the short side, keep the centre crop x crop square of the image and of its label, one window: CLIPtrase's script)."),
    ovseg_classes: Optional[str] = typer.Option(None, "--ovseg-classes", help="--protocols ovseg: a class-name file in place of the dataset's (one class a line in its label order, synonyms separated by ', '; or a file of camloc/segment/classes by name); its SHA-256 joins the run's identity."),
    seg_reduce_zero_label: bool = typer.Option(False, "--seg-reduce-zero-label", help="--dataset seg-folder: label 0 is ignored and every other value lowered by 1 (mmseg's reduce_zero_label)."),
    seg_ignore_index: Optional[int] = typer.Option(None, "--seg-ignore-index", help="--dataset seg-folder: this label value is ignored (as 255 always is)."),
    seg_background: bool = typer.Option(False, "--seg-background", help="--dataset seg-folder: class 0 is a background class (the background and area thresholds apply to it)."),
    save_predictions: bool = typer.Option(False, "--save-predictions", help="--protocols ovseg: write each image's class map as a PNG (8-bit; 16-bit beyond 256 classes) under OUT/predictions/<method>/."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    cache_dir: Optional[str] = CacheOption,
    method_values: dict | None = None,
    method_extra: dict | None = None,
) -> None:
    """Evaluate CAM methods on a dataset: pairs.jsonl, summary.json, table.csv, table.md in --out."""
    from camloc.config import Settings, load_config
    from camloc.errors import OptionError

    file = load_config(config, "eval") if config else {}
    setting = Settings(ctx, file)
    given = setting.given

    models = [model] if model and ("model" in given or "models" not in file) else file.get("models")
    methods = comma_list(method) if method and ("method" in given or "methods" not in file) else comma_list(file.get("methods"))
    out_dir = setting("out")
    for name, value in (("--model", models), ("--method", methods), ("--out", out_dir)):
        if not value:
            raise OptionError(f"{name} is required (on the command line or in the --config file)")
    from camloc.api import evaluate  # the heavy imports (torch) only once the command can run
    from camloc.models.preprocess import set_max_pixels
    from camloc.run.heatmap_cache import model_key
    from camloc.run.sharding import start_shard

    options = {**setting.method_options(), **(method_extra or {})}
    ovseg = {"preset": ovseg_preset, "short_side": ovseg_short_side, "crop": ovseg_crop, "stride": ovseg_stride,
             "logit_scale": ovseg_logit_scale, "bg_threshold": ovseg_bg_threshold,
             "area_threshold": ovseg_area_threshold, "pamr_steps": ovseg_pamr, "templates": ovseg_templates,
             "classes": ovseg_classes, "geometry": ovseg_geometry, "reduce_zero_label": seg_reduce_zero_label or None, "ignore_index": seg_ignore_index,
             "background": seg_background or None}
    ovseg = {k: v for k, v in ovseg.items() if v is not None and (k != "preset" or "ovseg_preset" in given)}
    set_max_pixels(setting("max_pixels"))
    out_dir = Path(out_dir)
    rank_world = start_shard(shard)
    for name in models:
        run_dir = out_dir / model_key(name) if len(models) > 1 else out_dir
        summary = evaluate(
            name, setting("dataset"), list(methods), out=run_dir, protocols=setting("protocols"),
            threshold=setting("threshold"), iou=setting("iou"), limit=setting("limit"),
            classes=comma_list(setting("classes")), split=setting("split"), prompt_template=setting("prompt_template"),
            subset_seed=setting("subset_seed"), per_class=setting("per_class"),
            include_stuff=setting("include_stuff"), ade_extent=setting("ade_extent"),
            data_root=setting("data_root"), ann_file=setting("ann_file"), image_dir=setting("image_dir"),
            seed=setting("seed"), device=setting("device"), precision=setting("precision"), cache_dir=cache_dir,
            chunk_size=str(setting("chunk_size")), image_batch=str(setting("image_batch")),
            compile=str(setting("compile_mode", "compile")), save_heatmaps=setting("save_heatmaps"),
            heatmap_dtype=setting("heatmap_dtype"), save_vis=save_vis, force_new=force_new, progress=progress, skip_missing=skip_missing,
            skip_bad_records=skip_bad_records, pointing_tolerance=setting("pointing_tolerance"),
            cam_curve_interval=setting("cam_curve_interval"), shard=rank_world, ovseg=ovseg, save_predictions=save_predictions,
            faith_steps=setting("faith_steps"), faith_baseline=setting("faith_baseline"),
            faith_score=setting("faith_score"), road_percentiles=setting("road_percentiles"),
            faith_batch=setting("faith_batch"),
            **options)
        methods_run = summary.get("config", {}).get("methods", methods)
        if rank_world[1] > 1 and not summary.get("complete"):
            writer = "rank 0 writes" if "methods" not in summary else "the rank that finishes last writes"
            typer.echo(f"shard {rank_world[0]}/{rank_world[1]} done; {writer} the merged tables "
                       f"(or run `camloc report {run_dir}`)")
            continue
        typer.echo((run_dir / "table.md").read_text().rstrip())
        if summary.get("kind") == "ovseg":
            from rich.markup import escape

            from camloc.cli.common import err_console

            for item in summary.get("faults", {}).get("skipped_images", [])[:10]:
                err_console.print(f"[yellow]skipped[/] image {escape(str(item['image_id']))}: {escape(item['reason'])}")
            if not summary.get("complete"):
                err_console.print("[yellow]note:[/] the table covers the images segmented so far, not the whole "
                                  "dataset (summary.json: complete false)")
            t = summary["timings"]
            typer.echo(f"{summary['n_images']} images x {len(methods_run)} methods; {t['records_this_invocation']} "
                       f"new records, {t['resumed_records']} resumed; wrote {run_dir}/ ovseg records, summary.json, "
                       "table.csv, table.md, ovseg_classes.csv")
            continue
        _report_faults(summary["faults"])
        t = summary["timings"]
        typer.echo(f"{summary['n_pairs']} pairs x {len(methods_run)} methods; {t['records_this_invocation']} "
                   f"new records, {t['resumed_records']} resumed; wrote {run_dir}/ pairs records, summary.json, "
                   "table.csv, table.md")
        encoder = t.get("encoder", {})
        if encoder.get("compiled"):
            typer.echo(f"masked forwards compiled (--compile on): shapes {encoder['shapes']}, "
                       f"{encoder['compile_seconds']:.1f} s of the {t['compute_seconds']:.1f} s compute spent compiling")


def _report_faults(faults: dict) -> None:
    from rich.markup import escape

    from camloc.cli.common import err_console

    for item in faults["skipped_images"][:10]:
        err_console.print(f"[yellow]skipped[/] image {escape(str(item['image_id']))} ({item['pairs']} pairs): "
                          f"{escape(item['reason'])}")
    notes = [f"{len(faults['skipped_images'])} unreadable images skipped (rerun to retry them)"
             if faults["skipped_images"] else "",
             f"{faults['oom_retries']} CUDA out-of-memory batches split and retried" if faults["oom_retries"] else "",
             f"{faults.get('clipped_boxes', 0)} ground-truth boxes clipped to the image, "
             f"{faults.get('dropped_boxes', 0)} empty boxes dropped, {faults.get('skipped_pairs', 0)} pairs without "
             "boxes skipped" if any(faults.get(k) for k in ("clipped_boxes", "dropped_boxes", "skipped_pairs")) else "",
             f"{faults['degenerate_polygons']} polygons with fewer than 3 points skipped for coverage"
             if faults.get("degenerate_polygons") else "",
             f"{faults['occluded_instances']} scene instances with no visible pixel left out"
             if faults.get("occluded_instances") else "",
             f"{faults['images_without_their_class']} images whose own class is not labelled in their mask left out "
             "(no pair to score)" if faults.get("images_without_their_class") else "",
             f"{faults['images_not_found']} annotated images are not in the image folder and are left out (a partial "
             "download?)" if faults.get("images_not_found") else "",
             f"{len(faults['bad_record_lines'])} bad record lines skipped (--skip-bad-records; listed in summary.json)"
             if faults.get("bad_record_lines") else "",
             f"{len(faults['empty_prompts'])} empty prompts" if faults.get("empty_prompts") else "",
             f"{len(faults['truncated_prompts'])} prompts truncated to CLIP's context"
             if faults.get("truncated_prompts") else ""]
    for note in filter(None, notes):
        err_console.print(f"[yellow]note:[/] {note}")
