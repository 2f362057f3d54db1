"""`camloc eval`: run methods over a dataset's pairs and write the run folder.

Run folder: `config.json` (the resolved config), `pairs.jsonl` (one record per (pair, method),
appended and flushed as each image finishes), `summary.json`, `table.csv`, `table.md`.
A rerun with the same config resumes: finished (pair, method) records are skipped, a torn last line
is dropped.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from camloc.cams import CamContext, compute_heatmaps, resolve_methods
from camloc.cams.context import share_batch
from camloc.cams.engine import compute_native
from camloc.cams.postprocess import native_to_raw
from camloc.cams.options import default_options
from camloc.cams.registry import METHODS, check_method_options, resolve_options
from camloc.datasets import ImagePairs, count_pairs, dataset_prompts, load_dataset
from camloc.datasets.records import data_identity
from camloc.datasets.registry import DATA_SOURCES
from camloc.errors import CamlocError
from camloc.evaluators import LocalizationMeter, best_iou, box_from_heatmap, meters_by
from camloc.evaluators.meter import record_key
from camloc.evaluators.protocols import (DEFAULT_INTERVAL, DEFAULT_TOLERANCE, MASK_PROTOCOLS, PROTOCOL_COLUMNS,
                                         check_parameters, pair_values, parse_protocols)
from camloc.heatmap_cache import HeatmapCache, dataset_key
from camloc.models import ClipModel, load_image
from camloc.models.specs import family_hint
from camloc.progress import progress_bar
from camloc.provenance import device_description, git_commit, package_versions
from camloc.runfiles import (NOT_IDENTITY, RECORD_FIELDS, append_jsonl, atomic_write_text, folder_lock,
                             prepare_out_dir, read_jsonl, read_run_records, record_files, write_json)
from camloc.sharding import assign_images, process_group_ready, rank_device, records_name

CONFIG = "config.json"
SUMMARY = "summary.json"
TABLE_COLUMNS = ["model", "dataset", "method", "n_pairs", "mean_iou", "acc@0.3", "acc@0.5", "acc@0.7"]


@dataclass
class EvalConfig:
    model: str
    methods: list[str]
    dataset: str = "demo"
    limit: int | None = None
    classes: list[str] | None = None
    subset_seed: int | None = None
    split: str | None = None
    per_class: int = 100
    prompt_template: str = "{}"
    threshold: str | float = "otsu"
    iou_convention: str = "gscorecam"
    precision: str = "auto"
    seed: int = 0
    options: dict = field(default_factory=default_options)
    include_stuff: bool = False
    ade_extent: str | None = None
    """ade20k-scenes: visible (default there) or amodal ground truth; None for other datasets."""
    data: dict | None = None
    """`data_identity` of the pairs (image folder, pairs' SHA-256, counts), filled when the data is read."""
    protocols: list[str] = field(default_factory=lambda: ["box"])
    """`camloc.evaluators.protocols`: box (always) and any of mask-iou, pointing, maxboxacc, pxap."""
    pointing_tolerance: float = DEFAULT_TOLERANCE
    cam_curve_interval: float = DEFAULT_INTERVAL
    """MaxBoxAccV2 / PxAP threshold step (wsolevaluation's --cam_curve_interval)."""
    weights: dict | None = None
    """The model's backend, architecture, weights and their SHA-256 (`Backend.info`), filled on load."""
    heatmaps: str | None = None
    """"float16" when the maps are saved: the run then scores the stored (float16) maps, so
    `camloc rescore` reproduces its values exactly; None: the float32 maps."""
    data_sources: dict | None = None
    """Where the data was read from (`DATA_SOURCES`: data root, split, annotation file, image folder,
    absolute): what `camloc rescore` and a resumed eval read when given no data options. Recorded in
    config.json, but not part of the identity: the same data read through another path is the same
    data (`data` says what it is)."""

    def identity(self) -> dict:
        """The fields that make two runs comparable; a run folder holds one identity only."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}

    def to_json(self) -> dict:
        """What config.json holds: the identity and where the data was read from."""
        return {**self.identity(), "data_sources": self.data_sources}


def recorded_data_options(run_dir: Path, config: dict | EvalConfig | None) -> dict:
    """The data options a run folder records (its config.json's `data_sources`), to read its data again
    when no data option is given; {} when it records none (a run of an older camloc). A recorded file or
    folder that no longer exists is an error naming it and the option that points elsewhere."""
    sources = (config.data_sources if isinstance(config, EvalConfig) else (config or {}).get("data_sources")) or {}
    for key, what in (("ann_file", "annotation file"), ("image_dir", "image folder")):
        path = sources.get(key)
        if path and not os.path.exists(path):
            raise CamlocError(f"{run_dir / CONFIG} records the data's {what} {path}, which does not exist now (moved "
                              f"or deleted?); pass {DATA_SOURCES[key]} or --data-root to say where the data is")
    return {option: sources[key] for key, option in (("data_root", "data_root_dir"), ("ann_file", "ann_file"),
                                                      ("image_dir", "image_dir")) if sources.get(key)}


def resume_data_options(run_dir: Path, config: EvalConfig, data_options: dict | None, force_new: bool) -> dict:
    """The data options of an eval: those given, or, when none is given and `run_dir` already holds a run
    of the same dataset and split (a resume), the ones that run recorded."""
    given = {k: v for k, v in (data_options or {}).items() if v}
    path = run_dir / CONFIG
    if given or force_new or not path.is_file():
        return given
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return given  # _check_config names the broken file
    if not isinstance(previous, dict) or (previous.get("dataset"), previous.get("split")) != (config.dataset,
                                                                                             config.split):
        return given
    return recorded_data_options(run_dir, previous)


def _describe(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_difference(key: str, old, new) -> str:
    """One field of two run identities, as a user can act on it."""
    if key == "data" and isinstance(old, dict) and isinstance(new, dict):
        parts = [f"{k} {_describe(old.get(k))} there, {_describe(new.get(k))} now"
                 for k in ("image_root", "n_images", "n_pairs") if old.get(k) != new.get(k)]
        return "data: " + (", ".join(parts) if parts else "same images and counts, other ground truth or prompts "
                           "(another annotation file?)")
    return f"{key}: {_describe(old)} there, {_describe(new)} now"


def _check_config(run_dir: Path, config: EvalConfig, force_new: bool) -> None:
    """Refuse a folder written by another config (naming what differs); with `force_new` discard its
    results (records, summaries, tables, saved pictures) first. Then write this config."""
    import shutil

    config_path = run_dir / CONFIG
    if config_path.exists() and not force_new:
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CamlocError(f"{config_path} is not valid JSON ({exc}); use another --out, or --force-new to "
                              "discard the folder's results") from None
        new = json.loads(json.dumps(config.identity()))
        old = {k: v for k, v in old.items() if k not in NOT_IDENTITY} if isinstance(old, dict) else old
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = "; ".join(describe_difference(k, old.get(k), new.get(k)) for k in diff[:3])
            raise CamlocError(
                f"run folder {run_dir} was written by a different config (differs in: {', '.join(diff)}; {shown}); "
                "use another --out, or --force-new to discard its results"
            )
    elif not config_path.exists() and record_files(run_dir) and not force_new:
        raise CamlocError(f"run folder {run_dir} holds records but no {CONFIG}, so they cannot be matched to this "
                          "config; use another --out, or --force-new to discard them")
    if force_new:
        for records in record_files(run_dir):
            records.unlink()
        for stale in [SUMMARY, "table.csv", "table.md", CONFIG, *[p.name for p in run_dir.glob("summary.rank*.json")]]:
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "vis", ignore_errors=True)
    atomic_write_text(config_path, json.dumps(config.to_json(), indent=1) + "\n")


def _pending(images: list[ImagePairs], methods: list[str], done: set) -> list[tuple[ImagePairs, dict]]:
    """Per image, the methods still to run for each of its pairs."""
    work = []
    for item in images:
        todo = {}
        for pair in item.pairs:
            missing = [m for m in methods if (str(pair.image_id), pair.category_id, m) not in done]
            if missing:
                todo[pair.key] = missing
        if todo:
            work.append((item, todo))
    return work


class UnreadableImage(CamlocError):
    """An image file of the dataset could not be read: the run skips it and reports it."""


def image_prompts(item: ImagePairs, pairs: list, methods: list[str]) -> list[str]:
    """The prompts one image is scored with: those of its pending pairs, or all of its prompts when a
    method's maps depend on the other prompts (`MethodSpec.prompt_coupled`: CLIP-ES, CLIP Surgery), so a
    resumed image gets the maps a fresh run gives."""
    coupled = any(METHODS[m].prompt_coupled for m in methods)
    return list(dict.fromkeys(p.prompt for p in (item.pairs if coupled else pairs)))


DEFAULT_IMAGE_BATCH = 8


def resolve_image_batch(value: int | str, methods: list[str]) -> int:
    """Images per device step (`--image-batch`): a number, or auto: 1 when a method scores masked copies
    (ScoreCAM, gScoreCAM, GroupCAM, RISE: one image's chunks already fill the device) or when no method
    has a stage to share, else DEFAULT_IMAGE_BATCH."""
    if value != "auto":
        size = int(value)
        if size < 1:
            raise CamlocError(f"--image-batch {value!r} must be a positive number or auto")
        return size
    specs = [METHODS[m] for m in methods]
    if any(s.masked_forwards for s in specs) or not any(s.shares_forward for s in specs):
        return 1
    return DEFAULT_IMAGE_BATCH


def compute_images(model: ClipModel, batch: list[tuple], config: EvalConfig, runtime: dict | None = None,
                   cache: HeatmapCache | None = None) -> list[tuple[dict, int]]:
    """The device stage of a batch of images, each `(item, todo, image, host_input)`: native maps of each
    image's pending (pair, method) combinations (stored in `cache` when given) and the CUDA out-of-memory
    retries each needed. The images' encoder forwards run as one batch (`share_batch`); every method
    then runs on its image's own context."""
    contexts = []
    for item, todo, image, host_input in batch:
        pairs = [p for p in item.pairs if p.key in todo]
        methods = [m for m in config.methods if any(m in todo[p.key] for p in pairs)]
        contexts.append((pairs, methods, CamContext(model, image, image_prompts(item, pairs, methods),
                                                    {**config.options, **(runtime or {})}, methods=methods,
                                                    host_input=host_input)))
    share_batch([ctx for _, _, ctx in contexts])
    out = []
    for (item, _, image, _), (pairs, methods, ctx) in zip(batch, contexts):
        native = compute_native(model, image, ctx.prompts, methods, context=ctx)
        if cache is not None:
            cache.put_native(item, pairs, ctx.prompts, native, image.size)
        out.append((native, ctx.oom_retries))
    return out


def image_records(model_name: str, item: ImagePairs, todo: dict, config: EvalConfig, native: dict,
                  size: tuple[int, int]) -> list[dict]:
    """The host stage of one image: raw-size heatmaps, then every protocol's values -> records."""
    pairs = [p for p in item.pairs if p.key in todo]
    prompts = image_prompts(item, pairs, list(native))
    stored = config.heatmaps == "float16"  # score exactly the maps the cache keeps
    heatmaps = {m: native_to_raw(kind, maps.astype(np.float16).astype(np.float32) if stored else maps, size)
                for m, (kind, maps) in native.items()}
    return pair_records(model_name, item, pairs, todo, config,
                        lambda pair, method: heatmaps[method][prompts.index(pair.prompt)], size)


def pair_records(model_name: str, item: ImagePairs, pairs: list, todo: dict, config: EvalConfig, heatmap_of,
                 size: tuple[int, int]) -> list[dict]:
    """Records of these pairs of one image, `heatmap_of(pair, method)` giving each raw-size map: the
    box protocol (Algorithm 1 box, IoU) and the other selected protocols, with the class masks read
    once per image where a protocol needs them. Shared by eval and rescore."""
    masks = item.masks() if item.masks is not None and MASK_PROTOCOLS & set(config.protocols) else {}
    records = []
    for pair in pairs:
        for method in todo[pair.key]:
            heatmap = heatmap_of(pair, method)
            box = box_from_heatmap(heatmap, config.threshold)
            records.append({
                "image_id": pair.image_id, "file_name": pair.file_name, "image_size": list(size),
                "category_id": pair.category_id, "category": pair.category, "prompt": pair.prompt,
                "model": model_name, "method": method, "threshold": config.threshold,
                "box": [int(v) for v in box], "gt_boxes": pair.gt_boxes,
                "iou": best_iou(box, pair.gt_boxes, config.iou_convention), "coverage": pair.coverage,
                **pair_values(config.protocols, heatmap, masks.get(pair.category_id), pair.gt_boxes,
                              config.threshold, config.pointing_tolerance, config.cam_curve_interval),
            })
    return records


def _read_image(path: str, model: ClipModel):
    """Loader thread: the decoded image and its model input (pinned on CUDA, for an asynchronous copy)."""
    try:
        image = load_image(path)
    except CamlocError as exc:
        raise UnreadableImage(str(exc)) from exc
    return image, model.host_input(image)


def run_pipeline(model: ClipModel, work: list, config: EvalConfig, handle, bar, runtime: dict,
                 cache: HeatmapCache | None, image_batch: int = 1, host_workers: int | None = None) -> tuple:
    """Evaluate `work` `image_batch` images per device step, with the decoding of the next images and the
    box derivation of the previous ones overlapped with the model (threads: PIL and OpenCV release the
    GIL). Records are appended in image order as each image completes. Returns (records written,
    skipped images, OOM retries)."""
    import os
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    host_workers = host_workers or min(8, cores)
    prefetch = max(2, 2 * image_batch)  # the next batch decodes while this one computes
    loaders = min(prefetch, max(2, cores // 2))  # a GPU eats 8-image batches faster than 2 threads decode
    written, skipped, retries = 0, [], 0
    queue = iter(work)
    loads: deque = deque()
    boxes: deque = deque()

    def flush(block_until: int) -> None:
        nonlocal written
        while boxes and (len(boxes) > block_until or boxes[0][2].done()):
            _, todo, future = boxes.popleft()
            records = future.result()
            append_jsonl(handle, records)
            written += len(records)
            bar.advance(len(todo))

    with ThreadPoolExecutor(loaders) as loader, ThreadPoolExecutor(host_workers) as boxer:
        for item, todo in queue:
            loads.append((item, todo, loader.submit(_read_image, item.path, model)))
            if len(loads) > prefetch:
                break
        while loads:
            batch = []
            while loads and len(batch) < image_batch:
                item, todo, future = loads.popleft()
                nxt = next(queue, None)
                if nxt is not None:
                    loads.append((*nxt, loader.submit(_read_image, nxt[0].path, model)))
                try:
                    image, host_input = future.result()
                except UnreadableImage as exc:  # a corrupt or missing file: counted and reported, not fatal
                    skipped.append({"image_id": item.image_id, "path": item.path, "pairs": len(todo),
                                    "reason": str(exc)})
                    bar.advance(len(todo))
                    continue
                batch.append((item, todo, image, host_input))
            if not batch:
                continue
            for (item, todo, image, _), (native, oom) in zip(batch, compute_images(model, batch, config, runtime,
                                                                                    cache)):
                retries += oom
                boxes.append((item, todo, boxer.submit(image_records, model.name, item, todo, config, native,
                                                       image.size)))
            flush(block_until=host_workers)
        flush(block_until=0)
    return written, skipped, retries


def mean_coverage(images: list[ImagePairs]) -> float | None:
    """Mean fraction of the image the pair's class covers (spec §6), over pairs that have masks."""
    values = [p.coverage for item in images for p in item.pairs if p.coverage is not None]
    return sum(values) / len(values) if values else None


def write_tables(run_dir: Path, rows: list[dict]) -> None:
    """table.csv / table.md: one row per method; the columns of the protocols beyond box where present."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=TABLE_COLUMNS + [c for c in PROTOCOL_COLUMNS if any(c in r for r in rows)])
    atomic_write_text(run_dir / "table.csv", table.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(run_dir / "table.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")


def check_images(images: list[ImagePairs], skip_missing: bool, dataset: str) -> list[ImagePairs]:
    """Before any work: every image file exists (or, with `skip_missing`, the missing ones are dropped
    and reported later), is within Pillow's pixel limit, and has the size its annotation says (boxes
    in one frame scored against a map in another would be silently wrong). Reads headers only.
    Unreadable files are left to the run, which skips and reports them."""
    from camloc.models.preprocess import ImageTooLarge, image_size

    missing = []
    for item in images:
        path = Path(item.path)
        if not path.is_file():
            missing.append(item)
            continue
        try:
            size = image_size(path)
        except ImageTooLarge:
            raise
        except CamlocError:
            continue  # corrupt: the loader skips and reports it
        expected = tuple(item.pairs[0].image_size)
        if size != expected:
            raise CamlocError(f"image {item.image_id} ({path}) is {size[0]}x{size[1]} pixels, but its annotation says "
                              f"{expected[0]}x{expected[1]}: its boxes would be scored in another frame; fix the "
                              "annotation's width/height or use the image it was made for")
    if missing and not skip_missing:
        folder = Path(missing[0].path).parent
        where = f"the image folder {folder} does not exist" if not folder.is_dir() else f"{missing[0].path} does not exist"
        raise CamlocError(f"{len(missing)} of {len(images)} images are missing ({where}); check --data-root "
                          f"(`camloc data verify {dataset}`) or pass --skip-missing to skip and report them")
    return images


def run_eval(
    config: EvalConfig,
    run_dir: str | Path,
    *,
    device: str = "auto",
    cache_dir: str | None = None,
    force_new: bool = False,
    data_options: dict | None = None,
    progress: bool = True,
    chunk_size: int | str = "auto",
    image_batch: int | str = "auto",
    compile: str = "auto",
    save_heatmaps: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    save_vis: int = 0,
    skip_missing: bool = False,
    skip_bad_records: bool = False,
) -> dict:
    """Evaluate `config` into `run_dir`, resuming what is there. Returns the summary dict.

    With `shard=(rank, world)` this process takes its share of the images and appends its own records
    file; every rank's summary and tables cover all records present when it ends (the last rank to
    finish writes the complete ones; under an initialised process group rank 0 writes them after a
    barrier). The folder (or this shard's share of it) is locked while the run works in it."""
    started = time.perf_counter()
    rank, world = shard
    if save_vis < 0:
        raise CamlocError(f"--save-vis must be 0 or more pairs per group, got {save_vis}")
    if force_new and world > 1 and not process_group_ready():
        raise CamlocError(f"--force-new with a sharded run ({rank}/{world}) would let the shards delete each other's "
                          f"new records; delete the run folder {run_dir} first, or launch with torchrun (its ranks "
                          "coordinate the reset)")
    device = rank_device(device)
    run_dir = prepare_out_dir(run_dir)
    torch.manual_seed(config.seed)
    if family_hint(config.model):  # fail on a bad method before any weights are fetched
        resolve_methods(config.methods, family_hint(config.model), config.model)
    config.protocols = parse_protocols(config.protocols)
    check_parameters(config.pointing_tolerance, config.cam_curve_interval)
    config.heatmaps = "float16" if save_heatmaps is not None else None
    if config.dataset == "ade20k-scenes":
        config.ade_extent = config.ade_extent or "visible"
    elif config.ade_extent is not None:
        raise CamlocError(f"--ade-extent applies to ade20k-scenes only, not to {config.dataset}")
    issues: dict = {}
    sources: dict = {}
    images = load_dataset(config.dataset, limit=config.limit, classes=config.classes,
                          prompt_template=config.prompt_template, subset_seed=config.subset_seed, split=config.split,
                          per_class=config.per_class, include_stuff=config.include_stuff,
                          ade_extent=config.ade_extent or "visible", issues=issues, sources=sources,
                          **resume_data_options(run_dir, config, data_options, force_new))
    config.data = data_identity(images)
    config.data_sources = sources
    mine = check_images(assign_images(images, rank, world), skip_missing, config.dataset)
    model = ClipModel.load(config.model, device=device, precision=config.precision, cache_dir=cache_dir)
    config.precision = model.precision
    config.weights = dict(model.backend.info)
    config.options = resolve_options(model, {**default_options(), **config.options})
    config.methods = [s.name for s in resolve_methods(config.methods, model.family.name, model.name)]
    if "rise" in config.methods:  # RISE draws its masks from the run's seed: part of its cache key
        config.options = {**config.options, "seed": config.seed}
    check_method_options(model, config.methods, config.options)
    image_batch = resolve_image_batch(image_batch, config.methods)
    model.encoder.configure(compile)
    if "clipsurgery" in config.methods and config.options.get("contrast") == "labels":
        single = sum(1 for item in images if len({p.prompt for p in item.pairs}) < 2)
        if single:
            raise CamlocError(f"clipsurgery --contrast labels needs at least 2 prompts per image (feature surgery over "
                              f"one prompt is zero everywhere), and {single} of the {len(images)} images have one; "
                              "use --contrast empty, none or dataset")
    prompts = model.prompt_problems(dataset_prompts(images))
    issues.update({k: v for k, v in prompts.items() if v})
    lock_name = ".lock" if world == 1 else f".lock.rank{rank:03d}-of-{world:03d}"
    with folder_lock(run_dir, lock_name):
        return _run_locked(config, run_dir, model, images, mine, issues, started, force_new=force_new,
                           progress=progress, chunk_size=chunk_size, image_batch=image_batch,
                           save_heatmaps=save_heatmaps, shard=shard, save_vis=save_vis,
                           skip_bad_records=skip_bad_records)


def _run_locked(config: EvalConfig, run_dir: Path, model: ClipModel, images: list[ImagePairs], mine: list[ImagePairs],
                issues: dict, started: float, *, force_new, progress, chunk_size, image_batch, save_heatmaps, shard,
                save_vis, skip_bad_records) -> dict:
    rank, world = shard
    if force_new and world > 1:  # under a process group: rank 0 resets the folder while the others wait
        import torch.distributed as dist

        if rank == 0:
            _check_config(run_dir, config, True)
        dist.barrier()
        if rank != 0:
            _check_config(run_dir, config, False)
    else:
        _check_config(run_dir, config, force_new)
    load_seconds = time.perf_counter() - started

    cache = None
    if save_heatmaps is not None:
        key = dataset_key(config.dataset, config.split, config.prompt_template, images)
        cache = HeatmapCache(save_heatmaps, model.name, key, config.options, model.precision)
    records_path = run_dir / records_name(rank, world)
    bad: list = []
    skipped_lines = bad if skip_bad_records else None
    # repair (a torn last line) only this rank's own file
    done = {record_key(r) for r in read_jsonl(records_path, repair=True, required=RECORD_FIELDS, skipped=skipped_lines)}
    for other in record_files(run_dir):
        if other != records_path:
            done |= {record_key(r) for r in read_jsonl(other, required=RECORD_FIELDS, skipped=skipped_lines)}
    work = _pending(mine, config.methods, done)
    compute_started = time.perf_counter()
    with open(records_path, "a") as handle, progress_bar(progress, count_pairs([w[0] for w in work])) as bar:
        n_new, skipped, oom_retries = run_pipeline(model, work, config, handle, bar, {"chunk_size": chunk_size,
                                                  "contrast_prompts": dataset_prompts(images)}, cache, image_batch)
    compute_seconds = time.perf_counter() - compute_started

    if process_group_ready():
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            return {"shard": [rank, world], "complete": False, "records_this_invocation": n_new}
    timings = {
        "load_seconds": round(load_seconds, 3),
        "compute_seconds": round(compute_seconds, 3),
        "records_this_invocation": n_new,
        "resumed_records": len(done),
        "pairs_per_second": round(n_new / len(config.methods) / compute_seconds, 3) if n_new else None,
        "image_batch": image_batch,
        "encoder": model.encoder.info(),
    }
    summary, records = finish_run(run_dir, config, model.name, images, shard, skip_bad_records,
                                  device=device_description(model.device), timings=timings,
                                  faults={"skipped_images": skipped, "oom_retries": oom_retries, **issues})
    if save_vis and (world == 1 or summary["complete"]):  # the tables were written
        save_visualizations(model, images, records, config, run_dir / "vis", save_vis)
    return summary


def finish_run(run_dir: Path, config: EvalConfig, model_name: str, images: list[ImagePairs], shard: tuple[int, int],
               skip_bad_records: bool, *, device: str, timings: dict, faults: dict) -> tuple[dict, list[dict]]:
    """Summary and tables of a run folder from every records file in it (all shards). A shard that
    does not see every record keeps its view aside (`summary.rankRRR-of-NNN.json`); the summary of a
    complete view replaces summary.json and the tables. A method with no record at all is an error
    (after the summary is written, with the faults that explain it). Returns (summary, records)."""
    rank, world = shard
    bad: list = []
    records = read_run_records(run_dir, skip_bad_records, bad)
    meters = meters_by(records)
    rows, per_method = [], {}
    for method in config.methods:
        meter = meters.get(method, LocalizationMeter())
        result = meter.compute()
        per_method[method] = {**result, "per_class": meter.compute_per_class()}
        rows.append({"model": model_name, "dataset": config.dataset, "method": method, **result})
    summary = {
        "config": config.to_json(),
        "model": model_name,
        "dataset": config.dataset,
        "n_images": len(images),
        "n_pairs": count_pairs(images),
        "complete": len({record_key(r) for r in records}) == count_pairs(images) * len(config.methods),
        "shard": [rank, world],
        "mean_coverage": mean_coverage(images),
        "seed": config.seed,
        "device": device,
        "precision": config.precision,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "timings": timings,
        "faults": {**faults, "bad_record_lines": [{"file": f, "line": n, "problem": why} for f, n, why in bad]},
        "methods": per_method,
    }
    if world > 1 and not summary["complete"]:
        # other shards are still running: keep this rank's view aside; a rank that sees every record
        # writes summary.json and the tables, so an incomplete view never replaces a complete one
        write_json(run_dir / f"summary.rank{rank:03d}-of-{world:03d}.json", summary)
        return summary, records
    write_json(run_dir / SUMMARY, summary)
    empty = [m for m in config.methods if not per_method[m]["n_pairs"]]
    if empty:
        (run_dir / "table.csv").unlink(missing_ok=True)
        (run_dir / "table.md").unlink(missing_ok=True)
        skipped = faults.get("skipped_images") or []
        why = (f"all {len(skipped)} images with pending pairs were unreadable (listed in summary.json's faults)"
               if skipped else "no records were written")
        raise CamlocError(f"no pair was scored for {', '.join(empty)}: {why}; no table written")
    write_tables(run_dir, rows)
    return summary, records


def pick_for_vis(records: list[dict], n: int, seed: int = 0) -> dict[str, list[dict]]:
    """The n best, n worst and n random (seeded) records by IoU; best and worst exclude each other."""
    import random

    ranked = sorted(records, key=lambda r: (-r["iou"], str(r["image_id"]), r["category_id"]))
    best = ranked[:n]
    worst = [r for r in reversed(ranked) if r not in best][:n]
    chosen = random.Random(seed).sample(ranked, min(n, len(ranked)))
    return {"best": best, "worst": worst, "random": chosen}


def save_visualizations(model: ClipModel, images: list[ImagePairs], records: list[dict], config: EvalConfig,
                        out: Path, n: int) -> None:
    """`--save-vis N`: overlays of the N best, N worst and N random pairs per method, IoU in the caption."""
    from camloc.viz import pair_overlay

    paths = {str(item.image_id): item.path for item in images}
    prompts_of = {str(item.image_id): list(dict.fromkeys(p.prompt for p in item.pairs)) for item in images}
    options = {**config.options, "contrast_prompts": dataset_prompts(images)}
    unique = {record_key(r): r for r in records}
    for method in config.methods:
        picks = pick_for_vis([r for r in unique.values() if r["method"] == method], n, config.seed)
        folder = out / method.replace("+", "p")
        folder.mkdir(parents=True, exist_ok=True)
        for group, chosen in picks.items():
            for rank, r in enumerate(chosen):
                image = load_image(paths[str(r["image_id"])])
                # with all of the image's prompts, as eval scored it (CLIP-ES's softmax and CLIP Surgery's
                # labels contrast depend on the image's other prompts)
                prompts = prompts_of[str(r["image_id"])]
                heatmap = compute_heatmaps(model, image, prompts, [method], options)[method][prompts.index(r["prompt"])]
                name = f"{group}_{rank:02d}_{r['image_id']}_{r['category_id']}.jpg"
                pair_overlay(image, heatmap, r["box"], r["gt_boxes"], f"{method} '{r['prompt']}' IoU {r['iou']:.3f}",
                             folder / name)
