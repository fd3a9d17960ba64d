"""Consoles for the CLI: tables on stdout, messages on stderr."""

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


def message_console(quiet: bool = False) -> Console:
    """A stderr console for messages and errors that never folds a line: rich would otherwise
    break long paths at the terminal width (80 columns when piped), and a path must stay one
    string that can be copied or grepped."""
    return Console(stderr=True, quiet=quiet, soft_wrap=True)
