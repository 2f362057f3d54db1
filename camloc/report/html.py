"""`camloc report --html`: one self-contained HTML page (every image embedded as a data URI, no
network needed): provenance, tables (with the paper's values on request), per-class IoU bars, IoU
histograms per method, the mean deletion/insertion curves of the faithfulness protocols, Table S1
threshold curves, and the saved pair visualizations."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from camloc.errors import RunFolderError
from camloc.evaluators.meter import meters_by
from camloc.report.tables import _kind, build_report, long_table
from camloc.run.files import atomic_write_text, read_run_records

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}h2{border-bottom:2px solid #333}
.gallery img{margin:4px;border:1px solid #999}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _embed(path: Path, alt: str) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def _plots(records: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records))
    out = []
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        ax.hist([r["iou"] for r in records if r["method"] == method], bins=np.linspace(0, 1, 21), color="#4472c4")
        ax.set_title(f"{method}: IoU histogram", fontsize=9)
        ax.set_xlabel("IoU", fontsize=8)
    fig.tight_layout()
    out.append(_png(fig))
    classes = sorted({r["category"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) * len(methods)), 3))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means = [np.mean([r["iou"] for r in records if r["method"] == method and r["category"] == c] or [0])
                 for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, means, width, label=method)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean IoU")
    ax.set_title("per-class mean IoU", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(_png(fig))
    return "\n".join(out)


FAITH_PLOTS = (("deletion_rise", "deletion (RISE)", "fraction of pixels removed", 1.0, "score"),
               ("insertion_rise", "insertion (RISE)", "fraction of pixels inserted", 1.0, "score"),
               ("deletion_eclip", "deletion (Grad-ECLIP)", "fraction of pixels replaced", 0.5, "top-1 accuracy"))


def _faith_plots(records: list[dict], score: str | None) -> str:
    """The mean deletion/insertion curves per method (one panel per curve kind present), AUCs in the legend;
    empty when the run has no faithfulness protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {m: meter.compute() for m, meter in meters_by(records).items()}
    panels = [p for p in FAITH_PLOTS if any(p[0] in r.get("faith_curves", {}) for r in results.values())]
    if not panels:
        return ""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (name, title, xlabel, end, ylabel) in zip(axes[0], panels):
        for method, result in results.items():
            curve = result.get("faith_curves", {}).get(name)
            if curve:
                value = result.get(name)
                label = method if value is None else f"{method} (AUC {value:.3f})"
                ax.plot(np.linspace(0, end, len(curve)), curve, label=label)
        ax.set_title(f"mean {title} curve", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{score} of the prompt" if ylabel == "score" and score else ylabel, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return "<h3>faithfulness curves (mean over pairs)</h3>" + _png(fig)


def _run_section(run_dir: Path, compare_paper: bool, skip_bad: bool, allow_incomplete: bool) -> str:
    parts = [f"<h2>{html.escape(str(run_dir))}</h2>"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if _kind(run_dir) == "ovseg":
        parts.append(build_report([run_dir], "ovseg", allow_incomplete=allow_incomplete).to_html(
            index=False, float_format="%.4f", na_rep=""))
        if (run_dir / "table.csv").exists():
            import pandas as pd

            parts.append(pd.read_csv(run_dir / "table.csv").to_html(index=False, float_format="%.4f", na_rep=""))
    elif _kind(run_dir) == "threshold-search":
        parts.append(build_report([run_dir], "s1", compare_paper).to_html(index=False, float_format="%.4f",
                                                                            na_rep=""))
        if (run_dir / "curves.png").exists():
            parts.append(_embed(run_dir / "curves.png", "threshold curves"))
    else:
        records = read_run_records(run_dir, skip_bad)
        parts.append(long_table([run_dir], skip_bad, None, allow_incomplete).to_html(index=False, float_format="%.4f"))
        if records:
            parts.append(_plots(records))
            config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
            parts.append(_faith_plots(records, (config.get("faith") or {}).get("score")))
        vis = sorted((run_dir / "vis").rglob("*.jpg")) if (run_dir / "vis").is_dir() else []
        if vis:
            parts.append('<h3>saved pairs (best, worst, random)</h3><div class="gallery">')
            parts.extend(_embed(p, f"{p.parent.name}/{p.stem}") for p in vis)
            parts.append("</div>")
    provenance = {k: summary.get(k) for k in ("config", "device", "precision", "git_commit", "versions", "timings",
                                              "mean_coverage", "faults") if k in summary}
    if provenance:
        parts.append("<h3>config and provenance</h3><pre>" + html.escape(json.dumps(provenance, indent=1)) + "</pre>")
    return "\n".join(parts)


def write_html_report(run_dirs: list[str | Path], out: str | Path, compare_paper: bool = False,
                      skip_bad: bool = False, allow_incomplete: bool = False) -> Path:
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise RunFolderError(f"run folder {d} does not exist")
    body = ["<h1>camloc report</h1>"]
    eval_dirs = [d for d in dirs if _kind(d) == "eval"]
    ovseg_dirs = [d for d in dirs if _kind(d) == "ovseg"]
    if ovseg_dirs:
        body.append("<h2>open-vocabulary segmentation (mIoU)</h2>")
        body.append(build_report(ovseg_dirs, "ovseg", allow_incomplete=allow_incomplete).to_html(
            index=False, float_format="%.4f", na_rep=""))
    if eval_dirs:
        body.append("<h2>all runs (Table S3 layout, mean IoU)</h2>")
        body.append(build_report(eval_dirs, "s3", compare_paper, skip_bad, None, allow_incomplete).to_html(
            index=False, float_format="%.4f", na_rep=""))
    body.extend(_run_section(d, compare_paper, skip_bad, allow_incomplete) for d in dirs)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>camloc report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
