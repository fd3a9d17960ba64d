"""``xbench leaderboard``: regenerate (or check) LEADERBOARD.md and leaderboard.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench import leaderboard
from xbench.cli.console import message_console
from xbench.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("leaderboard", help="regenerate the leaderboard from run records",
                              description=__doc__)
    p.add_argument("results", nargs="?", default="results", help="results folder")
    p.add_argument("--check", action="store_true",
                   help="fail (exit 1) when the committed leaderboard differs from the records")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_dir():
        raise UserError(f"{results}: no such results folder (xbench run --out {results} makes one)")
    console = message_console()
    if args.check:
        problems = leaderboard.check(results)
        if problems:
            for problem in problems:
                if problem in {str(results / name) for name in (leaderboard.LEADERBOARD_MD,
                                                                  leaderboard.LEADERBOARD_CSV)}:
                    problem += " differs from what the records regenerate"
                console.print(f"[red]leaderboard check failed[/]: {problem}", highlight=False)
            console.print(f"Fix or remove the runs named above, then run `xbench leaderboard "
                          f"{results}` and commit.", highlight=False)
            return 1
        console.print(f"leaderboard in {results} matches its records")
        return 0
    skipped: list[str] = []
    for path in leaderboard.write(results, skipped):
        console.print(f"wrote {path}", highlight=False)
    for problem in skipped:
        console.print(f"[yellow]warning:[/] run skipped: {problem}", highlight=False)
    return 0
