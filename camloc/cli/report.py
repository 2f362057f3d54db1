"""`camloc report`: tables from run folders."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import SkipBadRecordsOption, reports_errors


@app.command("report")
@reports_errors
def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of camloc eval (shards too) or threshold-search."),
    layout: str = typer.Option("long", "--layout", help="long (one row per model/dataset/method), s1 (Table S1), s3 (Table S3), ovseg (rows methods, columns datasets, mIoU; the default for ovseg runs)."),
    fmt: str = typer.Option("md", "--format", help="md, csv or latex."),
    compare_paper: bool = typer.Option(False, "--compare-paper", help="Put the appendix's printed values beside ours."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the table to this file instead of printing it."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page (plots and saved pairs embedded) to this file."),
    skip_bad_records: bool = SkipBadRecordsOption,
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Report runs with missing records (unfinished shards) instead of refusing them."),
) -> None:
    """Merge run folders into one table (records are merged, so shards combine exactly)."""
    from camloc.cli.common import err_console
    from camloc.report.tables import _kind, build_report, render

    ovseg = [d for d in run_dirs if d.is_dir() and _kind(d) == "ovseg"]
    pairs = [d for d in run_dirs if d not in ovseg]
    both = layout == "long" and ovseg and pairs  # a table of each kind
    tabled = pairs if both else run_dirs
    if layout in ("long", "s3"):  # eval runs; threshold-search folders are named, not silently left out
        searches = [d for d in tabled if d.is_dir() and _kind(d) == "threshold-search"]
        if searches and len(searches) < len(tabled):
            tabled = [d for d in tabled if d not in searches]
            err_console.print(f"[yellow]note:[/] {len(searches)} threshold-search folder(s) ({searches[0]}, ...) are "
                              f"not in the {layout} table of eval runs: report them with --layout s1"
                              + (" (the HTML page has both)" if html_out is not None else ""))
    parts = [("pair protocols", tabled, layout), ("ovseg", ovseg, "ovseg")] if both else [(None, tabled, layout)]
    skipped: list = []
    tables = [(title, render(build_report(dirs, kind, compare_paper, skip_bad_records, skipped, allow_incomplete),
                             fmt)) for title, dirs, kind in parts]  # every table is built before anything is written
    if html_out is not None:
        from camloc.report.html import write_html_report

        typer.echo(f"wrote {write_html_report(run_dirs, html_out, compare_paper, skip_bad_records, allow_incomplete)}")
    text = tables[0][1] if len(tables) == 1 else "\n".join(f"{title}:\n{body.rstrip()}\n" for title, body in tables)
    _emit(text, out, skipped)


def _emit(text: str, out: Path | None, skipped: list) -> None:
    from camloc.cli.common import err_console
    from camloc.run.files import atomic_write_text

    for path, line, problem in skipped[:5]:
        err_console.print(f"[yellow]skipped[/] {path} line {line}: {problem}")
    if skipped:
        err_console.print(f"[yellow]note:[/] {len(skipped)} bad record lines skipped (--skip-bad-records)")
    if out is None:
        typer.echo(text.rstrip())
    else:
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}")


@app.command("compare")
@reports_errors
def compare_cmd(
    run_a: Path = typer.Argument(..., help="Run folder A."),
    run_b: Optional[Path] = typer.Argument(None, help="Run folder B [default: A, comparing two of its methods]."),
    method_a: Optional[str] = typer.Option(None, "--method-a", help="Method of A (needed when A has several)."),
    method_b: Optional[str] = typer.Option(None, "--method-b", help="Method of B (needed when B has several)."),
    top: int = typer.Option(10, "--top", help="How many pairs to list."),
    fmt: str = typer.Option("md", "--format", help="md, csv or latex."),
) -> None:
    """List the pairs where A beats B by the largest IoU margin (appendix Figs. S5-S10)."""
    from camloc.report.compare import compare_runs
    from camloc.report.tables import render

    typer.echo(render(compare_runs(run_a, run_b, method_a, method_b, top), fmt).rstrip())
