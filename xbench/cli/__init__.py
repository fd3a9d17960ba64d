"""Command-line entry point: ``xbench SUBCOMMAND ...``; one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its parser and sets
``func``) and is listed in ``SUBCOMMANDS`` with its one-line help. Only the module of the
subcommand on the command line is imported: ``xbench --help`` and ``xbench --version`` import
neither torch nor any subcommand module, and ``xbench plugins`` skips the others' imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xbench.errors import UserError

#: subcommand -> (module, help line shown by ``xbench --help`` without importing the module)
SUBCOMMANDS = {
    "run": ("xbench.cli.run", "score explainers x metrics on a dataset"),
    "leaderboard": ("xbench.cli.leaderboard", "regenerate the leaderboard from run records"),
    "plugins": ("xbench.cli.plugins", "list installed plugins"),
    "explain": ("xbench.cli.explain", "write a heatmap overlay PNG for one image"),
    "plot": ("xbench.cli.plot", "draw figures from a run's records (PNG)"),
    "report": ("xbench.cli.report", "write a self-contained HTML report of a run"),
    "check": ("xbench.cli.check", "validate every line of a run's records against the schema"),
    "analyze": ("xbench.cli.analyze", "rank stability: bootstrap rank intervals, Kendall's tau"),
    "verify": ("xbench.cli.verify", "recompute a sample of a run's units and compare with its records"),
}


def _first_command_word(argv: list[str]) -> str | None:
    """The first word of the command line that is not an option (skipping ``-p VALUE``)."""
    from xbench.commands import chosen_words  # light: no torch

    words = chosen_words(argv)
    return words[0] if words else None


def _chosen_subcommand(argv: list[str]) -> str | None:
    """The built-in subcommand named on the command line, or None."""
    word = _first_command_word(argv)
    return word if word in SUBCOMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its full parser (all of them
    when ``argv`` is None), the others a placeholder with their help line."""
    from xbench import __version__

    from xbench.cli.options import XbenchParser, examples

    parser = XbenchParser(prog="xbench", description=(
        "Benchmark visual explanation methods: which explainer is most faithful, at what cost?"),
        epilog=examples(
            "xbench run                      # the embedded default: 10 photos, quick profile",
            "xbench run --data /path/to/ILSVRC2012/val --limit 50",
            "xbench explain photo.jpg --explainer rise -o rise.n_masks=500 --output rise.png",
            "xbench COMMAND --help           # a command's flags, grouped, with defaults",
            note="Plugins add commands of their own (built-in: 'xbench similarity', 'xbench "
                 "train lcam', 'xbench train mutual-transfer'); 'xbench plugins' lists the "
                 "plugins. The flags shared by the commands: docs/cli.md."))
    parser.add_argument("--version", action="version", version=f"xbench {__version__}")
    parser.add_argument("-p", dest="plugin_options", action="append", default=[], metavar="no:NAME",
                        help="block the plugin NAME for this command (repeatable; also "
                             "accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen_subcommand(argv)
    for name, (module, help_line) in SUBCOMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help_line)
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    argv = sys.argv[1:] if argv is None else argv
    # plugin modules import torch: load them only when a command is named (a bare --help or
    # --version must stay instant; their commands are named in the epilog instead)
    if _first_command_word(argv) is not None:
        add_plugin_commands(parser, sub, argv)
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
    """The plugins blocked by ``-p no:NAME`` (before or after the command)."""
    from xbench.cli.options import blocked_plugins as blocked

    return blocked(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from xbench.cli.console import message_console  # rich: not needed by --help/--version
    from xbench.environment import tune_allocator

    tune_allocator()
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
