"""`camloc rescore`: score a finished run's saved heatmaps with other protocols, without the model.

The source run must have been made with `--save-heatmaps`: its records name the (pair, method)
combinations, its heatmap cache holds their maps (the very maps its own values were computed from),
and its `config.json` says where its data was. The result is a new run folder with the same layout
(config.json with the new protocols, pairs.jsonl, summary.json, table.csv, table.md, and `heatmaps`
linking to the source's maps); the source folder is not touched. Sharded like eval (`--shard`,
torchrun/SLURM variables): each rank rescores its share of the images into its own records file.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

from camloc.datasets import count_pairs, load_dataset
from camloc.datasets.records import data_identity
from camloc.errors import DataError, OptionError, RunFolderError
from camloc.evaluators.faithfulness import FAITH_PROTOCOLS
from camloc.evaluators.meter import record_key
from camloc.evaluators.protocols import check_ground_truth, check_parameters, parse_protocols
from camloc.run.files import (RECORD_FIELDS, append_jsonl, folder_lock, prepare_out_dir, read_jsonl, read_run_records,
                              record_files)
from camloc.run.finish import finish_run
from camloc.run.heatmap_cache import HeatmapCache, dataset_key
from camloc.run.identity import CONFIG, EvalConfig, check_config, recorded_data_options
from camloc.run.pipeline import pair_records, pending
from camloc.run.progress import progress_bar
from camloc.run.sharding import assign_images, records_name

DEVICE = "none: rescored from the saved heatmaps"
CACHED_AS = {"cache:float32": "float32", "cache:float16": "float16", "float16": "float16"}
"""A source run's `heatmaps` field -> the type its maps are stored in ("float16": camloc before 2026-12,
whose own records were scored from the float16 maps)."""


def source_config(run_dir: Path) -> EvalConfig:
    """The EvalConfig a run folder was written with."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a camloc eval run folder (no {CONFIG})")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(data) - known)
    if unknown or "model" not in data or "methods" not in data:
        raise RunFolderError(f"{path} is not a config of this camloc version (fields {', '.join(unknown) or 'missing'}); "
                             "rerun the evaluation with --save-heatmaps")
    return EvalConfig(**data)


def run_rescore(run_dir: str | Path, out: str | Path, protocols, *, pointing_tolerance: float | None = None,
                cam_curve_interval: float | None = None, data_options: dict | None = None,
                shard: tuple[int, int] = (0, 1), force_new: bool = False, progress: bool = True,
                skip_bad_records: bool = False) -> dict:
    """Rescore `run_dir` into `out` with `protocols`; returns the new run's summary."""
    started = time.perf_counter()
    run_dir, rank, world = Path(run_dir), *shard
    source = source_config(run_dir)
    from camloc.plugins import load_recorded, run_plugins

    load_recorded(source.plugins)  # the plug-ins whose maps are cached, as the run recorded them
    if run_plugins(source.methods) != source.plugins:
        raise RunFolderError(f"{run_dir} was made with plug-in methods whose source differs from the code loaded now "
                             f"({', '.join(sorted(source.plugins or {}))}): the cached maps are the old code's; "
                             "load the same plug-in files, or rerun the evaluation")
    if "ovseg" in (source.protocols or []):
        raise OptionError(f"{run_dir} is an ovseg run: its records already hold the segmentation metric's counts, "
                          "which `camloc report` merges; rescore scores the saved heatmaps of pair runs")
    stored = CACHED_AS.get(source.heatmaps)
    if stored is None or not (run_dir / "heatmaps").is_dir():
        raise RunFolderError(f"{run_dir} was run without --save-heatmaps, so it has no maps to rescore; rerun it with "
                             "--save-heatmaps")
    if Path(out).resolve() == run_dir.resolve():
        raise OptionError("--out must be a new folder: rescore never changes the source run")
    config = EvalConfig(**{**source.identity(), "protocols": parse_protocols(protocols), "faith": None})
    needs_model = [p for p in config.protocols if p in FAITH_PROTOCOLS]
    if needs_model:  # scored without them, the table would silently lack their columns
        raise OptionError(f"--protocols {', '.join(needs_model)}: the faithfulness protocols score perturbed images "
                          "with the model, and rescore runs without it; run camloc eval with them (its --protocols)")
    if pointing_tolerance is not None:
        config.pointing_tolerance = pointing_tolerance
    if cam_curve_interval is not None:
        config.cam_curve_interval = cam_curve_interval
    check_parameters(config.pointing_tolerance, config.cam_curve_interval)

    # the data options given, else where the source run read its data (its config.json's data_sources)
    where = {k: v for k, v in (data_options or {}).items() if v} or recorded_data_options(run_dir, source)
    sources: dict = {}
    images = load_dataset(source.dataset, limit=source.limit, classes=source.classes,
                          prompt_template=source.prompt_template, subset_seed=source.subset_seed, split=source.split,
                          per_class=source.per_class, include_stuff=source.include_stuff,
                          ade_extent=source.ade_extent or "visible", sources=sources, **where)
    check_ground_truth(config.protocols, images, source.dataset)
    identity = data_identity(images)
    if identity["pairs_sha256"] != (source.data or {}).get("pairs_sha256"):
        raise DataError(f"the data found now ({identity['image_root']}, {identity['n_pairs']} pairs) is not the data "
                        f"{run_dir} was scored on ({(source.data or {}).get('image_root')}, "
                        f"{(source.data or {}).get('n_pairs')} pairs); give the same --data-root, --ann-file and "
                        "--image-dir as that run, or none to read the data where that run read it")
    config.data = identity
    if (source.data or {}).get("name"):  # a dataset of one's own keeps its file's name (tables show it)
        config.data["name"] = source.data["name"]
    config.data_sources = sources

    def seen_as(path: str) -> str:
        """An image's path as the source run read it: the same pairs (checked above) under the folder the
        source recorded, when the data has moved since and an option points to its new place."""
        return os.path.join(source.data["image_root"], os.path.relpath(path, identity["image_root"]))

    out = prepare_out_dir(out)
    lock = ".lock" if world == 1 else f".lock.rank{rank:03d}-of-{world:03d}"
    with folder_lock(out, lock):
        check_config(out, config, force_new)
        link = out / "heatmaps"
        if not link.exists():
            os.symlink((run_dir / "heatmaps").resolve(), link, target_is_directory=True)
        key = dataset_key(source.dataset, source.split, source.prompt_template, image_root=source.data["image_root"])
        cache = HeatmapCache(run_dir / "heatmaps", source.model, key, source.options, source.precision,
                             None if source.heatmaps == "float16" else stored)
        scored = {record_key(r) for r in read_run_records(run_dir, skip_bad_records)}
        records_path = out / records_name(rank, world)
        done = {record_key(r) for r in read_jsonl(records_path, repair=True, required=RECORD_FIELDS)}
        for other in record_files(out):
            if other != records_path:
                done |= {record_key(r) for r in read_jsonl(other, required=RECORD_FIELDS)}
        # the source's own (pair, method) records, less those already rescored
        work = [(item, {k: [m for m in ms if (*k, m) in scored] for k, ms in todo.items()})
                for item, todo in pending(assign_images(images, rank, world), config.methods, done)]
        work = [(item, {k: ms for k, ms in todo.items() if ms}) for item, todo in work]
        work = [(item, todo) for item, todo in work if todo]
        n_new = 0
        compute_started = time.perf_counter()
        with open(records_path, "a") as handle, progress_bar(progress, sum(len(t) for _, t in work)) as bar:
            for item, todo in work:
                pairs = [p for p in item.pairs if p.key in todo]
                size = tuple(pairs[0].image_size)

                def heatmap_of(pair, method, item=item):  # checked to be of this image file and prompt
                    return cache.raw(method, item.image_id, pair.category_id, seen_as(item.path), pair.prompt)

                records = pair_records(source.model, item, pairs, todo, config, heatmap_of, size)
                append_jsonl(handle, records)
                n_new += len(records)
                bar.advance(len(todo))
        timings = {"load_seconds": round(compute_started - started, 3),
                   "compute_seconds": round(time.perf_counter() - compute_started, 3),
                   "records_this_invocation": n_new, "resumed_records": len(done), "pairs_per_second": None}
        summary, _ = finish_run(out, config, source.model, images, (rank, world), skip_bad_records, device=DEVICE,
                                timings=timings, faults={"rescored_from": str(run_dir.resolve()), "heatmap_dtype": stored,
                                                         "source_records": len(scored),
                                                         "source_pairs": count_pairs(images)})
    return summary
