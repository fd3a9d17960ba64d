"""``xbench plugins``: list installed explainers, models and metrics, and broken plugins."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from xbench.cli.console import table_console

from xbench.plugins import build_registry


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plugins", help="list installed plugins", description=__doc__)
    p.add_argument("--kind", choices=["explainer", "model", "metric"], help="only this kind")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xbench.cli import blocked_plugins

    registry = build_registry(blocked=blocked_plugins(args))
    console = table_console()
    table = Table(title="xbench plugins")
    for column in ("name", "kind", "plugin", "version", "source", "summary"):
        table.add_column(column, overflow="fold")
    for kind, entries in registry.entries.items():
        if args.kind and kind != args.kind:
            continue
        for name in sorted(entries):
            info = entries[name]
            summary = getattr(info.cls, "summary", "")
            if kind == "metric":
                summary = f"[{info.cls.direction} is better] {summary}"
            elif kind == "explainer" and info.cls.needs_gradients:
                summary = f"[gradients] {summary}"
            # escaped: rich would read the tags ('[gradients]') and any bracket as markup
            table.add_row(*map(escape, (name, kind, info.plugin, info.version, info.source,
                                        summary)))
    console.print(table)
    for message in registry.load_errors:
        console.print(f"[red]failed:[/] {escape(message)}", highlight=False)
    return 1 if registry.load_errors else 0
