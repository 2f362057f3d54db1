"""A rich progress bar with items/s and ETA, or nothing. It draws on the same stderr console as the command
line's warnings and notes (`err_console`), so a warning printed while it runs appears above it instead of
breaking it."""
from __future__ import annotations

from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int) -> None:
        pass


class PairsBar:
    def __init__(self, total: int, label: str = "eval", unit: str = "pairs"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.unit = unit
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
        )
        self.task = self.progress.add_task(label, total=total, rate=f"- {unit}/s")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s")


def progress_bar(enabled: bool, total: int, label: str = "eval", unit: str = "pairs"):
    """A bar over `total` `unit`s (eval: pairs, every method of a pair counted once it is done)."""
    return PairsBar(total, label, unit) if enabled and total else NoBar()
