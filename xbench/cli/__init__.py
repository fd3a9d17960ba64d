"""Command-line entry point: ``xbench SUBCOMMAND ...``; one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its parser and sets
``func``) and is listed in ``SUBCOMMANDS``; modules are imported only when needed so that
``xbench plugins`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xbench.cli.console import message_console
from xbench.errors import UserError

SUBCOMMANDS = {
    "run": "xbench.cli.run",
    "leaderboard": "xbench.cli.leaderboard",
    "plugins": "xbench.cli.plugins",
    "explain": "xbench.cli.explain",
    "plot": "xbench.cli.plot",
    "report": "xbench.cli.report",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from xbench import __version__

    parser = argparse.ArgumentParser(prog="xbench", description=(
        "Benchmark visual explanation methods: which explainer is most faithful, at what cost?"))
    parser.add_argument("--version", action="version", version=f"xbench {__version__}")
    parser.add_argument("-p", dest="plugin_options", action="append", default=[], metavar="no:NAME",
                        help="block the plugin NAME for this command (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    add_plugin_commands(parser, sub, sys.argv[1:] if argv is None else argv)
    return parser


def add_plugin_commands(parser: argparse.ArgumentParser, sub, argv: list[str]) -> None:
    """Commands plugins register (``register_commands``); ``-p no:NAME`` removes them."""
    from xbench.commands import add_commands, collect_commands
    from xbench.plugins import make_plugin_manager

    blocked = [argv[i + 1][3:] for i, token in enumerate(argv[:-1])
               if token == "-p" and argv[i + 1].startswith("no:")]
    pm, _, dists = make_plugin_manager(blocked=blocked)
    commands, errors = collect_commands(pm, dists, reserved=list(SUBCOMMANDS))
    add_commands(sub, commands, argv)
    parser.set_defaults(plugin_command_errors=errors)


def blocked_plugins(args: argparse.Namespace) -> list[str]:
    blocked = []
    for option in args.plugin_options:
        if not option.startswith("no:"):
            raise UserError(f"-p {option}: only '-p no:NAME' (block plugin NAME) is supported")
        blocked.append(option[3:])
    return blocked


def main(argv: list[str] | None = None) -> int:
    from xbench.environment import tune_allocator

    tune_allocator()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    err = message_console()
    for message in getattr(args, "plugin_command_errors", []):
        err.print(f"[yellow]warning:[/] {message}", highlight=False)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished units are on disk; rerun with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
