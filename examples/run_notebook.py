"""Execute examples/quickstart.ipynb in a fresh kernel and save it with its outputs (the figure as an image), so the
committed notebook shows what it computes. The tests execute it again and check that the committed outputs are
current.

    python examples/run_notebook.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

NOTEBOOK = Path(__file__).with_name("quickstart.ipynb")


def execute(path: Path = NOTEBOOK, workdir: str | Path | None = None):
    """The notebook, executed in a fresh kernel in `workdir` (a temporary folder by default)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir or tmp)}}).execute()
    return notebook


def text_outputs(notebook) -> list[str]:
    """Each code cell's printed and returned text (what must not change unless the code does)."""
    out = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = [o.get("text", "") for o in cell.get("outputs", [])]
        parts += [o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])
                  if o.get("output_type") == "execute_result" and "image/png" not in o.get("data", {})]
        out.append("".join(parts))
    return out


if __name__ == "__main__":
    import nbformat

    nbformat.write(execute(), NOTEBOOK)
    print(f"wrote {NOTEBOOK} with its outputs")
