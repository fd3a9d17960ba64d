"""Rich progress on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


@contextlib.contextmanager
def rich_progress(total: int, completed: int = 0, description: str = "") -> Iterator[Callable[[str], None]]:
    """Yields ``advance(what, completed=None)``; draws a bar on a terminal, nothing otherwise.

    ``completed`` sets the count instead of adding one (the global count of a sharded run)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda what, completed=None: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[what]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, what="")

        def advance(what: str, completed: int | None = None) -> None:
            if completed is None:
                progress.update(task, advance=1, what=what)
            else:
                progress.update(task, completed=completed, what=what)

        yield advance
