"""A rich progress bar with pairs/s and ETA, or nothing."""
from __future__ import annotations


class NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int) -> None:
        pass


class PairsBar:
    def __init__(self, total: int, label: str = "eval"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(label, total=total, rate="- pairs/s")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:.2f} pairs/s" if speed else "- pairs/s")


def progress_bar(enabled: bool, total: int, label: str = "eval"):
    return PairsBar(total, label) if enabled and total else NoBar()
