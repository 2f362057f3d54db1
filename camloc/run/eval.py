"""`camloc eval`: run methods over a dataset's pairs and write the run folder.

Run folder: `config.json` (the resolved config), `pairs.jsonl` (one record per (pair, method),
appended and flushed as each image finishes), `summary.json`, `table.csv`, `table.md`.
A rerun with the same config resumes: finished (pair, method) records are skipped, a torn last line
is dropped.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from camloc.cams import resolve_methods
from camloc.cams.options import default_options
from camloc.cams.registry import check_method_options, resolve_options, run_weights
from camloc.datasets import ImagePairs, count_pairs, dataset_prompts, load_dataset
from camloc.datasets.records import data_identity
from camloc.datasets.registry import NAMED_BY_SOURCE
from camloc.errors import OptionError, RunFolderError
from camloc.evaluators.faithfulness import FaithSettings
from camloc.evaluators.meter import record_key
from camloc.evaluators.protocols import check_ground_truth, check_parameters, parse_protocols
from camloc.models import ClipModel
from camloc.models.specs import family_hint
from camloc.run.faithfulness import wants_faithfulness
from camloc.run.files import RECORD_FIELDS, folder_lock, prepare_out_dir, read_jsonl, record_files
from camloc.run.finish import finish_run
from camloc.plugins import load_recorded, run_plugins
from camloc.run.heatmap_cache import HeatmapCache, check_heatmap_dtype, dataset_key
from camloc.run.identity import EvalConfig, check_config, recorded_plugins, resume_data_options
from camloc.run.pipeline import check_images, pending, resolve_image_batch, run_pipeline
from camloc.run.progress import progress_bar
from camloc.run.provenance import device_description
from camloc.run.sharding import assign_images, process_group_ready, rank_device, records_name
from camloc.run.vis import save_visualizations


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
    heatmap_dtype: str = "float32",
    shard: tuple[int, int] = (0, 1),
    save_vis: int = 0,
    skip_missing: bool = False,
    skip_bad_records: bool = False,
    model: ClipModel | None = None,
    faith_batch: int = 64,
) -> dict:
    """Evaluate `config` into `run_dir`, resuming what is there. Returns the summary dict.

    With `shard=(rank, world)` this process takes its share of the images and appends its own records
    file; every rank's summary and tables cover all records present when it ends (the last rank to
    finish writes the complete ones; under an initialised process group rank 0 writes them after a
    barrier). The folder (or this shard's share of it) is locked while the run works in it. `model`: an
    already loaded ClipModel of `config.model`, used as it is (`camloc.evaluate`)."""
    started = time.perf_counter()
    rank, world = shard
    if save_vis < 0:
        raise OptionError(f"--save-vis must be 0 or more pairs per group, got {save_vis}")
    if force_new and world > 1 and not process_group_ready():
        raise OptionError(f"--force-new with a sharded run ({rank}/{world}) would let the shards delete each other's "
                          f"new records; delete the run folder {run_dir} first, or launch with torchrun (its ranks "
                          "coordinate the reset)")
    device = rank_device(device)
    run_dir = prepare_out_dir(run_dir)
    torch.manual_seed(config.seed)
    load_recorded(recorded_plugins(run_dir, force_new))  # a resume or a shard: the run's own plug-ins
    if family_hint(config.model):  # fail on a bad method before any weights are fetched
        resolve_methods(config.methods, family_hint(config.model), config.model)
    config.protocols = parse_protocols(config.protocols)
    if wants_faithfulness(config.protocols):
        config.faith = config.faith or FaithSettings().to_dict()
    else:
        config.faith = None
    check_parameters(config.pointing_tolerance, config.cam_curve_interval)
    config.heatmaps = f"cache:{check_heatmap_dtype(heatmap_dtype)}" if save_heatmaps is not None else None
    if config.dataset == "ade20k-scenes":
        config.ade_extent = config.ade_extent or "visible"
    elif config.ade_extent is not None:
        raise OptionError(f"--ade-extent applies to ade20k-scenes only, not to {config.dataset}")
    issues: dict = {}
    sources: dict = {}
    images = load_dataset(config.dataset, limit=config.limit, classes=config.classes,
                          prompt_template=config.prompt_template, subset_seed=config.subset_seed, split=config.split,
                          per_class=config.per_class, include_stuff=config.include_stuff,
                          ade_extent=config.ade_extent or "visible", issues=issues, sources=sources,
                          **resume_data_options(run_dir, config, data_options, force_new))
    check_ground_truth(config.protocols, images, config.dataset)
    config.data = data_identity(images)
    if config.dataset in NAMED_BY_SOURCE and sources.get("ann_file"):
        config.data["name"] = Path(sources["ann_file"]).name
    config.data_sources = sources
    mine = check_images(assign_images(images, rank, world), skip_missing, config.dataset)
    if model is None:
        model = ClipModel.load(config.model, device=device, precision=config.precision, cache_dir=cache_dir)
    elif model.name != config.model:
        raise RunFolderError(f"the loaded model is {model.name}, but the config names {config.model}")
    config.precision = model.precision
    config.options = resolve_options(model, {**default_options(), **config.options})
    config.methods = [s.name for s in resolve_methods(config.methods, model.family, model.name)]
    if "rise" in config.methods:  # RISE draws its masks from the run's seed: part of its cache key
        config.options = {**config.options, "seed": config.seed}
    check_method_options(model, config.methods, config.options)
    config.weights = run_weights(model, config.methods, config.options)
    config.plugins = run_plugins(config.methods, config.dataset)
    image_batch = resolve_image_batch(image_batch, config.methods)
    model.encoder.configure(compile)
    if "clipsurgery" in config.methods and config.options.get("contrast") == "labels":
        single = sum(1 for item in images if len({p.prompt for p in item.pairs}) < 2)
        if single:
            raise RunFolderError(f"clipsurgery --contrast labels needs at least 2 prompts per image (feature surgery over "
                                 f"one prompt is zero everywhere), and {single} of the {len(images)} images have one; "
                                 "use --contrast empty, none or dataset")
    prompts = model.prompt_problems(dataset_prompts(images))
    issues.update({k: v for k, v in prompts.items() if v})
    lock_name = ".lock" if world == 1 else f".lock.rank{rank:03d}-of-{world:03d}"
    with folder_lock(run_dir, lock_name):
        return _run_locked(config, run_dir, model, images, mine, issues, started, force_new=force_new,
                           progress=progress, chunk_size=chunk_size, image_batch=image_batch,
                           save_heatmaps=save_heatmaps, shard=shard, save_vis=save_vis,
                           skip_bad_records=skip_bad_records, faith_batch=faith_batch)


def _run_locked(config: EvalConfig, run_dir: Path, model: ClipModel, images: list[ImagePairs], mine: list[ImagePairs],
                issues: dict, started: float, *, force_new, progress, chunk_size, image_batch, save_heatmaps, shard,
                save_vis, skip_bad_records, faith_batch=64) -> dict:
    rank, world = shard
    if force_new and world > 1:  # under a process group: rank 0 resets the folder while the others wait
        import torch.distributed as dist

        if rank == 0:
            check_config(run_dir, config, True)
        dist.barrier()
        if rank != 0:
            check_config(run_dir, config, False)
    else:
        check_config(run_dir, config, force_new)
    load_seconds = time.perf_counter() - started

    cache = None
    if save_heatmaps is not None:
        key = dataset_key(config.dataset, config.split, config.prompt_template, images)
        cache = HeatmapCache(save_heatmaps, model.name, key, config.options, model.precision,
                             config.heatmaps.removeprefix("cache:"))
    records_path = run_dir / records_name(rank, world)
    bad: list = []
    skipped_lines = bad if skip_bad_records else None
    # repair (a torn last line) only this rank's own file
    done = {record_key(r) for r in read_jsonl(records_path, repair=True, required=RECORD_FIELDS, skipped=skipped_lines)}
    for other in record_files(run_dir):
        if other != records_path:
            done |= {record_key(r) for r in read_jsonl(other, required=RECORD_FIELDS, skipped=skipped_lines)}
    work = pending(mine, config.methods, done)
    compute_started = time.perf_counter()
    with open(records_path, "a") as handle, progress_bar(progress, count_pairs([w[0] for w in work])) as bar:
        n_new, skipped, oom_retries = run_pipeline(model, work, config, handle, bar, {"chunk_size": chunk_size,
                                                  "contrast_prompts": dataset_prompts(images),
                                                  "faith_batch": faith_batch}, cache, image_batch)
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
