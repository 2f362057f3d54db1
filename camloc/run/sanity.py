"""`camloc sanity`: the model-randomisation check (Adebayo et al. 2018) of methods on a dataset's pairs.

The methods' maps of every (image, prompt) pair are computed with the trained model, then again after
each stage of the cascade (`camloc.models.cascade`: the image tower's head, its blocks from the top
down, its stem; cumulative, so the last stage is a fully re-drawn tower), and compared with the trained
maps (`camloc.evaluators.sanity`). The text tower is kept: the prompts' embeddings stay the trained
ones. The model's weights are restored afterwards, whatever happens.

Output folder: `sanity.json` (settings, stages, per (method, stage) means and standard deviations,
every pair's values, the flagged methods), `sanity.csv` and `sanity.md` (one row per method and stage).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from camloc.cams import CamContext, resolve_methods
from camloc.cams.engine import compute_raw
from camloc.cams.postprocess import native_to_raw, to_native
from camloc.cams.registry import check_method_options, resolve_options, run_weights
from camloc.plugins import run_plugins
from camloc.datasets import load_dataset
from camloc.errors import DataError, OptionError, RunFolderError
from camloc.evaluators.sanity import DEFAULT_FLAG_SPEARMAN, flagged, spearman, ssim, stage_summary
from camloc.models import ClipModel, load_image
from camloc.models.cascade import cascade_stages, redraw_
from camloc.run.files import atomic_write_text, folder_lock, prepare_out_dir, write_json
from camloc.run.progress import progress_bar
from camloc.run.provenance import device_description, git_commit, package_versions

OUTPUTS = ("sanity.json", "sanity.csv", "sanity.md")
REDRAW = ("normal draws with each parameter tensor's own mean and standard deviation (one-element tensors and "
          "constant vectors kept, a constant matrix drawn with spread 1 / sqrt(fan-in))")


def _input_maps(model: ClipModel, loaded: list, specs, options: dict, bar) -> dict[str, list[np.ndarray]]:
    """{method: one (n, n) map in [0, 1] per pair, in the images' pair order}, at the model's input size.
    `loaded`: (item, image, preprocessed input) per image, read once for every stage."""
    n = model.input_size
    maps: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    names = [s.name for s in specs]
    for item, image, host in loaded:
        prompts = list(dict.fromkeys(p.prompt for p in item.pairs))
        ctx = CamContext(model, image, prompts, options, methods=names, host_input=host)
        raw = compute_raw(model, image, prompts, specs, context=ctx)
        for name, (kind, tensor) in raw.items():
            at_input = native_to_raw(kind, to_native(kind, tensor), (n, n))
            maps[name] += [at_input[prompts.index(p.prompt)] for p in item.pairs]
        bar.advance(len(item.pairs))
    return maps


def check_out(out: str | Path, force_new: bool) -> None:
    """Refuse a folder that already holds a check's results (unless `force_new`): before any work."""
    out = Path(out)
    if not force_new and any((out / name).exists() for name in OUTPUTS):
        raise RunFolderError(f"--out {out} already holds a sanity check's results; give a new folder or "
                             "--force-new to replace them")


def check_flag(value: float) -> float:
    if not (0 <= value <= 1):
        raise OptionError(f"--flag-spearman must be between 0 and 1, got {value}")
    return float(value)


def run_sanity(model: ClipModel, dataset: str, methods, out: str | Path, *, limit: int | None = None,
               classes: list[str] | None = None, prompt_template: str = "{}", subset_seed: int | None = None,
               data_options: dict | None = None, seed: int = 0, flag_spearman: float = DEFAULT_FLAG_SPEARMAN,
               options: dict | None = None, force_new: bool = False, progress: bool = False) -> dict:
    """Run the check into the folder `out` (refused when it holds a check's results, unless `force_new`).
    Returns what sanity.json holds."""
    flag_spearman = check_flag(flag_spearman)
    out = Path(out)
    check_out(out, force_new)
    specs = resolve_methods(methods, model.family, model.name)
    names = [s.name for s in specs]
    options = resolve_options(model, {**(options or {}), "seed": int(seed)})
    check_method_options(model, names, options)
    stages = cascade_stages(model.visual)
    sources: dict = {}
    images = load_dataset(dataset, limit=limit, classes=classes, prompt_template=prompt_template,
                          subset_seed=subset_seed, sources=sources, **(data_options or {}))
    pairs = [p for item in images for p in item.pairs]
    if not pairs:
        raise DataError(f"dataset {dataset!r} has no pairs with these options (--limit, --classes); nothing to check")
    prepare_out_dir(out)
    with folder_lock(out, what="sanity folder"):
        check_out(out, force_new)  # again, under the lock
        started = time.time()
        visual = model.visual
        trained_state = {k: v.detach().clone() for k, v in visual.state_dict().items()}
        generator = torch.Generator().manual_seed(int(seed))
        per_pair = {m: [] for m in names}
        summaries = {m: [] for m in names}
        with progress_bar(progress, len(pairs) * (len(stages) + 1), "sanity", "maps") as bar:
            loaded = [(item, image, model.host_input(image)) for item in images
                      for image in (load_image(item.path),)]
            trained = _input_maps(model, loaded, specs, options, bar)
            try:
                for stage in stages:
                    redraw_(visual, stage, generator)
                    randomised = _input_maps(model, loaded, specs, options, bar)
                    for m in names:
                        values = [spearman(a, b) for a, b in zip(trained[m], randomised[m])]
                        structural = [ssim(a, b) for a, b in zip(trained[m], randomised[m])]
                        rho = [v for v, _ in values]
                        per_pair[m].append({"stage": stage.name, "spearman": rho, "ssim": structural})
                        summaries[m].append({"stage": stage.name, **stage_summary(
                            rho, structural, sum(c for _, c in values))})
            finally:
                visual.load_state_dict(trained_state)
        bad = [m for m in names if flagged(summaries[m][-1], flag_spearman)]
        result = {
            "kind": "sanity", "model": model.name, "family": model.family.name, "methods": names,
            "dataset": dataset, "limit": limit, "classes": classes, "prompt_template": prompt_template,
            "subset_seed": subset_seed, "data_sources": sources, "seed": int(seed),
            "options": {k: v for k, v in options.items() if k != "chunk_size"}, "map_size": model.input_size,
            "redraw": REDRAW, "flag_spearman": flag_spearman, "device": device_description(model.device),
            "precision": model.precision, "weights": run_weights(model, names, options),
            "plugins": run_plugins(names), "versions": package_versions(),
            "git_commit": git_commit(),
            "stages": [{"name": s.name, "parameters": list(s.parameters)} for s in stages],
            "pairs": [{"image_id": p.image_id, "category_id": p.category_id, "prompt": p.prompt} for p in pairs],
            "results": summaries, "per_pair": per_pair, "flagged": bad, "seconds": round(time.time() - started, 2),
        }
        write_json(out / "sanity.json", result)
        table = sanity_table(result)
        atomic_write_text(out / "sanity.csv", table.to_csv(index=False))
        atomic_write_text(out / "sanity.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return result


def sanity_table(result: dict) -> pd.DataFrame:
    """One row per (method, stage), in cascade order; `flagged` on every row of a flagged method."""
    rows = [{"method": m, "stage": s["stage"], "spearman": s["spearman"], "spearman_sd": s["spearman_sd"],
             "ssim": s["ssim"], "ssim_sd": s["ssim_sd"], "pairs": s["pairs"], "constant_maps": s["constant_maps"],
             "flagged": m in result["flagged"]}
            for m in result["methods"] for s in result["results"][m]]
    return pd.DataFrame(rows)
