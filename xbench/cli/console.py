"""Consoles for the CLI's tables."""

from __future__ import annotations

import os

from rich.console import Console

#: width used when the output is a file or a pipe: rich's default 80 columns would fold a
#: matrix of ten explainers into unreadable slivers, and nobody reads a log in a terminal
PIPED_WIDTH = 200


def table_console(stderr: bool = False, quiet: bool = False) -> Console:
    """A console for tables: the terminal's width, or ``PIPED_WIDTH`` when not a terminal
    (unless ``COLUMNS`` says otherwise)."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, quiet=quiet, width=PIPED_WIDTH)
    return console
