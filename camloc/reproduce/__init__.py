"""`camloc reproduce`: a paper's table as a named preset (data, not code), run as ordinary camloc evaluations,
and written with the published value, camloc's value and their difference in every cell.

- `presets/<name>.toml`: the table's models, methods (with every option), datasets and protocol settings (an
  ovseg preset and what differs from it, or the box protocol's threshold, IoU convention and prompt), the
  tolerance beyond which a cell is flagged, the rough GPU time, and the record of official settings it must
  hold (`official_configs.toml`, checked by the tests).
- `published/<paper>.toml`: the published numbers, one table per key, with their unit and source; the reports'
  `--compare-paper` reads the same files (`published_values`).

Each (model, dataset) of a preset runs as one run folder `OUT/<model>/<dataset>` through `camloc.api.evaluate`:
resumable, shardable (`--shard`, torchrun, SLURM) and checked against its identity like any other run. The
table is written from whatever the folders hold: a run limited to some images (`--limit`), run with another model
than the paper's, or still missing records (a shard not finished) makes the table partial, said in its title,
and a partial table prints no difference."""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from camloc.errors import OptionError, RunFolderError

HERE = Path(__file__).resolve().parent
PRESETS_DIR = HERE / "presets"
PUBLISHED_DIR = HERE / "published"
OFFICIAL_FILE = HERE / "official_configs.toml"

WITH_BACKGROUND = ("voc21", "context60", "coco-object")
WITHOUT_BACKGROUND = ("voc20", "context59", "coco-stuff-171", "cityscapes", "ade20k-150")
MEANS = {"mean (with bg)": WITH_BACKGROUND, "mean (without bg)": WITHOUT_BACKGROUND,
         "mean (8)": WITH_BACKGROUND + WITHOUT_BACKGROUND}
"""The averages the field reports beside the eight-benchmark mean: the three datasets with a background class
and the five without (CorrCLIP's and OV-Stitcher's split), each only where all its datasets are in the table."""


MIOU_CONVENTIONS = ("mmseg", "gt-classes")


def gt_classes_miou(state) -> float:
    """CLIPtrase's mIoU (configs/metric.py at 8fb4d74): intersection / (union + 0.01) averaged over the classes with
    ground-truth pixels; classes only predicted are left out (mmseg's IoUMetric counts them as 0)."""
    import numpy as np

    present = state.label > 0
    return float(np.mean(state.intersect[present] / (state.union[present] + 0.01))) if present.any() else math.nan


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    protocol: str
    models: list[str]
    methods: list[str]
    datasets: list[str]
    tolerance: float
    gpu_hours: float
    official: str
    published: str | None = None
    unpublished: str | None = None
    ovseg: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    """(model, methods) pairs where the methods differ by model (Table S1); else every model runs every method."""
    dataset_options: dict = field(default_factory=dict)
    """Method options that differ by dataset (`[dataset_options.DATASET]`), over `options` for that dataset's runs."""
    miou: str = "mmseg"
    """How the paper averages per-class IoU: `mmseg` (IoUMetric: every class with a union) or `gt-classes` (CLIPtrase's
    configs/metric.py: the classes present in the ground truth, each IoU with 0.01 added to its union)."""
    precision: str | None = None
    """The precision the paper's harness runs in (e.g. fp16), used unless --precision names another; None: camloc's
    choice (auto)."""

    def options_for(self, dataset: str) -> dict:
        """The method options of this preset's runs on `dataset`: `options`, that dataset's own, and the default of
        an option other datasets set and this one does not (so a run folder is held to it too)."""
        from camloc.cams.options import default_options

        varying = {k for values in self.dataset_options.values() for k in values} - set(self.options)
        defaults = default_options() if varying else {}
        return {**{k: defaults[k] for k in sorted(varying)}, **self.options, **self.dataset_options.get(dataset, {})}

    @property
    def rows(self) -> list[tuple[str, str]]:
        """The table's (model, method) rows, in the preset's order."""
        if self.runs:
            return [(run["model"], method) for run in self.runs for method in run["methods"]]
        return [(model, method) for model in self.models for method in self.methods]

    @property
    def paper_table(self) -> tuple[str, str] | None:
        if not self.published:
            return None
        paper, _, table = self.published.partition(":")
        return paper, table


def presets() -> dict[str, Preset]:
    """Every preset, by name (the file's stem), in name order."""
    out = {}
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text())
        runs = data.get("runs", [])
        stray = sorted(set(data.get("dataset_options", {})) - set(data["datasets"]))
        if stray:
            raise OptionError(f"{path.name}: [dataset_options] names {', '.join(stray)}, not among its datasets")
        models = data.get("models") or list(dict.fromkeys(run["model"] for run in runs))
        methods = data.get("methods") or list(dict.fromkeys(m for run in runs for m in run["methods"]))
        out[path.stem] = Preset(name=path.stem, title=data["title"], protocol=data["protocol"], models=models,
                                methods=methods, datasets=data["datasets"], runs=runs, search=data.get("search", {}),
                                tolerance=float(data["tolerance"]), gpu_hours=float(data["gpu_hours"]),
                                official=data["official"], published=data.get("published"),
                                unpublished=data.get("unpublished"), ovseg=data.get("ovseg", {}),
                                eval=data.get("eval", {}), options=data.get("options", {}),
                                dataset_options=data.get("dataset_options", {}), precision=data.get("precision"),
                                miou=data.get("miou", "mmseg"))
        if out[path.stem].miou not in MIOU_CONVENTIONS:
            raise OptionError(f"{path.name}: miou {out[path.stem].miou!r} is not one of {', '.join(MIOU_CONVENTIONS)}")
    return out


def preset(name: str) -> Preset:
    known = presets()
    if name not in known:
        raise OptionError(f"no reproduction preset {name!r}; `camloc reproduce list` shows {', '.join(known)}")
    return known[name]


def published_table(paper: str, table: str) -> dict:
    """`published/<paper>.toml`'s table: {"title", "source", "unit", "values": {model: {method: {dataset: v}}},
    "paper", ...} (a box table has one value per (model, method): stored under the dataset key "value")."""
    path = PUBLISHED_DIR / f"{paper}.toml"
    if not path.is_file():
        raise OptionError(f"no published numbers for {paper!r} ({path} is missing)")
    data = tomllib.loads(path.read_text())
    if table not in data:
        raise OptionError(f"{path.name} has no table {table!r}; it has {', '.join(k for k in data if k != 'paper')}")
    return {"paper": data.get("paper", paper), **data[table]}


def published_values(paper: str, table: str) -> dict:
    """{model: {method: value}} of a published table (what `--compare-paper` puts beside a run)."""
    return published_table(paper, table)["values"]


def official_settings(name: str) -> dict:
    """`official_configs.toml`'s record for `name`: {"source", "defaults", "datasets": {dataset: {...}}}."""
    data = tomllib.loads(OFFICIAL_FILE.read_text())
    if name not in data:
        raise OptionError(f"{OFFICIAL_FILE.name} records no official settings named {name!r}")
    return data[name]


def listing() -> list[dict]:
    """`camloc reproduce list`: one row per preset, with what it needs and where its numbers come from."""
    rows = []
    for p in presets().values():
        source = (published_table(*p.paper_table)["source"] if p.paper_table
                  else p.unpublished or "no published numbers recorded")
        rows.append({"name": p.name, "title": p.title, "protocol": p.protocol, "models": ", ".join(p.models),
                     "methods": ", ".join(p.methods), "datasets": ", ".join(p.datasets), "gpu_hours": p.gpu_hours,
                     "precision": p.precision,
                     "settings": official_settings(p.official)["source"], "published": source})
    return rows


def _slug(name: str) -> str:
    return name.replace("/", "-").replace(":", "-").replace("@", "-")


def run_folder(out: Path, model: str, dataset: str) -> Path:
    return Path(out) / _slug(model) / dataset


def run_preset(name: str, out: str | Path, *, data_root: str | Path | None = None, data: dict | None = None,
               limit: int | None = None, methods: list[str] | None = None, datasets: list[str] | None = None,
               models: list[str] | None = None, substitute_model: str | None = None, shard=(0, 1),
               device: str = "auto", precision: str = "auto", image_batch="auto", progress: bool = False,
               plugins=None) -> dict:
    """Run a preset's evaluations (each (model, dataset) a run folder under `out`, resumed where it exists),
    then write its table (`write_table`). `data` maps a dataset to its own data root (else `data_root`);
    `methods`, `datasets`, `models` keep a subset of the preset's; `substitute_model` runs every model of the
    preset as that one (a smoke test: the table is then partial and prints no difference)."""
    from camloc.api import evaluate

    p = preset(name)
    chosen_methods = _subset(methods, p.methods, "--methods")
    chosen_datasets = _subset(datasets, p.datasets, "--datasets")
    chosen_models = _subset(models, p.models, "--models")
    stray = sorted(set(data or {}) - set(p.datasets))
    if stray:
        raise OptionError(f"--data {', '.join(stray)}: not a dataset of {name} (it has {', '.join(p.datasets)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"preset": p.name, "substitute_model": substitute_model, "limit": limit}
    marker = out / "reproduce.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if {k: before.get(k) for k in state} != state:
            raise OptionError(f"{out} holds a reproduction of {before.get('preset')} (model "
                              f"{before.get('substitute_model') or 'as published'}, limit {before.get('limit')}); "
                              "use another --out for this one")
    marker.write_text(json.dumps(state, indent=1) + "\n")
    if p.protocol == "threshold-search":
        _run_search(p, out, chosen_models, chosen_methods, data_root=data_root, data=data, limit=limit,
                    substitute_model=substitute_model, shard=shard, device=device, progress=progress,
                    precision=precision)
        return write_table(name, out)
    run_precision = preset_precision(p, precision, device)
    for model in chosen_models:
        for dataset in chosen_datasets:
            root = (data or {}).get(dataset, data_root)
            common = dict(limit=limit, data_root=root, device=device, precision=run_precision,
                          image_batch=image_batch, progress=progress, shard=shard, plugins=plugins,
                          **p.options_for(dataset))
            target = run_folder(out, model, dataset)
            if p.protocol == "ovseg":
                evaluate(substitute_model or model, dataset, chosen_methods, out=target, protocols="ovseg",
                         ovseg=dict(p.ovseg), **common)
            else:
                evaluate(substitute_model or model, dataset, chosen_methods, out=target, protocols=p.protocol,
                         threshold=p.eval.get("threshold", "otsu"), iou=p.eval.get("iou", "gscorecam"),
                         prompt_template=p.eval.get("prompt_template", "{}"), **common)
    return write_table(name, out)


def preset_precision(p: Preset, precision: str, device: str) -> str:
    """The precision a preset's evaluations run at: `--precision` when given, else the harness's (`p.precision`); fp16
    is CUDA's, so on a CPU that is fp32 (and the table names the difference)."""
    if not p.precision or precision != "auto":
        return precision
    from camloc.models.clip_model import resolve_device

    return p.precision if p.precision == "fp32" or resolve_device(device).type == "cuda" else "fp32"


def _run_search(p: Preset, out: Path, models: list[str], methods: list[str], *, data_root, data, limit,
                substitute_model, shard, device, progress, precision="auto") -> None:
    """Table S1's threshold search, one folder (`OUT/search`) for all its models, as `camloc threshold-search`."""
    from camloc.run.threshold_search import SearchConfig, run_threshold_search

    runs = [{"model": substitute_model or run["model"], "methods": [m for m in run["methods"] if m in methods]}
            for run in p.runs if run["model"] in models]
    runs = [run for run in runs if run["methods"]]
    splits = {}
    for part in ("train", "val"):
        spec = dict(p.search[part])
        root = (data or {}).get(spec["dataset"], data_root)
        if root is not None:
            spec["data_root"] = str(root)
        if limit is not None:
            spec["limit"] = limit
        splits[part] = spec
    config = SearchConfig(runs=runs, train=splits["train"], val=splits["val"], grid=dict(p.search["grid"]),
                          options=dict(p.options), iou=p.search.get("iou", "gscorecam"),
                          precision=precision)  # auto: fp16 on CUDA, the paper's (held below with the others)
    run_threshold_search(config, out / "search", device=device, progress=progress, shard=shard)


def _measured_search(p: Preset, out: Path, reasons: list[str], whole: bool, substitute: str | None) -> dict:
    """{(model, method, column): (value, complete)} of the threshold search under OUT/search."""
    summary_file = out / "search" / "summary.json"
    if not summary_file.is_file():
        reasons.append("the threshold search has not finished (no search/summary.json)")
        return {}
    summary = json.loads(summary_file.read_text())
    config = summary.get("config") or {}
    keys = ("dataset", "per_class", "subset_seed", "split")
    differ = [f"{k} {config.get(k)!r} (the preset's: {p.search[k]!r})" for k in ("iou", "grid") if config.get(k) != p.search[k]]
    differ += [f"{part} {name} {(config.get(part) or {}).get(name)!r} (the preset's: {p.search[part].get(name)!r})"
               for part in ("train", "val") for name in keys
               if (config.get(part) or {}).get(name) != p.search[part].get(name)]
    differ += _option_mismatches(p.options, config)
    if p.precision and summary.get("precision") != p.precision:
        differ.append(f"precision {summary.get('precision')} (the preset's: {p.precision})")
    if differ:
        reasons.append(f"the threshold search was run with {'; '.join(differ)}")
    values = {}
    for row in summary.get("rows", []):
        models = [m for m in p.models if (substitute or m) == row["model"]]
        for model in models:
            if (model, row["method"]) not in p.rows:
                continue
            for column in ("single", "otsu", "difference"):
                values[(model, row["method"], column)] = (float(row[column]), whole and not differ)
    reasons += [f"{model} {method} not run" for model, method in p.rows
                if (model, method, "single") not in values]
    return values


def _subset(given: list[str] | None, full: list[str], option: str) -> list[str]:
    if not given:
        return list(full)
    unknown = [g for g in given if g not in full]
    if unknown:
        raise OptionError(f"{option} {', '.join(unknown)}: not in this preset (it has {', '.join(full)})")
    return [f for f in full if f in given]


def _option_mismatches(wanted: dict, config: dict) -> list[str]:
    """The method options a run's config.json records otherwise than `wanted`."""
    options = config.get("options") or {}
    return [f"option {k} {options.get(k)!r} (the preset's: {v!r})" for k, v in wanted.items() if options.get(k) != v]


def _mismatches(p: Preset, model: str, dataset: str, config: dict, state: dict) -> list[str]:
    """What a run folder's config.json says that the preset (and this reproduction's model and limit) does not."""
    out = []
    want_model = state.get("substitute_model") or model
    if config.get("model") != want_model:
        out.append(f"model {config.get('model')} (the preset's: {want_model})")
    if config.get("limit") != state.get("limit"):
        out.append(f"--limit {config.get('limit')}")
    out += _option_mismatches(p.options_for(dataset), config)
    if p.precision and config.get("precision") != p.precision:
        out.append(f"precision {config.get('precision')} (the preset's: {p.precision})")
    if p.protocol == "ovseg":
        from camloc.segment.infer import resolve_settings

        given = {k: v for k, v in p.ovseg.items() if k != "preset"}
        want = resolve_settings(dataset, p.ovseg.get("preset", "sclip"), **given).to_json()
        from camloc.run.ovseg import RECORDED

        have = config.get("ovseg") or {}
        out += [f"ovseg {k} {have.get(k)!r} (the preset's: {want.get(k)!r})"
                for k in list(want) + [k for k in have if k not in want and k not in RECORDED]
                if have.get(k) != want.get(k)]  # a class file given beside the preset is a difference too
    else:
        for key, name, default in (("threshold", "threshold", "otsu"), ("iou", "iou_convention", "gscorecam"),
                                   ("prompt_template", "prompt_template", "{}")):
            if config.get(name) != p.eval.get(key, default):
                out.append(f"{name} {config.get(name)!r} (the preset's: {p.eval.get(key, default)!r})")
    return out


def _measured(p: Preset, out: Path) -> tuple[dict, list[str]]:
    """{(model, method, dataset): (value in the published unit, complete)} from the run folders under `out`,
    and the reasons the table is partial."""
    from camloc.report.tables import eval_groups, long_table_of, ovseg_groups, ovseg_method_states

    values, reasons = {}, []
    state = json.loads((out / "reproduce.json").read_text()) if (out / "reproduce.json").is_file() else {}
    if state.get("substitute_model"):
        reasons.append(f"run with {state['substitute_model']} in place of {', '.join(p.models)}")
    if state.get("limit"):
        reasons.append(f"the first {state['limit']} images of each dataset only (--limit {state['limit']})")
    whole = not reasons  # a substitute model or a limit: no cell is the paper's setting
    if p.protocol == "threshold-search":
        return _measured_search(p, out, reasons, whole, state.get("substitute_model")), reasons
    scale = 100.0 if p.protocol == "ovseg" else 1.0  # ovseg mIoU is stored as a fraction, published in percent
    differing = {}
    for model in p.models:
        for dataset in p.datasets:
            folder = run_folder(out, model, dataset)
            if not (folder / "config.json").is_file():
                reasons.append(f"{model} on {dataset} not run")
                continue
            config = json.loads((folder / "config.json").read_text())
            differ = _mismatches(p, model, dataset, config, state)
            differing[f"{model} on {dataset}"] = differ  # such a folder (run by hand, or before the preset
            folder_whole = whole and not differ            # changed) is never compared as the paper's
            if p.protocol == "ovseg":
                [group] = ovseg_groups([folder])
                reasons += [f"{model} {m} on {dataset} not run" for m in p.methods if m not in group["methods"]]
                expected = (group["identity"].get("data") or {}).get("n_images")
                for method, (state_sum, count) in ovseg_method_states(group).items():
                    if not count:
                        continue
                    complete = folder_whole and expected is not None and count == expected
                    if expected is not None and count != expected:
                        reasons.append(f"{model} {method} on {dataset}: {count} of {expected} images")
                    miou = gt_classes_miou(state_sum) if p.miou == "gt-classes" else state_sum.result()["miou"]
                    values[(model, method, dataset)] = (scale * miou, complete)
            else:
                [group] = eval_groups([folder], allow_incomplete=True)
                reasons += [f"{model} {m} on {dataset} not run" for m in p.methods if m not in group["methods"]]
                expected = (group["identity"].get("data") or {}).get("n_pairs")
                long = long_table_of([group])
                for _, row in long.iterrows():
                    complete = folder_whole and expected is not None and int(row["n_pairs"]) == expected
                    if expected is not None and int(row["n_pairs"]) != expected:
                        reasons.append(f"{model} {row['method']} on {dataset}: {int(row['n_pairs'])} of {expected} pairs")
                    values[(model, row["method"], dataset)] = (float(row["mean_iou"]), complete)
    return values, reasons + _differences(differing)


def _differences(differing: dict[str, list[str]]) -> list[str]:
    """The run folders' differences from the preset as reasons: one for what every folder shares (a CPU run's fp32),
    then each folder's own."""
    shared = [d for d in next(iter(differing.values()), []) if all(d in v for v in differing.values())]
    out = [f"every run was run with {'; '.join(shared)}"] if shared and len(differing) > 1 else []
    shared = shared if out else []
    out += [f"{where} was run with {'; '.join(own)}" for where, differ in differing.items()
            if (own := [d for d in differ if d not in shared])]
    return out


def reproduction_table(name: str, out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, str, bool]:
    """(long, wide, title, partial) of a preset's run folders under `out`.

    long: one row per (model, method, column) with published, camloc, delta (None when partial or either side
    is missing) and flagged (|delta| > the preset's tolerance); columns are the datasets and, where all theirs are
    present, the with-background, without-background and eight-dataset means (Table S1: single value, Otsu and
    their difference). wide: per (model, method) three rows (published, camloc, delta) and one column per dataset
    or mean, as papers print them."""
    p = preset(name)
    out = Path(out)
    if not out.is_dir():
        raise RunFolderError(f"{out} does not exist: run `camloc reproduce {name} --out {out} ...` first")
    measured, reasons = _measured(p, out)
    published = published_table(*p.paper_table) if p.paper_table else None
    if p.protocol == "threshold-search":
        columns = ["single", "otsu", "difference"]
    else:
        columns = list(p.datasets) + [m for m, members in MEANS.items()
                                      if p.protocol == "ovseg" and set(members) <= set(p.datasets)]
    rows = []
    for model, method in p.rows:
        paper = ((published or {}).get("values", {}).get(model, {}).get(method, {}))
        if not isinstance(paper, dict):
            paper = {p.datasets[0]: paper}
        elif "single" in paper:  # Table S1: the difference is Otsu - single, as printed
            paper = {**paper, "difference": paper["otsu"] - paper["single"]}
        for column in columns:
            members = MEANS.get(column, (column,))
            theirs = _mean([paper.get(d) for d in members])
            runs = [measured.get((model, method, d), (None, False)) for d in members]
            ours = _mean([value for value, _ in runs])
            whole = all(complete for _, complete in runs)  # the paper's model on every image of each
            delta = None if not whole or theirs is None or ours is None else ours - theirs
            rows.append({"model": model, "method": method, "column": column, "published": theirs,
                         "camloc": ours, "delta": delta,
                         "flagged": bool(delta is not None and abs(delta) > p.tolerance + 1e-12)})
    long = pd.DataFrame(rows, columns=["model", "method", "column", "published", "camloc", "delta", "flagged"])
    digits = 2 if p.protocol == "ovseg" else 4  # mIoU points; box IoU fractions
    wide_rows = []
    for (model, method), part in long.groupby(["model", "method"], sort=False):
        for kind in ("published", "camloc", "delta"):
            wide_rows.append({"model": model, "method": method, "row": kind,
                              **{r["column"]: _cell(r[kind], kind, r["flagged"], digits) for _, r in part.iterrows()}})
    wide = pd.DataFrame(wide_rows, columns=["model", "method", "row"] + columns)
    unit = (published or {}).get("unit", "percent" if p.protocol == "ovseg" else "fraction")
    title = f"{name}: {p.title}"
    if published:
        title += f" — published: {published['source']}; unit: {_unit(p, unit)}; tolerance {p.tolerance:g}"
    else:
        title += f" — {p.unpublished or 'no published numbers recorded'}"
    partial = bool(reasons)
    if partial:
        shown = "no differences printed" if long["delta"].isna().all() else "differences only where a cell's runs are whole"
        missing = [r[: -len(" not run")] for r in dict.fromkeys(reasons) if r.endswith(" not run")]
        said = [r for r in dict.fromkeys(reasons) if not r.endswith(" not run")]
        said += [f"not run: {', '.join(missing)}"] if missing else []
        title = f"PARTIAL ({shown}): " + "; ".join(said) + ". " + title
    return long, wide, title, partial


def _unit(p: Preset, unit: str) -> str:
    if p.protocol == "ovseg":
        which = " over the classes in the ground truth" if p.miou == "gt-classes" else ""
        return ("mIoU (%)" if unit == "percent" else "mIoU") + which
    return "mean box IoU"


def _mean(values: list) -> float | None:
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return sum(values) / len(values)


def _cell(value, kind: str, flagged: bool, digits: int):
    if value is None:
        return None
    if kind == "delta":  # signed, with the flag beside it
        return f"{value:+.{digits}f}{' !' if flagged else ''}"
    return value


def _latex(text: str) -> str:
    """`text` with LaTeX's special characters escaped (a caption)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(c, c) for c in text)


def write_table(name: str, out: str | Path) -> dict:
    """Write OUT/table.md, table.csv (the long form) and table.tex; returns {"title", "partial", "files",
    "flagged"}."""
    out = Path(out)
    p = preset(name)
    long, wide, title, partial = reproduction_table(name, out)
    digits = 2 if p.protocol == "ovseg" else 4
    shown = wide.copy()
    for column in shown.columns[3:]:
        shown[column] = [("" if math.isnan(v) else f"{v:.{digits}f}") if isinstance(v, float) else ("" if v is None else v)
                         for v in shown[column]]
    markdown = f"**{title}**\n\n" + shown.to_markdown(index=False) + "\n"
    flagged = long[long["flagged"]]
    if len(flagged):
        markdown += (f"\n! = the difference exceeds the preset's tolerance ({p.tolerance:g}): "
                     + ", ".join(f"{r.model} {r.method} {r.column}" for r in flagged.itertuples()) + "\n")
    (out / "table.md").write_text(markdown)
    long.to_csv(out / "table.csv", index=False)
    latex = shown.to_latex(index=False, na_rep="--", caption=_latex(title))
    (out / "table.tex").write_text(latex)
    files = [out / f for f in ("table.md", "table.csv", "table.tex")]
    folders = [f for f in sorted(out.glob("*/*")) if (f / "config.json").is_file()]
    folders += [out / "search"] if (out / "search" / "table_s1.csv").is_file() else []  # Table S1's search
    if folders:  # the HTML report of the preset's runs, its table first
        from camloc.report.html import _table, write_html_report

        note = (f"<p class=note>{_escape(title)}</p>" + (f"<p class=note>! = beyond the tolerance: "
                f"{_escape(', '.join(f'{r.model} {r.method} {r.column}' for r in flagged.itertuples()))}</p>"
                if len(flagged) else ""))
        files.append(write_html_report(folders, out / "report.html", allow_incomplete=True,
                                       sections=[(f"reproduction: {name}", note + _table(shown))]))
    return {"title": title, "partial": partial, "files": [str(f) for f in files], "flagged": len(flagged)}


def _escape(text: str) -> str:
    import html

    return html.escape(text)
