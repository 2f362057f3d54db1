"""`camloc report --html`: one self-contained HTML page (every image embedded as a data URI, no network
needed). First screen: the leaderboard (methods as rows, each run's metrics as columns with a bootstrap
95 % interval over images, the best per column marked, maps per second beside them, sortable in the
page); then the runs (what differs between them, compactly), the Table S3 / ovseg / Table S1 tables,
and plots that scale to many methods: IoU histograms as small multiples, per-class IoU as a heat table,
the mean faithfulness curves, one colour per method throughout; the saved pairs; each run's full
configuration folded away."""
from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from camloc.errors import RunFolderError
from camloc.evaluators.meter import meters_by
from camloc.report.leaderboard import board
from camloc.report.tables import (_kind, _shown, build_report, differing_fields, eval_groups, long_table_of,
                                  ovseg_groups, ovseg_table_of, s3_table)
from camloc.run.files import atomic_write_text

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1340px}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#eee}td.m,th.m{text-align:left;white-space:nowrap}h2{border-bottom:2px solid #333;margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%}.gallery img{margin:4px;border:1px solid #999}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}small,.note{color:#555}.note{font-size:13px}
table.board td{line-height:1.15;white-space:nowrap}table.board td small{font-size:11px}table.board th[data-col]{cursor:pointer}
table.board th.group{text-align:center;background:#dde4f0}td.best{background:#fff3c4}td.rate{color:#666}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:5px}
table.heat td{min-width:34px;font-size:11px}table.heat th.c{writing-mode:vertical-rl;transform:rotate(180deg);
text-align:left;font-weight:normal;font-size:11px;max-height:110px}"""

SORT_SCRIPT = """document.querySelectorAll('table.board th[data-col]').forEach(function(th){
th.addEventListener('click',function(){var body=th.closest('table').tBodies[0],col=+th.dataset.col;
var desc=th.dataset.dir!=='desc';th.dataset.dir=desc?'desc':'asc';
function key(tr){var v=tr.children[col].dataset.v;return v===undefined||v===''?null:(isNaN(+v)?v:+v);}
Array.from(body.rows).sort(function(a,b){var x=key(a),y=key(b);if(x===null)return 1;if(y===null)return -1;
return (x<y?-1:x>y?1:0)*(desc?-1:1);}).forEach(function(r){body.appendChild(r);});});});"""


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every plot of the page (matplotlib's tab20 then tab20b: 40)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = [to_hex(colormaps["tab20"](i)) for i in range(20)] + [to_hex(colormaps["tab20b"](i)) for i in range(20)]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def method_tip(method: str) -> str:
    """A method's display name and one-line description (the tooltip of its registry name)."""
    from camloc.cams.registry import METHODS
    from camloc.run.threshold_search import DISPLAY

    spec = METHODS.get(method)
    parts = [DISPLAY.get(method, ""), spec.description if spec else ""]
    return " — ".join(p for p in parts if p)


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


def _method_cell(method: str, colors: dict) -> str:
    color = colors.get(method, "#999")
    return (f'<td class="m" data-v="{html.escape(method)}" title="{html.escape(method_tip(method))}">'
            f'<span class="dot" style="background:{color}"></span>{html.escape(method)}</td>')


def _f3(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


COLUMNS_PER_TABLE = 11
"""Metric and rate columns of one leaderboard table (about 1,300 px): run groups that do not fit beside each
other get a table each, stacked, with the methods in the same order."""


def leaderboard_html(result: dict, colors: dict) -> str:
    """The leaderboard tables of `board`'s result."""
    groups = list(dict.fromkeys([c["group"] for c in result["columns"]] + [r["group"] for r in result["rates"]]))
    tables, current = [], []
    for group in groups:
        width = sum(c["group"] == group for c in result["columns"]) + 1
        if current and sum(w for _, w in current) + width > COLUMNS_PER_TABLE:
            tables.append(current)
            current = []
        current.append((group, width))
    if current:
        tables.append(current)
    return "".join(_board_table(result, [g for g, _ in table], colors) for table in tables)


def _board_table(result: dict, groups: list[str], colors: dict) -> str:
    units = {r["group"]: r["unit"] for r in result["rates"]}
    head1 = ['<th class="m" rowspan="2" data-col="0">method</th>']
    head2, order, col = [], [], 1
    for group in groups:
        columns = [c for c in result["columns"] if c["group"] == group]
        head1.append(f'<th class="group" colspan="{len(columns) + 1}">{html.escape(group)}</th>')
        for c in columns:
            arrow = "↑" if c["higher"] else "↓"
            head2.append(f'<th data-col="{col}" title="{html.escape(c["tip"])} (click to sort)">'
                         f'{html.escape(c["label"].replace(" ↓", ""))} {arrow}</th>')
            order.append(("metric", group, c["metric"]))
            col += 1
        head2.append(f'<th data-col="{col}" title="pairs (or images) per second of model time: the maps\' own '
                     f'time on the device, not loading or scoring">{units[group]}</th>')
        order.append(("rate", group, None))
        col += 1
    rows = []
    for method, row in result["rows"].items():
        if not any(row["cells"].get((g, c["metric"])) for g in groups for c in result["columns"] if c["group"] == g):
            continue
        cells = [_method_cell(method, colors)]
        for kind, group, metric in order:
            if kind == "rate":
                value = row["rates"].get(group)
                shown = "" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
                cells.append(f'<td class="rate" data-v="{"" if value is None else f"{value:.6g}"}">{shown}</td>')
                continue
            cell = row["cells"].get((group, metric))
            if not cell or cell["value"] is None:
                cells.append('<td data-v=""></td>')
                continue
            interval = cell["interval"]
            low_high = f"<br><small>[{_f3(interval[0])}, {_f3(interval[1])}]</small>" if interval else ""
            star = "★ " if cell.get("best") else ""
            value = f"<b>{star}{_f3(cell['value'])}</b>" if star else _f3(cell["value"])
            cells.append(f'<td{" class=best" if star else ""} data-v="{cell["value"]:.9g}" '
                         f'title="{cell["n_images"]} images">{value}{low_high}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="board"><thead><tr>{"".join(head1)}</tr><tr>{"".join(head2)}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


def _group_labels(groups: list[dict], kind: str) -> dict[int, str]:
    """A short name per run group: model · dataset, then the identity fields that tell it from the others."""
    from camloc.datasets.registry import dataset_label

    if kind == "ovseg":  # what each run's preset gives its dataset is the preset, not a difference (`as_requested`)
        from camloc.report.tables import as_requested

        identities = [as_requested(g["identity"]) for g in groups]
    else:
        identities = [g["identity"] for g in groups]
    fields = differing_fields(identities, ["model", "dataset", "data"] if kind == "ovseg" else ["model", "dataset"])
    labels = {}
    for i, identity in enumerate(identities):
        parts = [str(identity.get("model")), dataset_label(identity.get("dataset"), identity.get("data"))]
        parts += [f"{k}: {_shown(k, identity.get(k), sub)}" for k, sub in fields.items()]
        labels[i] = (" · ".join(parts) + (" (ovseg)" if kind == "ovseg" else ""))
    return labels


def _runs_table(dirs: list[Path], labels: dict[Path, str]) -> str:
    """One row per run folder: the leaderboard column group it feeds, what it is and where it came from."""
    rows = []
    for d in dirs:
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        complete = summary.get("complete")
        cells = [str(d), labels.get(d, ""), _kind(d), str(summary.get("n_images", "")),
                 "" if complete is None else ("yes" if complete else "no"), str(summary.get("finished_at", "")),
                 str(summary.get("device", "")), str(summary.get("git_commit") or "")[:10]]
        rows.append("<tr>" + "".join(f'<td class="m">{html.escape(c)}</td>' for c in cells) + "</tr>")
    head = "".join(f'<th class="m">{h}</th>' for h in ("folder", "column group", "kind", "images", "complete",
                                                       "finished", "device", "commit"))
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _histograms(records: list[dict], methods: list[str], colors: dict, title: str) -> str:
    """IoU histograms, one small panel per method, at most 6 a row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    per_row = 6
    rows = -(-len(methods) // per_row)
    fig = Figure(figsize=(2.2 * min(per_row, len(methods)), 1.7 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, min(per_row, len(methods)), sharex=True, squeeze=False)).ravel()
    bins = np.linspace(0, 1, 21)
    for ax, method in zip(axes, methods):
        ax.hist([r["iou"] for r in records if r["method"] == method and r["iou"] is not None], bins=bins,
                color=colors[method])  # box-less pairs (point labels) have no IoU
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: box IoU histograms", fontsize=10)
    return _png(fig)


def _heat(value: float | None) -> str:
    if value is None or np.isnan(value):
        return ""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return f"background:{to_hex(colormaps['YlGnBu'](0.05 + 0.75 * float(np.clip(value, 0, 1))))};" + (
        "color:#fff;" if value > 0.6 else "")


def _per_class(records: list[dict], methods: list[str], colors: dict) -> str:
    """Per-class mean box IoU as a heat table (rows methods, columns classes)."""
    meters = meters_by(records)
    classes = sorted({r["category"] for r in records})
    head = '<th class="m">method</th>' + "".join(f'<th class="c">{html.escape(c)}</th>' for c in classes)
    rows = []
    for method in methods:
        per_class = meters[method].compute_per_class() if method in meters else {}
        cells = []
        for c in classes:
            value = per_class.get(c, {}).get("mean_iou")
            text = "" if value is None or np.isnan(value) else f"{value:.2f}"
            cells.append(f'<td style="{_heat(value)}" title="{html.escape(c)}">{text}</td>')
        rows.append(f"<tr>{_method_cell(method, colors)}{''.join(cells)}</tr>")
    return f'<div class="scroll"><table class="heat"><tr>{head}</tr>{"".join(rows)}</table></div>'


FAITH_PLOTS = (("deletion_rise", "deletion (RISE)", "fraction of pixels removed", 1.0, "score"),
               ("insertion_rise", "insertion (RISE)", "fraction of pixels inserted", 1.0, "score"),
               ("deletion_eclip", "deletion (Grad-ECLIP)", "fraction of pixels replaced", 0.5, "top-1 accuracy"))


def _faith_plots(records: list[dict], score: str | None, colors: dict | None = None) -> str:
    """The mean deletion/insertion curves per method (one panel per curve kind present), AUCs in the legend
    below the panels; empty when the run has no faithfulness protocol."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = {m: meter.compute() for m, meter in meters_by(records).items()}
    colors = colors or method_colors(list(results))
    panels = [p for p in FAITH_PLOTS if any(p[0] in r.get("faith_curves", {}) for r in results.values())]
    if not panels:
        return ""
    fig = Figure(figsize=(4 * len(panels), 3.2 + 0.22 * -(-len(results) // 3)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, title, xlabel, end, ylabel) in zip(axes, panels):
        for method, result in results.items():
            curve = result.get("faith_curves", {}).get(name)
            if curve:
                value = result.get(name)
                label = method if value is None else f"{method} (AUC {value:.3f})"
                ax.plot(np.linspace(0, end, len(curve)), curve, label=label, color=colors.get(method))
        ax.set_title(f"mean {title} curve", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{score} of the prompt" if ylabel == "score" and score else ylabel, fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1 + (len(results) > 4),
                  frameon=False)
    return "<h3>faithfulness curves (mean over pairs)</h3>" + _png(fig)


def _details(run_dir: Path) -> str:
    """A run's full configuration and provenance, folded away."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    provenance = {k: summary.get(k) for k in ("config", "device", "precision", "git_commit", "versions", "timings",
                                              "mean_coverage", "faults", "finished_at") if k in summary}
    if not provenance and (run_dir / "config.json").exists():
        provenance = {"config": json.loads((run_dir / "config.json").read_text())}
    return (f"<details><summary>{html.escape(str(run_dir))}: config and provenance</summary><pre>"
            + html.escape(json.dumps(provenance, indent=1)) + "</pre></details>")


def _narrow(s3, methods: set[str]):
    """Table S3 (rows models, columns methods) turned so that methods are rows when there are more than 12
    of them (24 method columns would not fit the page)."""
    columns = [c for c in s3.columns if c in methods]
    if len(columns) <= 12:
        return s3
    labels = [c for c in s3.columns if c not in methods]
    turned = s3[columns].T
    turned.columns = [" · ".join(str(row[c]) for c in labels) for _, row in s3.iterrows()]
    return turned.rename_axis("method").reset_index()


def _table(frame) -> str:
    return '<div class="scroll">' + frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="") + "</div>"


def write_html_report(run_dirs: list[str | Path], out: str | Path, compare_paper: bool = False,
                      skip_bad: bool = False, allow_incomplete: bool = False,
                      sections: list[tuple[str, str]] | None = None) -> Path:
    """The HTML report of the run folders at `out`; `sections` ((title, HTML) pairs, e.g. `camloc reproduce`'s
    table) come first, after the heading."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise RunFolderError(f"run folder {d} does not exist")
    kinds = {d: _kind(d) for d in dirs}
    eval_dirs = [d for d in dirs if kinds[d] == "eval"]
    ovseg_dirs = [d for d in dirs if kinds[d] == "ovseg"]
    search_dirs = [d for d in dirs if kinds[d] == "threshold-search"]
    groups = eval_groups(eval_dirs, skip_bad, None, allow_incomplete) if eval_dirs else []
    segs = ovseg_groups(ovseg_dirs) if ovseg_dirs else []
    ovseg = ovseg_table_of(segs, allow_incomplete) if segs else None  # refuses unfinished runs before any output
    eval_labels, seg_labels = _group_labels(groups, "eval"), _group_labels(segs, "ovseg")
    for labels in (eval_labels, seg_labels):  # two groups that differ only in a value cut short: number them
        seen: dict = {}
        for i, label in labels.items():
            seen[label] = seen.get(label, 0) + 1
            labels[i] = label if seen[label] == 1 else f"{label} #{seen[label]}"
    label_of = {id(g): eval_labels[i] for i, g in enumerate(groups)}
    label_of.update({id(g): seg_labels[i] for i, g in enumerate(segs)})
    folder_labels = {d: label_of[id(g)] for g in groups + segs for d in g["dirs"]}
    result = board(groups, segs, lambda g: label_of[id(g)])
    methods = list(result["rows"])
    colors = method_colors(methods)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>camloc report</h1><p class=note>{len(dirs)} run folder(s), {len(methods)} method(s); "
            f"written {stamp}.</p>"]
    for title, content in sections or []:
        body.append(f"<h2>{html.escape(title)}</h2>{content}")
    if result["columns"]:
        body.append("<h2>leaderboard</h2><p class=note>Each cell: the metric over the run's pairs (mIoU over its "
                    "images for ovseg), below it the 95 % bootstrap interval over images (1000 resamples of the "
                    "images, seed 0). ★ marks the best value of a column (↑ higher is better, ↓ lower). The rate "
                    "column is pairs (images) per second of the maps' own device time. Click a header to sort; "
                    "hover a method for its name in the papers.</p>")
        body.append(leaderboard_html(result, colors))
    body.append("<h2>runs</h2>" + _runs_table(dirs, folder_labels))
    if groups:
        long = long_table_of(groups)
        if long["mean_iou"].notna().any():  # not for runs on point labels only: their pairs have no box IoU
            body.append("<h2>mean box IoU, Table S3 layout</h2>" + _table(_narrow(
                s3_table(long, compare_paper, display=False), set(long["method"]))))
        body.append("<details><summary>every column of every eval run (the long table)</summary>"
                    + _table(long) + "</details>")
    if ovseg is not None:
        body.append("<h2>open-vocabulary segmentation (mIoU)</h2>" + _table(ovseg))
    for d in search_dirs:
        body.append(f"<h2>Table S1: {html.escape(str(d))}</h2>" + _table(build_report([d], "s1", compare_paper)))
        if (d / "curves.png").exists():
            body.append(_embed(d / "curves.png", "threshold curves"))
    for group in groups:
        records = list(group["records"].values())
        present = [m for m in methods if any(r["method"] == m for r in records)]
        title = label_of[id(group)]
        body.append(f"<h2>{html.escape(title)}</h2>")
        if any(r["iou"] is not None for r in records):  # box-less pairs (point labels) have no box IoU
            body.append(_histograms(records, present, colors, title))
            body.append("<h3>per-class mean box IoU</h3>" + _per_class(records, present, colors))
        body.append(_faith_plots(records, (group["identity"].get("faith") or {}).get("score"), colors))
    for d in eval_dirs:
        vis = sorted((d / "vis").rglob("*.jpg")) if (d / "vis").is_dir() else []
        if vis:
            body.append(f'<h3>saved pairs (best, worst, random): {html.escape(str(d))}</h3><div class="gallery">')
            body.extend(_embed(p, f"{p.parent.name}/{p.stem}") for p in vis)
            body.append("</div>")
    body.append("<h2>config and provenance</h2>" + "".join(_details(d) for d in dirs))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>camloc report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}<script>{SORT_SCRIPT}</script></body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


__all__ = ["leaderboard_html", "method_colors", "write_html_report"]
