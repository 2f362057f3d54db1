"""`camloc eval --protocols ovseg`: open-vocabulary semantic segmentation of a segmentation dataset with
the dense methods, into a resumable run folder of its own kind.

Run folder: `config.json` (the identity, with every inference setting under `ovseg`), `ovseg.jsonl` (one
record per (image, method): the image's per-class intersection / union / prediction / label counts, its
window count and seconds; `ovseg.rankRRR-of-NNN.jsonl` per shard), `summary.json` (per method mIoU, mAcc,
aAcc, images/s, windows/s), `table.csv`, `table.md`, `ovseg_classes.csv` (per-class IoU and Acc), and with
`--save-predictions` every image's class map as a PNG under `predictions/<method>/` (8-bit; 16-bit beyond 256
classes). The records'
counts add up, so shards and resumed runs give the numbers of one process exactly.

Timing: the methods share one encoder forward per window (all windows of `image_batch` images in one
batch); a method's images/s is what it costs alone: the images' share of that forward plus its own work.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camloc.errors import DataError, OptionError, RunFolderError
from camloc.evaluators.segmentation import SegmentationState
from camloc.run.files import (append_jsonl, atomic_write_text, folder_lock, prepare_out_dir, read_jsonl, record_files,
                              write_json)
from camloc.datasets.registry import dataset_label
from camloc.run.identity import SUMMARY, EvalConfig, check_config

RECORDS = "ovseg"
TABLE_COLUMNS = ["model", "dataset", "method", "n_images", "miou", "macc", "aacc", "images_per_second",
                 "windows_per_second"]
RECORDED = ("pixel_mean", "pixel_std", "n_classes", "classes_sha256")
"""config.ovseg's fields that record what the run found (the model's pixel constants, the class count, the class
file's SHA-256), not settings given to it."""
REQUIRED = ("image_id", "method", "state", "windows", "forward_seconds", "method_seconds")


def segmentation_identity(images) -> dict:
    """What the run's data is: the images' folder, a SHA-256 over every (image id, image file name and size,
    SHA-256 of its label file's bytes) and the count. Another split, --limit, annotation file or label
    folder (the same image names with other labels) never resumes these records; the same files read from
    another place are the same data (`check_config` accepts moved data)."""
    from camloc.run.files import file_sha256

    digest = hashlib.sha256()
    labels: dict[str, str | None] = {}
    for item in images:
        if item.label_path not in labels:  # coco-object: one instances JSON for every image
            labels[item.label_path] = file_sha256(item.label_path) if os.path.isfile(item.label_path) else None
        size = os.path.getsize(item.path) if os.path.isfile(item.path) else None
        digest.update(json.dumps([item.image_id, os.path.basename(item.path), size,
                                  os.path.basename(item.label_path), labels[item.label_path]]).encode() + b"\n")
    folders = [os.path.dirname(os.path.abspath(item.path)) for item in images]
    return {"image_root": os.path.commonpath(folders), "images_sha256": digest.hexdigest(), "n_images": len(images)}


def prediction_path(run_dir: Path, method: str, image_id) -> Path:
    """Where `--save-predictions` writes an image's class map (ids are checked plain file names)."""
    return run_dir / "predictions" / method.replace("+", "p") / f"{image_id}.png"


def segment_batch(model, specs, options, batch, queries, owner, names, settings, background: bool = False) -> list[dict]:
    """Predictions of a batch of images [(item, image, label)]: every window of every image in ONE batched
    encoder forward, then each method per window, stitched per image. Returns per image {method: (class
    map, windows, the image's share of the forward's seconds, of the method's own seconds)}."""
    from camloc.segment.cluster_vote import cluster_vote
    from camloc.segment.infer import at_input_size, finish_logits, image_windows, window_grids

    prepared = [image_windows(model, image, settings) for _, image, _ in batch]
    windows = torch.cat([w for _, w, _ in prepared])
    timings: dict = {}
    similarity = [] if settings.cluster_vote else None
    with at_input_size(model, settings.crop, settings.position_resize):
        grids = window_grids(model, specs, options, windows, queries, names, timings, similarity)
    out, first = [], 0
    for (_, _, label), (x, _, boxes) in zip(batch, prepared):
        n = len(boxes)
        share = n / len(windows)
        per_method = {}
        for spec in specs:
            t0 = time.perf_counter()
            pred = finish_logits(grids[spec.name][first:first + n], boxes, x, (label.shape[1], label.shape[0]),
                                 owner, settings)
            if similarity is not None:  # CLIPtrase's vote over the image's one window
                grid = grids[spec.name].shape[-2:]
                pred = cluster_vote(pred, similarity[first], tuple(grid), *settings.cluster_vote,
                                    prefix=model.family.prefix, background=background)
            own = timings[spec.name] * share + time.perf_counter() - t0
            per_method[spec.name] = (pred, n, timings["forward"] * share, own)
        first += n
        out.append(per_method)
    return out


def run_ovseg(config: EvalConfig, run_dir: str | Path, *, device: str = "auto", cache_dir: str | None = None,
              force_new: bool = False, data_options: dict | None = None, progress: bool = True,
              image_batch: int | str = "auto", shard: tuple[int, int] = (0, 1), save_predictions: bool = False,
              model=None) -> dict:
    """Segment `config.dataset` with `config.methods` into `run_dir`, resuming what is there."""
    from camloc.cams.registry import check_method_options, resolve_options, run_weights
    from camloc.datasets.segmentation import load_seg_dataset
    from camloc.models import ClipModel
    from camloc.models.specs import family_hint
    from camloc.run.progress import progress_bar
    from camloc.run.provenance import device_description, git_commit, package_versions
    from camloc.run.sharding import rank_device, records_name
    from camloc.segment.infer import centre_cropped, class_names, pixel_constants, query_features, resolve_settings

    from camloc.plugins import load_recorded
    from camloc.run.identity import recorded_plugins

    started = time.perf_counter()
    rank, world = shard
    load_recorded(recorded_plugins(Path(run_dir), force_new))  # a resume or a shard: the run's own plug-ins
    given = dict(config.ovseg or {})
    from camloc.datasets.segmentation import FOLDER_OPTIONS

    folder = {k: given.pop(k) for k in list(given) if k in FOLDER_OPTIONS}
    given = {k: v for k, v in given.items() if k not in RECORDED}  # recorded, not set
    settings = resolve_settings(config.dataset, **given)
    if family_hint(config.model):
        _check_methods(_ovseg_methods(config.methods, family_hint(config.model), config.model))
    device = rank_device(device)
    run_dir = prepare_out_dir(run_dir)
    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.run.identity import resume_data_options

    default = SEG_DATASETS[config.dataset].default_split if config.dataset in SEG_DATASETS else None
    where = resume_data_options(run_dir, config, data_options, force_new, config.split or default)
    spec, images = load_seg_dataset(config.dataset, data_root=where.get("data_root_dir"), split=config.split,
                                    image_dir=where.get("image_dir"), ann_file=where.get("ann_file"),
                                    limit=config.limit, **folder)
    classes, classes_sha256 = class_names(settings, spec.classes(), config.dataset)
    if not spec.background and settings.ignore_as_background:
        raise OptionError(f"{config.dataset} has no background class: its ignored pixels cannot be scored as one")
    if not spec.background and (settings.bg_threshold > 0 or settings.area_threshold is not None):
        raise OptionError(f"{config.dataset} has no background class (its class 0 is {classes[0][0]!r}): "
                          "--ovseg-bg-threshold and --ovseg-area-threshold would turn pixels into that class; use them "
                          "on voc21, context60 or coco-object")
    config.ovseg = {**settings.to_json(), **({"classes_sha256": classes_sha256} if classes_sha256 else {}),
                    "n_classes": len(classes),
                    **({k: folder.get(k, v) for k, v in FOLDER_OPTIONS.items()} if config.dataset == "seg-folder" else {})}
    config.data = segmentation_identity(images)
    if config.dataset == "seg-folder":  # a folder of one's own: tables show its name
        config.data["name"] = Path(config.data["image_root"]).parent.name or "seg-folder"
    config.data_sources = _sources(where)
    config.split = config.split or spec.default_split
    if model is None:
        model = ClipModel.load(config.model, device=device, precision=config.precision, cache_dir=cache_dir)
    config.precision = model.precision
    mean, std = pixel_constants(model, settings.normalisation)
    config.ovseg = {**config.ovseg, "pixel_mean": list(mean), "pixel_std": list(std)}  # as applied, 0-255 scale
    specs = _ovseg_methods(config.methods, model.family, model.name)
    _check_methods(specs)
    config.methods = [s.name for s in specs]
    from camloc.cams.options import default_options

    config.options = resolve_options(model, {**default_options(), **config.options})
    check_method_options(model, config.methods, config.options)
    config.weights = run_weights(model, config.methods, config.options)
    from camloc.plugins import run_plugins

    config.plugins = run_plugins(config.methods)
    batch_size = 1 if image_batch == "auto" else int(image_batch)
    lock = ".lock" if world == 1 else f".lock.rank{rank:03d}-of-{world:03d}"
    with folder_lock(run_dir, lock):
        check_config(run_dir, config, force_new)
        queries, owner, names = query_features(model, classes, settings.templates)
        records_path = run_dir / records_name(rank, world, RECORDS)
        done = set()
        for path in record_files(run_dir, RECORDS):
            done |= {(str(r["image_id"]), r["method"]) for r in read_jsonl(path, repair=path == records_path,
                                                                            required=REQUIRED)}
        mine = images[rank::world]
        # per image: the methods still to record, and (--save-predictions, also given only now) those whose
        # class map is not saved yet: a resumed image is segmented again to write it, its record kept
        work = [(item, [m for m in config.methods if (item.image_id, m) not in done],
                 [m for m in config.methods if save_predictions
                  and not prediction_path(run_dir, m, item.image_id).is_file()]) for item in mine]
        work = [(item, todo, draw) for item, todo, draw in work if todo or draw]
        options = {**config.options, "chunk_size": "auto"}
        n_new = 0
        skipped: list[dict] = []
        compute_started = time.perf_counter()
        with open(records_path, "a") as handle, progress_bar(progress, len(work), "ovseg", "images") as bar:
            for start in range(0, len(work), batch_size):
                chunk, batch = [], []
                for entry in work[start:start + batch_size]:
                    image, label = _image_and_label(entry[0])
                    if settings.geometry == "centre-crop":  # only the centre crop is segmented and scored
                        image, label = centre_cropped(image, label, settings.short_side, settings.crop)
                    if settings.ignore_as_background:  # CLIPtrase's detectron2 labels: 255 is background there
                        label = np.where(label == spec.ignore_index, 0, label).astype(label.dtype)
                    reason = too_small(image.size, settings)
                    if reason:  # no window fits it at this scale (the harness cannot segment it either)
                        skipped.append({"image_id": entry[0].image_id, "path": entry[0].path, "reason": reason})
                        bar.advance(1)
                        continue
                    chunk.append(entry)
                    batch.append((entry[0], image, label))
                if not batch:
                    continue
                for (item, todo, draw), (_, _, label), result in zip(chunk, batch, segment_batch(
                        model, specs, options, batch, queries, owner, names, settings, spec.background)):
                    for method in draw:
                        path = prediction_path(run_dir, method, item.image_id)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(result[method][0].numpy().astype(np.uint8 if len(classes) <= 256
                                                                          else np.uint16)).save(path)
                    records = []
                    for method in todo:
                        pred, windows, forward, own = result[method]
                        try:
                            state = SegmentationState.empty(len(classes)).add(pred.numpy(), label,
                                                                              ignore_index=spec.ignore_index)
                        except ValueError as exc:
                            raise DataError(f"label map {item.label_path or item.image_id}: {exc}; is it the "
                                            f"{config.dataset} layout camloc reads (`camloc data verify "
                                            f"{config.dataset}`)?") from None
                        records.append({"image_id": item.image_id, "method": method, "state": state.to_record(),
                                        "windows": windows, "forward_seconds": round(forward, 6),
                                        "method_seconds": round(own, 6)})
                    append_jsonl(handle, records)
                    n_new += len(records)
                    bar.advance(1)
        timings = {"load_seconds": round(compute_started - started, 3),
                   "compute_seconds": round(time.perf_counter() - compute_started, 3),
                   "records_this_invocation": n_new, "resumed_records": len(done), "image_batch": batch_size}
        summary = finish_ovseg(run_dir, config, classes, len(images), (rank, world), spec.background,
                               extra={"device": device_description(model.device), "versions": package_versions(),
                                      "git_commit": git_commit(), "timings": timings,
                                      "faults": {"skipped_images": skipped}})
    return summary


def _sources(where: dict) -> dict:
    """Where an ovseg run read its data (absolute): what a resume given no data option reads."""
    from camloc.datasets.registry import data_root

    absolute = lambda v: os.path.abspath(v) if v else None  # noqa: E731
    return {"data_root": absolute(str(data_root(where.get("data_root_dir")))),
            "ann_file": absolute(where.get("ann_file")), "image_dir": absolute(where.get("image_dir"))}


def too_small(size: tuple[int, int], settings) -> str:
    """Why an image of `size` (W, H) cannot be segmented with these settings ("" when it can): at the
    protocol's scale (short side S, long side at most 2048) its short side must hold a whole crop."""
    from camloc.segment.windows import rescaled_size

    width, height = rescaled_size(*size, settings.short_side)
    if min(width, height) >= settings.crop:
        return ""
    return (f"{size[0]}x{size[1]} px is {width}x{height} at the protocol's scale (short side {settings.short_side}, long "
            f"side at most 2048), narrower than one {settings.crop} px window: skipped, and the run is incomplete "
            "without it")


def _image_and_label(item) -> tuple:
    """The image and its label map, which must be of the image's size (a label of another image would be
    scored against this one's prediction, resized to it)."""
    from camloc.models import load_image

    image, label = load_image(item.path), item.label()
    if label.shape[:2] != (image.size[1], image.size[0]):
        raise DataError(f"label map {item.label_path or item.image_id} is {label.shape[1]}x{label.shape[0]}, but its "
                        f"image {item.path} is {image.size[0]}x{image.size[1]}: they do not belong together")
    return image, label


def _check_methods(specs) -> None:
    from camloc.cams.registry import METHODS, list_methods

    wrong = [s.name for s in specs if not s.segments]
    if wrong:
        dense = ", ".join(m for m in list_methods() if METHODS[m].segments)
        raise OptionError(f"--protocols ovseg scores every class of the dataset at every pixel, which only the "
                          f"one-forward dense methods do ({dense}); {', '.join(wrong)} would cost one pass per class: "
                          f"leave {'it' if len(wrong) == 1 else 'them'} out")


def _ovseg_methods(methods, family, name):
    """`resolve_methods` for ovseg: `all` is every dense method the model's family runs (those needing a
    second model, ProxyCLIP's proxy, only when named)."""
    from camloc.cams.registry import resolve_methods

    if methods in ("all", ["all"]):
        return [s for s in resolve_methods("all", family, name) if s.segments]
    return resolve_methods(methods, family, name)


def method_results(run_dir: Path, methods: list[str], n_classes: int) -> tuple[dict, dict]:
    """Per method: the merged state and the totals (images, windows, seconds) of every records file;
    a (image, method) recorded twice with other counts is an error."""
    states = {m: SegmentationState.empty(n_classes) for m in methods}
    totals = {m: {"images": 0, "windows": 0, "seconds": 0.0} for m in methods}
    seen: dict = {}
    for path in record_files(run_dir, RECORDS):
        for r in read_jsonl(path, required=REQUIRED):
            key = (str(r["image_id"]), r["method"])
            if key in seen:
                if seen[key] != r["state"]:
                    raise RunFolderError(f"{run_dir}: image {key[0]} was segmented twice by {key[1]} with other "
                                         "counts; rerun with --force-new")
                continue
            seen[key] = r["state"]
            if r["method"] not in states:
                continue
            states[r["method"]] += SegmentationState.from_record(r["state"])
            t = totals[r["method"]]
            t["images"] += 1
            t["windows"] += r["windows"]
            t["seconds"] += r["forward_seconds"] + r["method_seconds"]
    return states, totals


def finish_ovseg(run_dir: Path, config: EvalConfig, classes: list[list[str]], n_images: int,
                 shard: tuple[int, int], background: bool, extra: dict) -> dict:
    import pandas as pd

    states, totals = method_results(run_dir, config.methods, len(classes))
    per_method, rows, class_rows = {}, [], []
    for method in config.methods:
        result, t = states[method].result(), totals[method]
        speed = {"images_per_second": round(t["images"] / t["seconds"], 4) if t["seconds"] else None,
                 "windows_per_second": round(t["windows"] / t["seconds"], 4) if t["seconds"] else None}
        per_method[method] = {**result, "n_images": t["images"], "windows": t["windows"], **speed}
        rows.append({"model": config.model, "dataset": dataset_label(config.dataset, config.data), "method": method,
                     "n_images": t["images"],
                     "miou": result["miou"], "macc": result["macc"], "aacc": result["aacc"], **speed})
        iou, acc = states[method].per_class()
        class_rows += [{"method": method, "class_index": i, "class": "background" if i == 0 and background else names[0],
                        "iou": iou[i], "acc": acc[i]}
                       for i, names in enumerate(classes)]
    complete = all(t["images"] == n_images for t in totals.values())
    from camloc.run.finish import finished_at

    summary = {"kind": "ovseg", "finished_at": finished_at(), "config": config.to_json(), "model": config.model,
               "dataset": dataset_label(config.dataset, config.data),
               "n_images": n_images, "complete": complete, "shard": list(shard), "seed": config.seed,
               "precision": config.precision, **extra, "methods": per_method}
    rank, world = shard
    if world > 1 and not complete:
        write_json(run_dir / f"summary.rank{rank:03d}-of-{world:03d}.json", summary)
        return summary
    write_json(run_dir / SUMMARY, summary)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    atomic_write_text(run_dir / "table.csv", table.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(run_dir / "table.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")
    atomic_write_text(run_dir / "ovseg_classes.csv",
                      pd.DataFrame(class_rows).to_csv(index=False, float_format="%.6f"))
    return summary
