"""One progress bar style for all long work: description, bar, count, rate, extra fields, elapsed and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, or seconds per item when slower than one a second."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"? {self.unit}/s")
        if speed < 1:
            return Text(f"{1 / speed:.2f} s/{self.unit}")
        return Text(f"{speed:.1f} {self.unit}/s")


def progress_bar(*extra: str, unit: str = "it", disable: bool = False) -> Progress:
    """A rich Progress on stderr; ``extra`` are format strings over task fields (``"loss {task.fields[loss]:.4f}"``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit)]
    columns += [TextColumn(e) for e in extra]
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=disable)
