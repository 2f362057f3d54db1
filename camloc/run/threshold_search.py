"""`camloc threshold-search`: the appendix's Otsu-vs-single-threshold ablation (Table S1), end to end.

For each model and method: heatmaps of the train pairs (class-balanced COCO train2017 by default) and
of the val pairs (COCO val2017) are computed once into the heatmap cache (`OUT/heatmaps`); one
binarisation threshold is grid-searched on train for the best mean IoU (everything else as
Algorithm 1); val is scored with that threshold and with Otsu. Re-scoring runs from the cache
alone: when every map is cached the model is not even loaded.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from camloc.cams.engine import compute_native
from camloc.cams.options import default_options
from camloc.cams.registry import check_method_options, resolve_methods, resolve_options
from camloc.datasets import ImagePairs, count_pairs, dataset_prompts, load_dataset
from camloc.datasets.records import has_boxless_pairs
from camloc.datasets.records import data_identity
from camloc.errors import RunFolderError
from camloc.evaluators.threshold import Item, best_threshold, score_items, threshold_grid
from camloc.models import ClipModel, load_image, resolve_device, resolve_precision
from camloc.models.loading import canonical_model_name
from camloc.models.open_clip_backend import is_open_clip
from camloc.models.specs import family_hint
from camloc.run.files import atomic_write_text, folder_lock, prepare_out_dir, write_json
from camloc.run.heatmap_cache import HeatmapCache, dataset_key
from camloc.run.pipeline import check_images
from camloc.run.progress import progress_bar
from camloc.run.provenance import git_commit, package_versions
from camloc.run.sharding import assign_images, process_group_ready, rank_device

DEFAULT_MODEL = "RN50x16"  # rows without a model name in Table S1
DISPLAY = {"gradcam": "GradCAM", "gradcam++": "GradCAM++", "xgradcam": "xGradCAM", "groupcam": "GroupCAM",
           "layercam": "LayerCAM", "scorecam": "ScoreCAM", "gscorecam": "gScoreCAM", "gscorecam-abs": "gScoreCAM-abs",
           "hilacam": "Hila's method", "rise": "RISE"}


@dataclass
class SearchConfig:
    runs: list[dict]
    train: dict = field(default_factory=lambda: {"dataset": "coco-train-balanced", "per_class": 100, "subset_seed": 0})
    val: dict = field(default_factory=lambda: {"dataset": "coco", "split": "val2017"})
    grid: dict = field(default_factory=lambda: {"start": 0.0, "stop": 0.95, "step": 0.05})
    options: dict = field(default_factory=default_options)
    iou: str = "gscorecam"
    precision: str = "auto"
    seed: int = 0


def row_label(method: str, model: str) -> str:
    name = DISPLAY.get(method, method)
    return name if model == DEFAULT_MODEL else f"{name} ({model})"


def search_and_score(train: list[Item], val: list[Item], thresholds: list[float], convention: str = "gscorecam",
                     workers: int | None = None) -> dict:
    """Grid-search one threshold on `train` (best mean IoU, lowest on ties), then score `val` with it and
    with Otsu. Returns the train curve and the val single/Otsu mean IoUs (difference = Otsu - single)."""
    if not train or not val:
        raise RunFolderError("threshold search needs at least one train pair and one val pair")
    train_ious = score_items(train, thresholds, convention, workers)
    curve = train_ious[:, :-1].mean(axis=0)
    best = best_threshold(thresholds, curve)
    val_ious = score_items(val, [best], convention, workers)
    single, otsu = float(val_ious[:, 0].mean()), float(val_ious[:, 1].mean())
    return {"threshold": best, "curve": curve.tolist(), "train_otsu": float(train_ious[:, -1].mean()),
            "single": single, "otsu": otsu, "difference": otsu - single, "n_train": len(train), "n_val": len(val)}


class LazyModel:
    """Loads the model on first use only: with a full cache, re-scoring never touches it."""

    def __init__(self, name: str, device: str, precision: str, cache_dir: str | None, compile: str = "auto"):
        self.args = (name, device, precision, cache_dir)
        self.compile = compile
        self.model: ClipModel | None = None

    def get(self) -> ClipModel:
        if self.model is None:
            name, device, precision, cache_dir = self.args
            self.model = ClipModel.load(name, device=device, precision=precision, cache_dir=cache_dir)
            self.model.encoder.configure(self.compile)
        return self.model

    def checked(self, methods: list[str], options: dict) -> ClipModel:
        """The model, once its method options are checked against it."""
        model = self.get()
        check_method_options(model, methods, options)
        return model


def uncached(cache: HeatmapCache, item: ImagePairs, methods: list[str]) -> list[str]:
    """The methods whose maps of this image's pairs are not all in the cache."""
    cats = [p.category_id for p in item.pairs]
    prompts = {p.category_id: p.prompt for p in item.pairs}
    return [m for m in methods if not cache.has(m, item.image_id, cats, item.path, prompts)]


def fill_cache(model: LazyModel, cache: HeatmapCache, images: list[ImagePairs], methods: list[str],
               options: dict, progress: bool) -> int:
    """Compute and store the native maps that are not cached yet; returns the pairs computed."""
    todo = [(item, missing) for item in images if (missing := uncached(cache, item, methods))]
    options = {**options, "contrast_prompts": dataset_prompts(images)}
    with progress_bar(progress, sum(len(i.pairs) for i, _ in todo), "threshold-search") as bar:
        for item, missing in todo:
            image = load_image(item.path)
            prompts = list(dict.fromkeys(p.prompt for p in item.pairs))
            native = compute_native(model.checked(missing, options), image, prompts, missing, options)
            cache.put_native(item, item.pairs, prompts, native, image.size)
            bar.advance(len(item.pairs))
    return sum(len(i.pairs) for i, _ in todo)


def cached_items(cache: HeatmapCache, images: list[ImagePairs], method: str) -> list[Item]:
    items = []
    for item in images:
        for pair in item.pairs:
            kind, native, size = cache.get(method, item.image_id, pair.category_id, item.path, pair.prompt)
            items.append(Item(kind, native, size, pair.gt_boxes))
    return items


def _load(spec: dict, sources: dict | None = None) -> tuple[list[ImagePairs], str]:
    """A split's images and its heatmap-cache key; `sources` receives where the data was read from."""
    spec = dict(spec)
    name = spec.pop("dataset")
    images = load_dataset(name, limit=spec.get("limit"), classes=spec.get("classes"),
                          prompt_template=spec.get("prompt_template", "{}"), subset_seed=spec.get("subset_seed"),
                          data_root_dir=spec.get("data_root"), split=spec.get("split"), ann_file=spec.get("ann_file"),
                          image_dir=spec.get("image_dir"), per_class=spec.get("per_class", 100),
                          include_stuff=spec.get("include_stuff", False), ade_extent=spec.get("ade_extent", "visible"),
                          sources=sources)
    if has_boxless_pairs(images):
        from camloc.errors import OptionError

        raise OptionError(f"threshold-search picks the threshold of the best box IoU, and {name}'s pairs have no boxes "
                          "(point labels only)")
    return images, dataset_key(name, spec.get("split"), spec.get("prompt_template", "{}"), images)


def run_threshold_search(config: SearchConfig, out: str | Path, *, device: str = "auto", cache_dir: str | None = None,
                         chunk_size: int | str = "auto", compile: str = "auto", workers: int | None = None,
                         progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Fill the heatmap cache, search and score; write the tables. Returns the summary dict.

    With `shard=(rank, world)` this process computes the maps of its share of the images only (into
    the shared cache, one file per image and method, so ranks never write the same file). Under an
    initialised process group rank 0 then waits for the others and searches; otherwise the rank that
    finds every map cached searches (the last to finish), and the others return `complete: False`."""
    started = time.perf_counter()
    rank, world = shard
    device = rank_device(device)
    out = prepare_out_dir(out)
    thresholds = threshold_grid(**config.grid)
    precision = resolve_precision(config.precision, resolve_device(device))
    sources: dict = {"train": {}, "val": {}}
    train_images, train_key = _load(config.train, sources["train"])
    val_images, val_key = _load(config.val, sources["val"])
    for images, spec in ((train_images, config.train), (val_images, config.val)):
        check_images(assign_images(images, rank, world), False, spec["dataset"])
    datasets = ((train_images, train_key), (val_images, val_key))
    data = {"train": data_identity(train_images), "val": data_identity(val_images)}
    with folder_lock(out, ".lock" if world == 1 else f".lock.rank{rank:03d}-of-{world:03d}", "output folder"):
        if rank == 0:
            # data_sources: where each split was read from (absolute), beside the identity, as eval records it
            atomic_write_text(out / "config.json", json.dumps({**asdict(config), "data": data, "data_sources": sources},
                                                              indent=1) + "\n")
        return _search_locked(config, out, datasets, thresholds, precision, started, device=device,
                              cache_dir=cache_dir, chunk_size=chunk_size, compile=compile, workers=workers,
                              progress=progress,
                              shard=shard, data=data)


def _search_locked(config: SearchConfig, out: Path, datasets, thresholds, precision, started, *, device, cache_dir,
                   chunk_size, compile, workers, progress, shard, data) -> dict:
    rank, world = shard
    (train_images, train_key), (val_images, val_key) = datasets
    options = {**default_options(), **config.options}
    plans, computed, models_loaded = [], 0, 0
    for run in config.runs:
        name = canonical_model_name(run["model"])
        lazy = LazyModel(run["model"], device, precision, cache_dir, compile)
        family = family_hint(run["model"]) or lazy.get().family.name
        methods = [s.name for s in resolve_methods(run["methods"], family, run["model"])]
        run_options = options
        if options.get("topk") == "auto":  # the OpenAI backend's is 300 without loading the model
            run_options = {**options, "topk": 300} if not is_open_clip(run["model"]) else resolve_options(lazy.get(), options)
        caches = {}
        for images, key in datasets:
            caches[key] = HeatmapCache(out / "heatmaps", name, key, run_options, precision)
            computed += fill_cache(lazy, caches[key], assign_images(images, rank, world), methods,
                                   {**run_options, "chunk_size": chunk_size}, progress)
        models_loaded += lazy.model is not None
        weights = dict(lazy.model.backend.info) if lazy.model is not None else "not loaded: every map was cached"
        encoder = lazy.model.encoder.info() if lazy.model is not None else None  # --compile: shapes, seconds
        plans.append((dict(run, options=run_options, weights=weights, encoder=encoder), methods, caches))
    partial = {"kind": "threshold-search", "complete": False, "shard": [rank, world], "pairs_computed": computed}
    if world > 1:
        if process_group_ready():
            import torch.distributed as dist

            dist.barrier()
            if rank != 0:
                return partial
        elif any(uncached(caches[key], item, methods) for _, methods, caches in plans for images, key in datasets
                 for item in images):
            return partial
    rows = []
    for run, methods, caches in plans:
        for method in methods:
            result = search_and_score(cached_items(caches[train_key], train_images, method),
                                      cached_items(caches[val_key], val_images, method),
                                      thresholds, config.iou, workers)
            rows.append({"label": row_label(method, run["model"]), "model": run["model"], "method": method, **result})
    summary = {
        "kind": "threshold-search", "complete": True, "shard": [rank, world], "config": {**asdict(config), "data": data},
        "thresholds": thresholds, "precision": precision,
        "runs": [{"model": run["model"], "methods": methods, "options": run["options"], "weights": run["weights"],
                  "encoder": run["encoder"]} for run, methods, _ in plans],
        "train_pairs": count_pairs(train_images), "val_pairs": count_pairs(val_images),
        "pairs_computed": computed, "models_loaded": models_loaded, "versions": package_versions(),
        "git_commit": git_commit(), "seconds": round(time.perf_counter() - started, 3), "rows": rows,
    }
    write_outputs(out, rows, thresholds)
    write_json(out / "summary.json", summary)
    return summary


def table_s1(rows: list[dict]):
    """Table S1 as a DataFrame: label, model, method, threshold, single, otsu, difference; a Mean row."""
    import pandas as pd

    table = pd.DataFrame([{k: r[k] for k in ("label", "model", "method", "threshold", "single", "otsu", "difference")}
                          for r in rows])
    mean = {"label": "Mean", "model": "", "method": "", "threshold": np.nan, "single": table["single"].mean(),
            "otsu": table["otsu"].mean(), "difference": table["difference"].mean()}
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def percent_markdown(table) -> str:
    shown = table[["label", "single", "otsu", "difference"]].copy()
    for col in ("single", "otsu", "difference"):
        shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}%")
    shown.columns = ["method", "single value", "Otsu", "difference (Otsu - single)"]
    return shown.to_markdown(index=False) + "\n"


def write_outputs(out: Path, rows: list[dict], thresholds: list[float]) -> None:
    import pandas as pd

    table = table_s1(rows)
    atomic_write_text(out / "table_s1.csv", table.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(out / "table_s1.md", percent_markdown(table))
    curves = pd.DataFrame([{"label": r["label"], "model": r["model"], "method": r["method"], "threshold": t,
                            "train_mean_iou": v} for r in rows for t, v in zip(thresholds, r["curve"])])
    atomic_write_text(out / "curves.csv", curves.to_csv(index=False, float_format="%.6f"))
    plot_curves(rows, thresholds, out / "curves.png")


def plot_curves(rows: list[dict], thresholds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        line, = ax.plot(thresholds, r["curve"], marker="o", ms=3, label=r["label"])
        ax.axhline(r["train_otsu"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("binarisation threshold (dotted: Otsu)")
    ax.set_ylabel("train mean IoU")
    ax.set_title("single-threshold grid search (Table S1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
