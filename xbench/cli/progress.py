"""Rich progress on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


@contextlib.contextmanager
def rich_progress(total: int, completed: int = 0, description: str = "") -> Iterator[Callable[[str], None]]:
    """Yields ``advance(what)``; draws a bar on a terminal, does nothing otherwise."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda what: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[what]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, what="")

        def advance(what: str) -> None:
            progress.update(task, advance=1, what=what)

        yield advance
