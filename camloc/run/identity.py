"""A run's identity: the resolved config (`EvalConfig`) that config.json holds, where the data was read
from, and the check that a run folder holds one identity only (another config is refused, naming what
differs)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from camloc.cams.options import default_options
from camloc.datasets.registry import DATA_SOURCES
from camloc.errors import DataError, RunFolderError
from camloc.evaluators.protocols import DEFAULT_INTERVAL, DEFAULT_TOLERANCE
from camloc.run.files import NOT_IDENTITY, any_record_files, atomic_write_text

CONFIG = "config.json"
SUMMARY = "summary.json"


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
    """"cache:float32" or "cache:float16" when the maps are saved (`--save-heatmaps`, stored in that type:
    what `camloc rescore` reads); None when not. The records come from the live float32 maps either way.
    ("float16", of camloc before 2026-12, scored the stored float16 maps: such a run is not resumed.)"""
    ovseg: dict | None = None
    """`--protocols ovseg`: every inference setting (preset, short side, crop, stride, logit scale,
    thresholds, PAMR, templates), resolved for the dataset; None for the pair protocols."""
    plugins: dict | None = None
    """{method: its source} for the methods that come from plug-ins (`camloc.plugins`: module, file SHA-256,
    distribution); None when every method is camloc's own."""
    faith: dict | None = None
    """The faithfulness protocols' settings (`FaithSettings`: steps, baselines, score, ROAD percentiles and
    noise, Grad-ECLIP steps) when one of them is selected; None otherwise."""
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
            raise DataError(f"{run_dir / CONFIG} records the data's {what} {path}, which does not exist now (moved "
                            f"or deleted?); pass {DATA_SOURCES[key]} or --data-root to say where the data is")
    return {option: sources[key] for key, option in (("data_root", "data_root_dir"), ("ann_file", "ann_file"),
                                                      ("image_dir", "image_dir")) if sources.get(key)}


def resume_data_options(run_dir: Path, config: EvalConfig, data_options: dict | None, force_new: bool,
                        split: str | None = None) -> dict:
    """The data options of an eval: those given, or, when none is given and `run_dir` already holds a run
    of the same dataset and split (a resume), the ones that run recorded. `split`: the split the run reads
    when the config leaves it to the dataset's default (ovseg records the resolved one)."""
    given = {k: v for k, v in (data_options or {}).items() if v}
    path = run_dir / CONFIG
    if given or force_new or not path.is_file():
        return given
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return given  # check_config names the broken file
    if not isinstance(previous, dict) or (previous.get("dataset"), previous.get("split")) != (config.dataset,
                                                                                             split or config.split):
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
    if isinstance(old, dict) and isinstance(new, dict):  # name the entries that differ (options, faith, ...)
        inner = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{key}.{k}: {_describe(old.get(k))} there, {_describe(new.get(k))} now" for k in inner[:3])
    return f"{key}: {_describe(old)} there, {_describe(new)} now"


def recorded_plugins(run_dir: Path, force_new: bool = False) -> dict | None:
    """The plug-ins a run folder's config.json records (None without one, or with --force-new)."""
    path = Path(run_dir) / CONFIG
    if force_new or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # check_config names the broken file
    return data.get("plugins") if isinstance(data, dict) else None


def moved_data(old, new) -> bool:
    """Two data identities of the same files read from another folder: equal but for `image_root`
    (the pairs' or label files' SHA-256 and the counts agree)."""
    return (isinstance(old, dict) and isinstance(new, dict) and old.get("image_root") != new.get("image_root")
            and {k: v for k, v in old.items() if k != "image_root"} == {k: v for k, v in new.items()
                                                                          if k != "image_root"})


def check_config(run_dir: Path, config: EvalConfig, force_new: bool) -> None:
    """Refuse a folder written by another config (naming what differs); with `force_new` discard its
    results (records, summaries, tables, saved pictures) first. Then write this config."""
    import shutil

    config_path = run_dir / CONFIG
    if config_path.exists() and not force_new:
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{config_path} is not valid JSON ({exc}); use another --out, or --force-new to "
                                 "discard the folder's results") from None
        new = json.loads(json.dumps(config.identity()))
        old = {k: v for k, v in old.items() if k not in NOT_IDENTITY} if isinstance(old, dict) else old
        if isinstance(old, dict):  # a field added since the folder was written, unused now (null), is no difference
            new = {k: v for k, v in new.items() if k in old or v is not None}
            if moved_data(old.get("data"), new.get("data")):  # the same files read from another place
                if config.heatmaps:
                    raise RunFolderError(f"the data of run folder {run_dir} was read from {old['data']['image_root']} "
                                         f"and is now at {new['data']['image_root']}; its heatmap cache is keyed by the "
                                         "images' folder: move the data back, or use another --out")
                config.data = {**config.data, "image_root": old["data"]["image_root"]}  # the identity it began with
                new["data"] = old["data"]
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = "; ".join(describe_difference(k, old.get(k), new.get(k)) for k in diff[:3])
            raise RunFolderError(
                f"run folder {run_dir} was written by a different config (differs in: {', '.join(diff)}; {shown}); "
                "use another --out, or --force-new to discard its results"
            )
    elif not config_path.exists() and any_record_files(run_dir) and not force_new:
        raise RunFolderError(f"run folder {run_dir} holds records but no {CONFIG}, so they cannot be matched to this "
                             "config; use another --out, or --force-new to discard them")
    if force_new:
        for records in any_record_files(run_dir):
            records.unlink()
        for stale in [SUMMARY, "table.csv", "table.md", "ovseg_classes.csv", CONFIG,
                      *[p.name for p in run_dir.glob("summary.rank*.json")]]:
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "vis", ignore_errors=True)
        shutil.rmtree(run_dir / "predictions", ignore_errors=True)
    atomic_write_text(config_path, json.dumps(config.to_json(), indent=1) + "\n")
