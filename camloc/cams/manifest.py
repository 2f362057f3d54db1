"""The built-in method options as data the command line reads without importing a method (`options.json`):
`camloc --help`, `camloc eval --help` and usage errors then never import torch. The live table
(`camloc.cams.options`, declared in each method's module) is the source; `python -m camloc.cams.manifest` writes
the file again after an option is added or changed, and a test checks that the two agree."""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST = Path(__file__).with_name("options.json")
KINDS = {"int": int, "float": float, "str": str, "bool": bool, "path": Path}


def live_table() -> list[dict]:
    """The option table of camloc's own methods (imports them all): name, kind, default, help, and the methods
    that read each (the help panel it is shown under)."""
    from camloc.cams.options import all_options
    from camloc.cams.registry import METHODS, list_methods

    users: dict[str, list[str]] = {}
    for method in list_methods():
        if METHODS[method].origin is None:
            for name in METHODS[method].params:
                users.setdefault(name, []).append(method)
    kind_names = {v: k for k, v in KINDS.items()}
    return [{"name": o.name, "kind": kind_names[o.kind], "default": o.default, "help": o.help,
             "methods": users.get(o.name, [])} for o in all_options().values() if o.module.startswith("camloc.")]


def read() -> list[dict]:
    return json.loads(MANIFEST.read_text())


def write() -> Path:
    MANIFEST.write_text(json.dumps(live_table(), indent=1) + "\n")
    return MANIFEST


if __name__ == "__main__":
    print(f"wrote {write()}")
