"""``xbench leaderboard``: regenerate (or check) LEADERBOARD.md and leaderboard.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench import leaderboard
from xbench.cli.console import message_console
from xbench.cli.options import add_output_option, add_plugin_options, examples
from xbench.errors import UserError


DESCRIPTION = """Regenerate LEADERBOARD.md and leaderboard.csv from the records of every run
in a results folder, or check that the committed ones match them. Unreadable runs are skipped
and named."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "leaderboard", help="regenerate the leaderboard from run records",
        description=DESCRIPTION,
        epilog=examples("xbench leaderboard                  # results/",
                        "xbench leaderboard results --check  # exit 1 when stale",
                        "xbench leaderboard results --output /tmp/board"))
    p.add_argument("results", nargs="?", default="results",
                   help="results folder (one sub-folder per run) (default: results)")
    p.add_argument("--check", action="store_true",
                   help="fail (exit 1) when the committed leaderboard differs from the records")
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "folder to write LEADERBOARD.md and leaderboard.csv in (default: the "
                         "results folder)", metavar="FOLDER")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_dir():
        raise UserError(f"{results}: no such results folder (xbench run --output {results} makes one)")
    console = message_console()
    if args.check and args.output:
        raise UserError("--check compares the leaderboard in the results folder; leave out "
                        "--output")
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
    if args.output and Path(args.output) != results:
        written = _write_elsewhere(results, Path(args.output), skipped)
    else:
        written = leaderboard.write(results, skipped)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    for problem in skipped:
        console.print(f"[yellow]warning:[/] run skipped: {problem}", highlight=False)
    return 0


def _write_elsewhere(results: Path, output: Path, skipped: list[str]) -> list[Path]:
    """LEADERBOARD.md and leaderboard.csv of ``results`` written into ``output``."""
    if not output.is_dir():
        raise UserError(f"--output {output}: no such folder; create it or choose another")
    markdown, csv = leaderboard.render(results, skipped)
    paths = [output / leaderboard.LEADERBOARD_MD, output / leaderboard.LEADERBOARD_CSV]
    for path, text in zip(paths, (markdown, csv)):
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--output {output}: cannot write {path.name}: "
                            f"{exc.strerror or exc}") from exc
    return paths
