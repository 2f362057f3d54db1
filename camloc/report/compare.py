"""`camloc compare`: the pairs where two runs (or two methods) differ most, like the appendix's
Figs. S5-S10 ("pairs where gScoreCAM beats GradCAM")."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from camloc.errors import RunFolderError
from camloc.run.files import read_run_records


def _records(run_dir: Path, method: str | None) -> tuple[dict, str]:
    records = read_run_records(run_dir)
    if not records:
        raise RunFolderError(f"{run_dir} holds no camloc eval records (pairs*.jsonl)")
    methods = sorted({r["method"] for r in records})
    if method is None:
        if len(methods) != 1:
            raise RunFolderError(f"{run_dir} has several methods ({', '.join(methods)}); choose one with --method-a/-b")
        method = methods[0]
    if method not in methods:
        raise RunFolderError(f"{run_dir} has no method {method!r}; it has {', '.join(methods)}")
    return {(str(r["image_id"]), int(r["category_id"])): r for r in records if r["method"] == method}, method


def compare_runs(run_a: str | Path, run_b: str | Path | None = None, method_a: str | None = None,
                 method_b: str | None = None, top: int = 10) -> pd.DataFrame:
    """Pairs present in both, sorted by IoU(a) - IoU(b), largest first; `top` rows."""
    a, name_a = _records(Path(run_a), method_a)
    b, name_b = _records(Path(run_b or run_a), method_b)
    for key, ra in a.items():  # one (image id, category) must be the same pair in both runs
        rb = b.get(key)
        if rb is not None and (rb.get("file_name"), rb.get("gt_boxes")) != (ra.get("file_name"), ra.get("gt_boxes")):
            raise RunFolderError(f"{run_a} and {run_b} disagree on image {key[0]} / category {key[1]} "
                                 f"({ra.get('file_name')} vs {rb.get('file_name')}, or other boxes): they were run on "
                                 "different data and cannot be compared pair by pair")
    if any(r["iou"] is None for r in (*a.values(), *b.values())):
        raise RunFolderError("compare ranks pairs by box IoU, and these runs' pairs have none (point labels only): "
                             "compare their p-mIoU in `camloc report`")
    rows = [{"image_id": ra["image_id"], "file_name": ra["file_name"], "category": ra["category"],
             f"iou_{name_a}": ra["iou"], f"iou_{name_b}" if name_b != name_a else "iou_b": b[key]["iou"],
             "difference": ra["iou"] - b[key]["iou"]}
            for key, ra in a.items() if key in b]
    if not rows:
        raise RunFolderError("the two runs share no (image, category) pairs")
    table = pd.DataFrame(rows).sort_values(["difference", "image_id"], ascending=[False, True], kind="stable")
    return table.head(top).reset_index(drop=True)
