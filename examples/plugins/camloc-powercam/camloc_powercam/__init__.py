"""PowerCAM as an installable camloc plug-in: the `camloc.plugins` entry point of pyproject.toml names this
package, so once it is installed camloc finds the method with no --plugin.

    pip install examples/plugins/camloc-powercam
    camloc eval --method powercam,layercam --model tiny-vit --out runs/powercam

The method itself is the single file `powercam.py` beside this one, which also works on its own:
`camloc eval --plugin examples/plugins/camloc-powercam/camloc_powercam/powercam.py ...`.
"""
from camloc_powercam import powercam  # noqa: F401  (registers the method and its option)
