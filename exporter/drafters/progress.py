"""A progress bar on stderr (rich) for long drafter work: done / total, figures of the
moment (loss, top-1, tokens/s), elapsed time and ETA. Only the main rank draws one.

    with ProgressBar("training", total=steps, enabled=world.main) as bar:
        bar.update(1, f"loss {loss:.3f} top-1 {top1:.2f}")
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool = True):
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            disable=not enabled)
        self._task = self._progress.add_task(description, total=total, completed=completed,
                                             info="")

    def update(self, advance: int = 1, info: str | None = None, completed: int | None = None):
        fields = {} if info is None else {"info": info}
        self._progress.update(self._task, advance=None if completed is not None else advance,
                              completed=completed, **fields)

    def __enter__(self) -> "ProgressBar":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
