"""`camloc report`: tables from run folders."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camloc.cli.app import app
from camloc.cli.common import reports_errors


@app.command("report")
@reports_errors
def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of camloc eval (shards too) or threshold-search."),
    layout: str = typer.Option("long", "--layout", help="long (one row per model/dataset/method), s1 (Table S1), s3 (Table S3)."),
    fmt: str = typer.Option("md", "--format", help="md, csv or latex."),
    compare_paper: bool = typer.Option(False, "--compare-paper", help="Put the appendix's printed values beside ours."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the table to this file instead of printing it."),
) -> None:
    """Merge run folders into one table (records are merged, so shards combine exactly)."""
    from camloc.report import build_report, render
    from camloc.runfiles import atomic_write_text

    text = render(build_report(run_dirs, layout, compare_paper), fmt)
    if out is None:
        typer.echo(text.rstrip())
    else:
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}")
