"""`camloc report`: merge run folders (and shards) into tables with pandas.

Eval runs are merged from their per-pair records (`pairs.jsonl`), so shards from any number of
workers combine exactly; threshold-search runs from their `table_s1.csv`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from camloc.errors import CamlocError
from camloc.evaluators import meters_by
from camloc.runfiles import read_jsonl
from camloc.sharding import record_files
from camloc.threshold_search import DISPLAY, table_s1

METHOD_ORDER = ["gradcam", "gradcam++", "xgradcam", "groupcam", "layercam", "gscorecam", "scorecam",
                "gscorecam-abs", "hilacam"]
# Appendix values as printed (spec §7). Table S1: (single value, Otsu), mean IoU as fractions.
PAPER_S1 = {
    ("RN50x16", "gradcam"): (0.1195, 0.1156), ("RN50x16", "gradcam++"): (0.0903, 0.0968),
    ("RN50x16", "xgradcam"): (0.0685, 0.0560), ("RN50x16", "groupcam"): (0.0558, 0.0452),
    ("RN50x16", "layercam"): (0.0999, 0.0919), ("RN50x16", "scorecam"): (0.2074, 0.2043),
    ("RN50x16", "gscorecam"): (0.2027, 0.2083), ("ViT-B/32", "hilacam"): (0.1333, 0.1282),
    ("ViT-B/32", "scorecam"): (0.0960, 0.1021), ("ViT-B/32", "gscorecam"): (0.0940, 0.1010),
}
PAPER_S3 = {
    "RN50x4": {"gradcam": 0.073, "gradcam++": 0.105, "xgradcam": 0.112, "groupcam": 0.161, "layercam": 0.068,
               "gscorecam": 0.211, "scorecam": 0.198},
    "RN50x16": {"gradcam": 0.141, "gradcam++": 0.102, "xgradcam": 0.078, "groupcam": 0.168, "layercam": 0.061,
                "gscorecam": 0.216, "scorecam": 0.190},
}
LONG_COLUMNS = ["model", "dataset", "method", "n_pairs", "mean_iou", "acc@0.3", "acc@0.5", "acc@0.7"]


def _kind(run_dir: Path) -> str:
    if (run_dir / "table_s1.csv").is_file():
        return "threshold-search"
    if record_files(run_dir) and (run_dir / "config.json").is_file():
        return "eval"
    raise CamlocError(f"{run_dir} is not a camloc run folder (no pairs.jsonl + config.json, no table_s1.csv)")


def long_table(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per (model, dataset, method) over every eval run given; each (pair, method) once."""
    records = []
    for run_dir in run_dirs:
        if _kind(run_dir) != "eval":
            continue
        dataset = json.loads((run_dir / "config.json").read_text())["dataset"]
        records += [{**r, "dataset": dataset} for path in record_files(run_dir) for r in read_jsonl(path)]
    meters = meters_by(records, group=lambda r: (r["model"], r["dataset"], r["method"]))
    rows = [{"model": m, "dataset": d, "method": x, **meter.compute()} for (m, d, x), meter in meters.items()]
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (r["model"], r["dataset"], order.get(r["method"], 99), r["method"]))
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _model_order(name: str) -> tuple:
    from camloc.models.specs import OFFICIAL_SPECS

    names = list(OFFICIAL_SPECS)
    return (names.index(name), "") if name in names else (len(names), name)


def s3_table(long: pd.DataFrame, compare_paper: bool = False) -> pd.DataFrame:
    """Table S3's layout: rows = models, columns = methods (appendix names and order), average IoU.
    With `compare_paper` every model row is followed by its "(paper)" and "(difference)" rows."""
    if long.empty:
        raise CamlocError("no eval runs to report (give camloc eval run folders)")
    table = long.pivot_table(index="model", columns="method", values="mean_iou", aggfunc="first")
    methods = [m for m in METHOD_ORDER if m in table.columns] + sorted(m for m in table.columns if m not in METHOD_ORDER)
    rows = []
    for model in sorted(table.index, key=_model_order):
        ours = {m: table.loc[model, m] for m in methods}
        rows.append({"model": model, **ours})
        if compare_paper:
            paper = {m: PAPER_S3.get(model, {}).get(m, float("nan")) for m in methods}
            rows.append({"model": f"{model} (paper)", **paper})
            rows.append({"model": f"{model} (difference)", **{m: ours[m] - paper[m] for m in methods}})
    return pd.DataFrame(rows).rename(columns={m: DISPLAY.get(m, m) for m in methods})


def s1_table(run_dirs: list[Path], compare_paper: bool = False) -> pd.DataFrame:
    """Table S1's layout: rows = methods (the model in the label where it is not RN50x16) and a Mean
    row; columns single value, Otsu, difference (Otsu - single), in percent as the appendix prints
    them; with `compare_paper` the paper's three columns beside them."""
    parts = [pd.read_csv(d / "table_s1.csv") for d in run_dirs if _kind(d) == "threshold-search"]
    if not parts:
        raise CamlocError("no threshold-search runs to report (give camloc threshold-search output folders)")
    rows = pd.concat(parts, ignore_index=True)
    rows = rows[rows["label"] != "Mean"].drop_duplicates(subset=["model", "method"], keep="last")
    full = table_s1(rows.to_dict("records"))
    table = pd.DataFrame({"method": full["label"], "single value": 100 * full["single"], "Otsu": 100 * full["otsu"],
                          "difference": 100 * full["difference"]})
    if compare_paper:
        nan = float("nan")
        paper = [PAPER_S1.get((m, x), (nan, nan)) for m, x in zip(full["model"], full["method"])]
        table["paper single value"] = [100 * p[0] for p in paper]
        table["paper Otsu"] = [100 * p[1] for p in paper]
        table["paper difference"] = [100 * (p[1] - p[0]) for p in paper]
        table.loc[table["method"] == "Mean", ["paper single value", "paper Otsu", "paper difference"]] = [
            11.67, 11.49, -0.18]  # the paper's printed Mean row
    return table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.6f")
    if fmt == "md":
        shown = table.astype(object).where(pd.notna(table), None)  # blank cells, not "nan"
        return shown.to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"
    if fmt == "latex":
        return table.to_latex(index=False, float_format="%.4f", na_rep="--")
    raise CamlocError(f"--format {fmt!r} is not one of md, csv, latex")


def build_report(run_dirs: list[str | Path], layout: str = "long", compare_paper: bool = False) -> pd.DataFrame:
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise CamlocError(f"run folder {d} does not exist")
        _kind(d)
    if layout == "long":
        return long_table(dirs)
    if layout == "s3":
        return s3_table(long_table(dirs), compare_paper)
    if layout == "s1":
        return s1_table(dirs, compare_paper)
    raise CamlocError(f"--layout {layout!r} is not one of s1, s3, long")


__all__ = ["build_report", "render", "long_table", "s1_table", "s3_table"]
