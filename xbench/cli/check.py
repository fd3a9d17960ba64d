"""``xbench check RUN...``: validate every line of a run's records against the schema and
the progress log, naming each bad line (file:line: what is wrong)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console
from xbench.cli.options import add_plugin_options, examples
from xbench.errors import UserError
from xbench.records import RunFolder, find_runs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="validate the records of runs, line by line",
        description="Validate every line of a run's records against the schema and the "
                    "progress log, naming each bad line (file:line: what is wrong). Exit 1 "
                    "when a line is bad.",
        epilog=examples("xbench check results                 # every run in it",
                        "xbench check results/val50_quick"))
    p.add_argument("runs", nargs="+", help="run folder(s), or a results folder (every run in it)")
    add_plugin_options(p, takes_options=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = message_console()
    folders: list[RunFolder] = []
    for name in args.runs:
        found = find_runs(Path(name))
        if not found:
            raise UserError(f"{name}: no run folder (a folder holding run.json) there")
        folders += found
    bad = 0
    for folder in folders:
        problems = folder.verify()
        bad += bool(problems)
        for problem in problems:
            console.print(f"[red]bad[/]: {problem}", highlight=False)
        if not problems:
            console.print(f"ok: {folder.path}", highlight=False)
    return 1 if bad else 0
