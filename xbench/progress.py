"""Progress on stderr: the one progress display of the core and the study commands.

On a terminal, :class:`Progress` draws rich bars (description, bar, done/total or percent,
elapsed, remaining, a status line). When stderr is not a terminal (a background run writing a
log) it prints one plain, timestamped line per bar at each tenth of its total instead, so a log
shows progress without the escape codes of a live display.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.progress import Progress as _RichProgress
from rich.progress import Task as _RichTask
from rich.text import Text


class _Amount(ProgressColumn):
    """``done/total`` for counted bars, ``NN%`` for weighted ones (``percent=True``)."""

    def render(self, task: _RichTask) -> Text:
        if task.total is None:
            return Text(f"{task.completed:g}")
        if task.fields.get("percent"):
            return Text(f"{task.percentage:>3.0f}%")
        return Text(f"{task.completed:g}/{task.total:g}")


class Bar:
    """One bar of a :class:`Progress`; ``advance`` and ``update`` also write the plain log lines."""

    def __init__(self, owner: Progress, task_id: int, description: str,
                 total: float | None, completed: float, log: bool) -> None:
        self._owner, self._id, self._log = owner, task_id, log
        self.description, self.total, self.completed = description, total, completed

    def advance(self, amount: float = 1, status: str | None = None) -> None:
        self.update(completed=self.completed + amount, status=status)

    def update(self, completed: float | None = None, total: float | None = None,
               status: str | None = None) -> None:
        before = self.completed
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        fields = {} if status is None else {"status": status}
        self._owner.rich.update(self._id, completed=self.completed, total=self.total, **fields)
        if self._log:
            self._owner.log(self.description, before, self.completed, self.total)

    def remove(self) -> None:
        self._owner.rich.remove_task(self._id)


class Progress:
    """Context manager holding any number of bars (``bar(...)``), drawn on stderr.

    ``transient`` clears the bars when the block ends; ``plain_lines=False`` prints nothing
    when stderr is not a terminal.
    """

    def __init__(self, console: Console | None = None, *, transient: bool = False,
                 plain_lines: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.plain_lines = plain_lines and not self.console.is_terminal
        self.rich = _RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), _Amount(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, transient=transient, disable=not self.console.is_terminal)

    def __enter__(self) -> Progress:
        self.rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rich.stop()

    def bar(self, description: str, total: float | None = None, completed: float = 0,
            percent: bool = False, status: str = "", log: bool = True) -> Bar:
        """A new bar; ``percent`` shows the share done instead of ``done/total`` (for totals
        weighted by cost rather than counted); ``log=False`` keeps a fast bar out of the
        plain lines."""
        task_id = self.rich.add_task(description, total=total, completed=completed,
                                     status=status, percent=percent)
        return Bar(self, task_id, description, total, completed, log)

    def log(self, description: str, before: float, after: float, total: float | None) -> None:
        """A plain line when a tenth of ``total`` is crossed (only when not on a terminal)."""
        if not self.plain_lines or not total or total <= 0:
            return
        if int(10 * after / total) > int(10 * before / total):
            self.console.print(f"{time.strftime('%H:%M:%S')} {description.strip()}: "
                               f"{after:g}/{total:g}", highlight=False)


@contextlib.contextmanager
def unit_progress(total: float, completed: float = 0,
                  description: str = "") -> Iterator[Callable[..., None]]:
    """The runner's progress (``Runner(progress=unit_progress)``): yields
    ``advance(running, amount=0, completed=None)``; ``running`` labels the unit now running,
    ``amount`` adds finished work (units weighted by their expected forward passes, so the ETA
    is not fooled by one costly explainer), ``completed`` sets the count instead (the global
    count of a sharded run). Draws on a terminal only (a run's log has its own summary)."""
    with Progress(plain_lines=False) as progress:
        bar = progress.bar(description, total=total, completed=completed, percent=True)

        def advance(running: str, amount: float = 0, completed: float | None = None) -> None:
            if completed is None:
                bar.advance(amount, status=running)
            else:
                bar.update(completed=completed, status=running)

        yield advance
