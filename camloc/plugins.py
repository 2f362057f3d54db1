"""Plug-ins: methods (and their options) from outside camloc, found three ways, with their source in every
run's identity.

- `--plugin FILE.py|package.module` (repeatable) on the commands that compute maps, and `plugins = [...]` in a
  TOML config's table; `camloc.load_plugin(...)` from Python;
- `CAMLOC_PLUGINS`: the same specs, separated by commas;
- the entry-point group `camloc.plugins` of installed packages (`[project.entry-points."camloc.plugins"]
  mine = "mypkg.methods"`; an entry point naming a callable is called after its module is imported).

A plug-in registers with the public author surface (`camloc.register_method`, `camloc.method_option`). Every
method registered from outside camloc's own modules carries its source (`MethodSpec.origin`): the module, its
file's SHA-256 (of the function's source where it has no file), and the distribution and version it was
installed from. A run records the sources of the methods it uses (`plugins` in config.json) and the heatmap
cache keys them, so an edited plug-in never resumes into, or mixes with, a run of the old code (refused in one
line, as another option is). A plug-in that does not import, registers a name that exists or declares an option
that exists is one line naming it (exit 2). Plug-ins are loaded only by what computes or lists methods, never by
`--help` or `--version`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from camloc.errors import OptionError
from camloc.run.files import file_sha256

ENV = "CAMLOC_PLUGINS"
GROUP = "camloc.plugins"
_LOADED: dict[str, tuple] = {}
"""spec (a file's resolved path, or a module name) -> (module name, the file's SHA-256, the methods, options and
datasets it registered)."""
_DEFAULTS_LOADED = False


def origin_of(fn) -> dict | None:
    """The source of a method function defined outside camloc (None for camloc's own): its module, the
    SHA-256 of its file's bytes (or of its own source), and the distribution it was installed from."""
    module = getattr(fn, "__module__", "") or ""
    if module == "camloc" or module.startswith("camloc."):
        return None
    origin: dict = {"module": module}
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    if path and os.path.isfile(path):
        origin["file"] = os.path.abspath(path)
        origin["sha256"] = file_sha256(path)
    else:
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = getattr(getattr(fn, "__code__", None), "co_code", b"") or b""
            source = source.hex() if isinstance(source, bytes) else str(source)
        origin["sha256"] = hashlib.sha256(source.encode()).hexdigest()
    top = module.split(".")[0]
    try:
        from importlib.metadata import packages_distributions, version

        dists = packages_distributions().get(top) or []
        if dists:
            origin["distribution"] = f"{dists[0]} {version(dists[0])}"
    except Exception:  # metadata is a courtesy; the file hash is the identity
        pass
    return origin


def load_plugin(spec: str) -> str:
    """Import one plug-in (a .py file or a module name); returns the module name it was imported as. A file
    already loaded is loaded again only if its bytes changed (a notebook's edit): the methods and options it
    registered are dropped first, so the new code replaces them."""
    from camloc.cams.options import OPTIONS
    from camloc.cams.registry import METHODS, _load_builtin_methods

    _load_builtin_methods()  # a plug-in that reuses a built-in name is refused, whatever the order
    spec = str(spec).strip()
    if not spec:
        raise OptionError("--plugin needs a file (.py) or a module name")
    is_file = spec.endswith(".py") or os.sep in spec or (os.altsep or os.sep) in spec
    path = Path(spec)
    if is_file and not path.is_file():
        raise OptionError(f"--plugin {spec}: no such file")
    key = str(path.resolve()) if is_file else spec
    digest = file_sha256(path) if is_file else None
    if key in _LOADED:
        name, old_digest, *registered = _LOADED[key]
        if old_digest == digest:
            return name
        _forget(*registered)  # edited since: its registrations are replaced
        sys.modules.pop(name, None)
    from camloc.datasets.registry import DATASETS, _load_builtin_datasets

    _load_builtin_datasets()
    before_methods, before_options, before_datasets = set(METHODS), set(OPTIONS), set(DATASETS)
    try:
        if is_file:
            name = "camloc_plugin_" + hashlib.sha256(key.encode()).hexdigest()[:12]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            name = importlib.import_module(spec).__name__
    except OptionError:
        raise
    except ValueError as exc:  # the registries' "registered twice" / "declared twice"
        _forget(set(METHODS) - before_methods, set(OPTIONS) - before_options, set(DATASETS) - before_datasets)
        raise OptionError(f"plugin {spec}: {exc}: pick another name") from None
    except Exception as exc:
        _forget(set(METHODS) - before_methods, set(OPTIONS) - before_options, set(DATASETS) - before_datasets)
        raise OptionError(f"plugin {spec} could not be imported ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _LOADED[key] = (name, digest, set(METHODS) - before_methods, set(OPTIONS) - before_options,
                    set(DATASETS) - before_datasets)  # all forgotten again on a reload
    return name


def _forget(methods: set, options: set, datasets: set = frozenset()) -> None:
    """Undo a failed plug-in's registrations, so nothing half-loaded stays."""
    from camloc.cams.options import OPTIONS
    from camloc.cams.registry import METHODS
    from camloc.datasets.registry import DATASETS

    for method in methods:
        METHODS.pop(method, None)
    for option in options:
        OPTIONS.pop(option, None)
    for dataset in datasets:
        DATASETS.pop(dataset, None)


def load_recorded(plugins: dict | None) -> None:
    """The plug-ins a run recorded (config.json's `plugins`), loaded where their methods are not registered
    yet: a resume, a shard or a rescore reads the run's own plug-ins without `--plugin`. Whether they are
    still the same code is the identity check's to say."""
    from camloc.cams.registry import METHODS
    from camloc.datasets.registry import DATASETS

    for method, origin in (plugins or {}).items():
        name = method.removeprefix("dataset:")
        if (name in DATASETS if method.startswith("dataset:") else method in METHODS) or not isinstance(origin, dict):
            continue
        where = origin.get("file") if origin.get("file") and os.path.isfile(origin["file"]) else None
        if where is None and origin.get("module") and not origin["module"].startswith("camloc_plugin_"):
            where = origin["module"]
        if where:
            load_plugin(where)


def load_default_plugins() -> None:
    """The plug-ins of `CAMLOC_PLUGINS` and of the `camloc.plugins` entry points, once per process."""
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    _DEFAULTS_LOADED = True
    for spec in [s.strip() for s in os.environ.get(ENV, "").split(",") if s.strip()]:
        load_plugin(spec)
    from importlib.metadata import entry_points

    for entry in entry_points(group=GROUP):
        try:
            module = entry.value.partition(":")[0].strip()
        except AttributeError:
            continue
        load_plugin(module)
        if ":" in entry.value:
            try:
                target = entry.load()
            except Exception as exc:
                raise OptionError(f"plugin entry point {entry.name} = {entry.value} could not be loaded "
                                  f"({type(exc).__name__}: {exc})") from None
            if callable(target):
                target()


def load_plugins(specs=None) -> None:
    """The given plug-ins (a list, a comma list or None) and the default ones."""
    if isinstance(specs, str):
        specs = specs.split(",")
    load_default_plugins()
    for spec in specs or []:
        if str(spec).strip():
            load_plugin(spec)


def run_plugins(methods: list[str], dataset: str | None = None) -> dict | None:
    """{method: its origin} of the run's methods that come from outside camloc, and {"dataset:NAME": its
    origin} for a plug-in's dataset (None when everything is camloc's own): part of the run's identity."""
    from camloc.cams.registry import METHODS
    from camloc.datasets.registry import DATASETS

    found = {m: METHODS[m].origin for m in methods if m in METHODS and METHODS[m].origin}
    spec = DATASETS.get(dataset) if dataset else None
    if spec is not None and spec.origin:
        found[f"dataset:{dataset}"] = spec.origin
    return found or None
