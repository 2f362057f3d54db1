"""Experiment configs as TOML files (`configs/*.toml`): `[eval]` sweeps and `[threshold_search]`.

Unknown keys are refused with the file and key named. CLI options given explicitly override the file.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from camloc.errors import OptionError

DATASET_KEYS = {"dataset", "split", "limit", "classes", "prompt_template", "per_class", "subset_seed", "data_root",
                "ann_file", "image_dir", "include_stuff", "ade_extent"}
EVAL_KEYS = DATASET_KEYS | {"models", "methods", "out", "threshold", "iou", "precision", "seed", "device",
                            "chunk_size", "image_batch", "compile", "save_heatmaps", "heatmap_dtype", "options", "max_pixels", "protocols",
                            "pointing_tolerance", "cam_curve_interval", "faith_steps", "faith_baseline", "faith_score",
                            "road_percentiles", "faith_batch", "plugins"}
SEARCH_KEYS = {"runs", "train", "val", "grid", "out", "options", "iou", "precision", "seed", "device", "chunk_size",
               "compile", "workers", "plugins"}
RUN_KEYS = {"model", "methods"}
GRID_KEYS = {"start", "stop", "step"}


def _check(table: dict, allowed: set, where: str, path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise OptionError(f"config {path}: unknown key(s) {', '.join(unknown)} in {where}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def load_config(path: str | Path, section: str) -> dict:
    """The `[section]` table of a TOML config, with its keys checked."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"config file {path} is not valid TOML ({exc})") from exc
    _check(data, {"eval", "threshold_search", "description"}, "the top level", path)
    if section not in data:
        raise OptionError(f"config file {path} has no [{section}] table")
    table = data[section]
    if section == "eval":
        _check(table, EVAL_KEYS, "[eval]", path)
    else:
        _check(table, SEARCH_KEYS, "[threshold_search]", path)
        for i, run in enumerate(table.get("runs", [])):
            _check(run, RUN_KEYS, f"[[threshold_search.runs]] #{i + 1}", path)
        for part in ("train", "val"):
            _check(table.get(part, {}), DATASET_KEYS, f"[threshold_search.{part}]", path)
        _check(table.get("grid", {}), GRID_KEYS, "[threshold_search.grid]", path)
    plugins = table.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise OptionError(f"config {path}: [{section}] plugins must be a list of files or module names")
    from camloc.plugins import load_plugins

    load_plugins([str(path.parent / p) if p.endswith(".py") and not Path(p).is_absolute() else p
                  for p in plugins])  # a file is found beside the config
    from camloc.cams.options import all_options  # the methods' own option table, a plug-in's included

    _check(table.get("options", {}), set(all_options()), f"[{section}.options]", path)
    return table


def explicit_options(ctx) -> set[str]:
    """Names of the CLI parameters the user gave on the command line (not defaults)."""
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}


class Settings:
    """Command-line values over a config table: an option given on the command line wins, then the
    file's key, then the option's default."""

    def __init__(self, ctx, file: dict):
        self.values = dict(ctx.params)
        self.given = explicit_options(ctx)
        self.file = file

    def __call__(self, param: str, key: str | None = None):
        key = key or param
        return self.values[param] if param in self.given or key not in self.file else self.file[key]

    def method_options(self) -> dict:
        """The method options (`camloc.cams.options`) from the command line or the file's `options` table,
        checked, with the defaults for the rest."""
        from camloc.cams.options import all_options, parse_method_options

        table = self.file.get("options", {})
        return parse_method_options({k: self.values[k] if k in self.given or k not in table else table[k]
                                     for k in all_options() if k in self.values or k in table})
