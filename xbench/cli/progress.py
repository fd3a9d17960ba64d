"""Rich progress on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


@contextlib.contextmanager
def rich_progress(total: float, completed: float = 0,
                  description: str = "") -> Iterator[Callable[..., None]]:
    """Yields ``advance(running, amount=0, completed=None)``: ``running`` labels the unit now
    running, ``amount`` adds finished work (units weighted by their expected forward passes,
    so the ETA is not fooled by one costly explainer); draws a bar on a terminal, nothing
    otherwise. ``completed`` sets the count instead (the global count of a sharded run)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda running, amount=0, completed=None: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[what]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, what="")

        def advance(running: str, amount: float = 0, completed: float | None = None) -> None:
            if completed is None:
                progress.update(task, advance=amount, what=running)
            else:
                progress.update(task, completed=completed, what=running)

        yield advance
