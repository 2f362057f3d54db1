"""`camloc report`: merge run folders (and shards) into tables with pandas.

Eval runs are merged from their per-pair records (`pairs.jsonl`), so shards from any number of
workers combine exactly; threshold-search runs from their `table_s1.csv`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from camloc.datasets.registry import dataset_label
from camloc.errors import OptionError, RunFolderError
from camloc.evaluators import meters_by
from camloc.evaluators.meter import record_key
from camloc.evaluators.protocols import PROTOCOL_COLUMNS
from camloc.run.files import NOT_IDENTITY, read_jsonl, read_run_records, record_files
from camloc.run.finish import without_unscored_box_columns
from camloc.run.ovseg import RECORDED, RECORDS
from camloc.run.threshold_search import DISPLAY, table_s1

METHOD_ORDER = ["gradcam", "gradcam++", "xgradcam", "groupcam", "layercam", "gscorecam", "scorecam",
                "gscorecam-abs", "hilacam", "rise"]  # the appendix's column order, then the later methods


def _paper_s1() -> dict:
    """Table S1 as printed: {(model, method): (single value, Otsu)}, from camloc/reproduce/published/gscorecam.toml."""
    from camloc.reproduce import published_values

    return {(model, method): (v["single"], v["otsu"])
            for model, methods in published_values("gscorecam", "s1").items() for method, v in methods.items()}


def _paper_s3() -> dict:
    """Table S3 as printed: {model: {method: mean IoU}}, from the same file."""
    from camloc.reproduce import published_values

    return published_values("gscorecam", "s3")


LONG_COLUMNS = ["model", "dataset", "method", "n_pairs", "mean_iou", "acc@0.3", "acc@0.5", "acc@0.7"]


def _kind(run_dir: Path) -> str:
    if (run_dir / "table_s1.csv").is_file():
        return "threshold-search"
    if (run_dir / "config.json").is_file() and record_files(run_dir, RECORDS):
        return "ovseg"
    if record_files(run_dir) and (run_dir / "config.json").is_file():
        return "eval"
    if record_files(run_dir):
        raise RunFolderError(f"{run_dir} holds records but no config.json, so what they measure is unknown; it cannot "
                             "be reported (rerun it with camloc eval --force-new)")
    raise RunFolderError(f"{run_dir} is not a camloc run folder (no pairs.jsonl + config.json, no table_s1.csv)")


IDENTITY_SHOWN = ["model", "dataset"]
"""Identity fields that are columns of every long table; any other field that differs between the
reported runs becomes a column too (`long_table`)."""


def _short(value, width: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 1] + "…"


def _shown(key: str, value, subkeys: list[str] | None = None) -> str:
    """A compact cell for an identity field that differs between the reported runs: a dict shows only its
    entries that differ (`subkeys`), each value cut short; the data identity as its folder's name and hash."""
    if key == "data" and isinstance(value, dict):
        return f"{Path(str(value.get('image_root'))).name} ({str(value.get('pairs_sha256') or value.get('images_sha256'))[:8]})"
    if isinstance(value, dict):
        keys = subkeys if subkeys is not None else sorted(value)
        return "; ".join(f"{k}={_short(value.get(k))}" for k in keys) or "-"
    return value if isinstance(value, (str, int, float)) or value is None else _short(value, 40)


def differing_subkeys(identities: list[dict], key: str) -> list[str] | None:
    """The entries of a dict-valued identity field that differ between the identities (None when the field is
    not a dict in all of them)."""
    values = [i.get(key) for i in identities]
    if not all(isinstance(v, dict) for v in values):
        return None
    names = sorted({k for v in values for k in v})
    return [k for k in names if len({json.dumps(v.get(k), sort_keys=True) for v in values}) > 1]


def _identity(run_dir: Path) -> dict:
    """A run's identity without its method list (methods are the table's rows)."""
    config = json.loads((run_dir / "config.json").read_text())
    return {k: v for k, v in config.items() if k != "methods" and k not in NOT_IDENTITY}


def _check_complete(group: dict, allow_incomplete: bool) -> None:
    """Every (pair, method) of a run identity is present once its folders (shards) are merged."""
    expected = (group["identity"].get("data") or {}).get("n_pairs")
    if expected is None or allow_incomplete:
        return
    total = expected * len(group["methods"])
    missing = total - len(group["records"])
    if missing > 0:
        folders = ", ".join(sorted({str(d) for d in group["dirs"]}))
        raise RunFolderError(f"{folders}: {missing} of {total} (pair, method) records are missing (shards still running "
                             "or not started?); finish the run with the same command, or pass --allow-incomplete to "
                             "report what is there")


def _scored(record: dict) -> tuple:
    """What two records of one (pair, method) and one identity must agree on: the box IoU, and the point counts of
    a box-less pair."""
    return record["iou"], record.get("points_counts")


def eval_groups(run_dirs: list[Path], skip_bad: bool = False, skipped: list | None = None,
                allow_incomplete: bool = False) -> list[dict]:
    """The eval runs given, merged by identity: one group per identity (shards and resumed copies of one
    run merge), each `{"identity", "records": {(model, image, category, method): record}, "methods",
    "dirs"}`, each (pair, method) once. A pair scored differently by two runs of one identity is an
    error; so is a group missing records (unless `allow_incomplete`)."""
    groups: dict[str, dict] = {}
    for run_dir in run_dirs:
        kind = _kind(run_dir)
        if kind != "eval":
            raise RunFolderError(f"{run_dir} is a threshold-search folder: report it with --layout s1 (the long and s3 "
                                 "layouts read eval runs)")
        identity = _identity(run_dir)
        records = read_run_records(run_dir, skip_bad, skipped)
        group = groups.setdefault(json.dumps(identity, sort_keys=True), {"identity": identity, "records": {},
                                                                           "where": {}, "methods": set(), "dirs": []})
        group["methods"] |= set(json.loads((run_dir / "config.json").read_text()).get("methods")
                                or {r["method"] for r in records})
        group["dirs"].append(run_dir)
        for r in records:
            key = (r.get("model"), *record_key(r))
            if key in group["records"] and _scored(group["records"][key]) != _scored(r):
                raise RunFolderError(f"{group['where'][key]} and {run_dir} both hold image {key[1]} / category {key[2]} / "
                                     f"{key[3]} with the same config but different IoUs or point counts "
                                     f"({_scored(group['records'][key])} vs {_scored(r)}); report them separately")
            group["records"].setdefault(key, r)
            group["where"].setdefault(key, run_dir)
    for group in groups.values():
        _check_complete(group, allow_incomplete)
    return list(groups.values())


def differing_fields(identities: list[dict], shown: list[str] = IDENTITY_SHOWN) -> dict[str, list[str] | None]:
    """The identity fields (other than `shown`) whose values differ between the identities, each with the
    entries that differ where it is a dict (`differing_subkeys`): what tells the runs apart."""
    fields = sorted({k for i in identities for k in i})
    differing = [k for k in fields if k not in shown
                 and len({json.dumps(i.get(k), sort_keys=True) for i in identities}) > 1]
    return {k: differing_subkeys(identities, k) for k in differing}


def long_table(run_dirs: list[Path], skip_bad: bool = False, skipped: list | None = None,
               allow_incomplete: bool = False) -> pd.DataFrame:
    """One row per (run identity, method) over every eval run given; each (pair, method) once. Runs
    with the same identity (shards, resumed copies) merge; runs that differ in any identity field
    (threshold, IoU convention, prompt template, precision, data, ...) never share a row: the fields
    that differ are shown as columns. A pair scored differently by two runs of one identity is an error."""
    return long_table_of(eval_groups(run_dirs, skip_bad, skipped, allow_incomplete))


def long_table_of(groups: list[dict]) -> pd.DataFrame:
    """`long_table` of runs already merged by identity (`eval_groups`)."""
    subkeys = differing_fields([g["identity"] for g in groups])
    differing = list(subkeys)
    rows = []
    for group in groups:
        identity = group["identity"]
        meters = meters_by(group["records"].values(), group=lambda r: (r["model"], r["method"]))
        for (model, method), meter in meters.items():
            rows.append({"model": model, "dataset": dataset_label(identity.get("dataset"), identity.get("data")),
                         "method": method,
                         **{k: _shown(k, identity.get(k), subkeys.get(k)) for k in differing}, **meter.compute()})
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (str(r["model"]), str(r["dataset"]), *(str(r[k]) for k in differing),
                             order.get(r["method"], 99), r["method"]))
    columns = (LONG_COLUMNS[:3] + differing + LONG_COLUMNS[3:]
               + [c for c in PROTOCOL_COLUMNS if any(c in r for r in rows)])  # one group per protocol present
    return pd.DataFrame(rows, columns=columns)


def _model_order(name: str) -> tuple:
    from camloc.models.specs import OFFICIAL_SPECS

    names = list(OFFICIAL_SPECS)
    return (names.index(name), "") if name in names else (len(names), name)


def s3_table(long: pd.DataFrame, compare_paper: bool = False, display: bool = True) -> pd.DataFrame:
    """Table S3's layout: rows = models, columns = methods (appendix names and order), average IoU.
    Runs that differ in more than the model (dataset, threshold, ...) get one row each, with those
    fields as columns; two configs never share a cell. With `compare_paper` every model row is
    followed by its "(paper)" and "(difference)" rows. `display=False` keeps the registry names as column
    headers (the HTML report names methods one way everywhere)."""
    if long.empty:
        raise RunFolderError("no eval runs to report (give camloc eval run folders)")
    long = long[long["mean_iou"].notna()]  # runs on point labels (box-less pairs) have no box IoU
    if long.empty:
        raise RunFolderError("these runs have no box IoU (their pairs have point labels and no boxes): report them "
                             "with --layout long")
    extra = [c for c in long.columns if c not in LONG_COLUMNS and c not in PROTOCOL_COLUMNS]
    index = ["model"] + (["dataset"] if long["dataset"].nunique() > 1 else []) + extra
    keyed = long.set_index(index + ["method"])["mean_iou"]
    if keyed.index.has_duplicates:  # cannot happen by construction (long_table groups by identity): refuse anyway
        raise RunFolderError("two different configs would share a cell of the s3 table; report them separately")
    table = keyed.unstack("method")
    methods = [m for m in METHOD_ORDER if m in table.columns] + sorted(m for m in table.columns if m not in METHOD_ORDER)
    rows = []
    for key in sorted(table.index, key=lambda k: (_model_order(k[0] if isinstance(k, tuple) else k), str(k))):
        labels = dict(zip(index, key if isinstance(key, tuple) else (key,)))
        ours = {m: table.loc[key, m] for m in methods}
        rows.append({**labels, **ours})
        if compare_paper:
            model = labels["model"]
            paper = {m: _paper_s3().get(model, {}).get(m, float("nan")) for m in methods}
            rows.append({**labels, "model": f"{model} (paper)", **paper})
            rows.append({**labels, "model": f"{model} (difference)", **{m: ours[m] - paper[m] for m in methods}})
    return pd.DataFrame(rows).rename(columns={m: DISPLAY.get(m, m) for m in methods} if display else {})


def s1_table(run_dirs: list[Path], compare_paper: bool = False) -> pd.DataFrame:
    """Table S1's layout: rows = methods (the model in the label where it is not RN50x16) and a Mean
    row; columns single value, Otsu, difference (Otsu - single), in percent as the appendix prints
    them; with `compare_paper` the paper's three columns beside them."""
    parts, configs = [], {}
    for d in run_dirs:
        part = pd.read_csv(d / "table_s1.csv")
        part = part[part["label"] != "Mean"].assign(source=str(d))
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        config = json.dumps({k: v for k, v in config.items() if k not in ("runs", "data_sources")}, sort_keys=True)
        for model, method in zip(part["model"], part["method"]):
            seen = configs.setdefault((model, method), (config, d))
            if seen[0] != config:
                raise RunFolderError(f"{seen[1]} and {d} both have a {method} row for {model} but from different configs "
                                     "(datasets, grid, options or data); report them separately")
        parts.append(part)
    if not parts:
        raise RunFolderError("no threshold-search runs to report (give camloc threshold-search output folders)")
    rows = pd.concat(parts, ignore_index=True).drop_duplicates(subset=["model", "method"], keep="first")
    full = table_s1(rows.to_dict("records"))
    table = pd.DataFrame({"method": full["label"], "single value": 100 * full["single"], "Otsu": 100 * full["otsu"],
                          "difference": 100 * full["difference"]})
    if compare_paper:
        nan = float("nan")
        printed = _paper_s1()
        paper = [printed.get((m, x), (nan, nan)) for m, x in zip(full["model"], full["method"])]
        table["paper single value"] = [100 * p[0] for p in paper]
        table["paper Otsu"] = [100 * p[1] for p in paper]
        table["paper difference"] = [100 * (p[1] - p[0]) for p in paper]
        from camloc.reproduce import published_table

        mean = published_table("gscorecam", "s1")["printed_mean"]  # the paper's printed Mean row
        table.loc[table["method"] == "Mean", ["paper single value", "paper Otsu", "paper difference"]] = [
            100 * mean["single"], 100 * mean["otsu"], round(100 * (mean["otsu"] - mean["single"]), 2)]
    return table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.6f")
    if fmt == "md":
        shown = table.astype(object).where(pd.notna(table), None)  # blank cells, not "nan"
        return shown.to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"
    if fmt == "latex":
        return table.to_latex(index=False, float_format="%.4f", na_rep="--")
    raise OptionError(f"--format {fmt!r} is not one of md, csv, latex")


def build_report(run_dirs: list[str | Path], layout: str = "long", compare_paper: bool = False,
                 skip_bad: bool = False, skipped: list | None = None, allow_incomplete: bool = False) -> pd.DataFrame:
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise RunFolderError(f"run folder {d} does not exist")
        _kind(d)
    kinds = {d: _kind(d) for d in dirs}
    if layout == "ovseg" or (layout == "long" and dirs and all(k == "ovseg" for k in kinds.values())):
        others = [d for d, k in kinds.items() if k != "ovseg"]
        if others:
            raise RunFolderError(f"{others[0]} is not an ovseg run: --layout ovseg reads runs of --protocols ovseg")
        return ovseg_table(dirs, allow_incomplete)
    ovseg = [d for d, k in kinds.items() if k == "ovseg"]
    if ovseg:
        raise RunFolderError(f"{ovseg[0]} is an ovseg run (per-pixel segmentation): report ovseg runs on their own "
                             "(--layout ovseg), apart from the pair protocols' runs")
    if layout == "long":
        return without_unscored_box_columns(long_table(dirs, skip_bad, skipped, allow_incomplete))
    if layout == "s3":
        return s3_table(long_table(dirs, skip_bad, skipped, allow_incomplete), compare_paper)
    if layout == "s1":
        evals = [d for d in dirs if _kind(d) == "eval"]
        if evals:
            raise RunFolderError(f"{evals[0]} is an eval run: --layout s1 reads threshold-search folders (use long or s3 "
                                 "for eval runs)")
        return s1_table(dirs, compare_paper)
    raise OptionError(f"--layout {layout!r} is not one of s1, s3, long, ovseg")


def ovseg_groups(dirs: list[Path]) -> list[dict]:
    """The ovseg runs given, merged by identity: `{"identity", "records": {(image, method): record},
    "methods"}`, each (image, method) once; an image counted differently by two runs of one identity is an
    error."""
    from camloc.run.ovseg import REQUIRED

    groups: dict = {}
    for d in dirs:
        config = json.loads((d / "config.json").read_text())
        identity = {k: v for k, v in config.items() if k not in ("methods", "data_sources")}
        group = groups.setdefault(json.dumps(identity, sort_keys=True), {"identity": identity, "records": {},
                                                                         "methods": [], "dirs": []})
        group["methods"] += [m for m in config["methods"] if m not in group["methods"]]
        group["dirs"].append(d)
        for path in record_files(d, RECORDS):
            for r in read_jsonl(path, required=REQUIRED):
                key = (str(r["image_id"]), r["method"])
                if key in group["records"] and group["records"][key]["state"] != r["state"]:
                    raise RunFolderError(f"image {key[0]} / {key[1]} is recorded with other counts in two runs of one "
                                         f"identity ({d}); they cannot be merged")
                group["records"][key] = r
    return list(groups.values())


def ovseg_table(dirs: list[Path], allow_incomplete: bool = False) -> pd.DataFrame:
    """The open-vocabulary segmentation table: rows (model, method), columns datasets, values mIoU
    (fractions), and `mean` over the datasets when a row has them all. Runs of one identity (shards in
    one folder, resumed copies) merge by their records, each (image, method) once; settings that differ
    between runs other than the dataset (e.g. the preset) become row labels."""
    return ovseg_table_of(ovseg_groups(dirs), allow_incomplete)


def ovseg_method_states(group: dict) -> dict:
    """{method: (its merged `SegmentationState`, the number of images its records cover)} of one ovseg run group
    (`ovseg_groups`), in the group's method order."""
    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.evaluators.segmentation import SegmentationState

    identity = group["identity"]
    n_classes = (identity.get("ovseg") or {}).get("n_classes") or len(SEG_DATASETS[identity["dataset"]].classes())
    out = {method: (SegmentationState.empty(n_classes), 0) for method in group["methods"]}
    for (_, method), record in group["records"].items():
        if method in out:
            state, count = out[method]
            state += SegmentationState.from_record(record["state"])
            out[method] = (state, count + 1)
    return out


def as_requested(identity: dict) -> dict:
    """An ovseg run's identity as a table row tells runs apart: its ovseg settings less those its preset gives its
    dataset (SCLIP's logit scale 65 on VOC21 is the preset, not a difference from its ADE20K run), less what the
    dataset or model decides (the number of classes, the pixel constants), and its split where it is the dataset's
    default. One preset's runs on several datasets then share a row; a setting given on the command line still
    shows."""
    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.errors import CamlocError
    from camloc.segment.infer import resolve_settings

    out = dict(identity)
    ovseg = dict(identity.get("ovseg") or {})
    try:
        given = resolve_settings(identity.get("dataset"), ovseg.get("preset", "sclip")).to_json()
    except CamlocError:
        given = {}
    recorded = [k for k in RECORDED if k != "classes_sha256" or "classes" in given]
    out["ovseg"] = {k: v for k, v in ovseg.items() if k not in recorded  # a preset's own class file: its hash too
                    and (k == "preset" or k not in given or json.dumps(v) != json.dumps(given[k]))}
    spec = SEG_DATASETS.get(identity.get("dataset"))
    if spec is not None and identity.get("split") == spec.default_split:
        out.pop("split", None)
    return out


def ovseg_table_of(groups: list[dict], allow_incomplete: bool = False) -> pd.DataFrame:
    """`ovseg_table` of runs already merged by identity (`ovseg_groups`); a run missing images is refused
    unless `allow_incomplete`, and two runs that would share a cell (they differ only in their data or weights) are
    refused."""
    from camloc.datasets.segmentation import SEG_DATASETS

    requested = [as_requested(g["identity"]) for g in groups]
    subkeys = differing_fields(requested, ["model", "dataset", "data", "weights"])
    differing = list(subkeys)
    rows = []
    for group, shown in zip(groups, requested):
        identity = group["identity"]
        n_images = (identity.get("data") or {}).get("n_images")
        for method, (state, count) in ovseg_method_states(group).items():
            if n_images is not None and count != n_images and not allow_incomplete:
                raise RunFolderError(f"{identity['model']} {method} on {identity['dataset']}: {count} of {n_images} "
                                     "images segmented (a shard still running?); pass --allow-incomplete to report it")
            rows.append({"model": identity["model"], "method": method,
                         **{k: _shown(k, shown.get(k), subkeys[k]) for k in differing},
                         "dataset": dataset_label(identity["dataset"], identity.get("data")),
                         "miou": state.result()["miou"]})
    long = pd.DataFrame(rows)
    index = ["model", "method", *differing]
    clash = long[long.duplicated(index + ["dataset"], keep=False)]
    if not clash.empty:
        first = clash.iloc[0]
        raise RunFolderError(f"two runs of {first['model']} {first['method']} on {first['dataset']} differ only in "
                             "their data (another copy or subset of the dataset) or weights: report them separately")
    table = long.pivot_table(index=index, columns="dataset", values="miou", aggfunc="first", dropna=False)
    table = table.reindex(pd.MultiIndex.from_frame(long[index].drop_duplicates()))  # rows in the runs' method order
    order = [d for d in SEG_DATASETS if d in table.columns] + sorted(c for c in table.columns if c not in SEG_DATASETS)
    table = table[order]
    if len(order) > 1:
        table["mean"] = table[order].mean(axis=1, skipna=False)
    table = table.reset_index()
    table.columns.name = None
    return table


__all__ = ["build_report", "differing_fields", "eval_groups", "long_table", "long_table_of", "ovseg_groups",
           "ovseg_method_states", "ovseg_table", "ovseg_table_of", "render", "s1_table", "s3_table"]
