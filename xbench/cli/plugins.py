"""``xbench plugins``: list installed explainers, models and metrics, and broken plugins.

``xbench plugins NAME`` (or ``--options NAME``) shows one plugin's declared options with their
types, defaults, bounds and docs; ``--json`` prints everything for tools."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from xbench.cli.console import table_console
from xbench.cli.options import add_plugin_options, examples, group

from xbench.options import format_value
from xbench.plugins import build_registry


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plugins", help="list installed plugins",
        description="List the installed explainers, models and metrics, and the plugins that "
                    "failed to load. With a NAME, show that plugin's declared options (type, "
                    "default, bounds, doc) and profiles: the keys -o PLUGIN.KEY=VALUE takes.",
        epilog=examples("xbench plugins", "xbench plugins --kind metric",
                        "xbench plugins rise              # RISE's options (-o rise.KEY=VALUE)",
                        "xbench plugins --json > plugins.json",
                        "xbench plugins -p no:NAME        # as if plugin NAME were not installed"))
    p.add_argument("name", nargs="?", help="show this plugin's options")
    listing = group(p, "listing")
    listing.add_argument("--kind", choices=["explainer", "model", "metric"],
                         help="only this kind (default: all)")
    listing.add_argument("--options", dest="options_of", metavar="NAME",
                         help="show this plugin's options (same as 'xbench plugins NAME')")
    listing.add_argument("--json", action="store_true", help="print JSON for tools")
    add_plugin_options(p, takes_options=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xbench.cli import blocked_plugins

    registry = build_registry(blocked=blocked_plugins(args))
    name = args.name or args.options_of
    if args.json:
        print(json.dumps(registry_json(registry, args.kind, name), indent=2))
        return 1 if registry.load_errors else 0
    console = table_console()
    if name:
        for info in find_plugin(registry, name, args.kind):
            console.print(options_table(info))
        return 0
    table = Table(title="xbench plugins")
    for column in ("name", "kind", "library", "plugin", "version", "source", "summary"):
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
            library = (info.cls.library or info.distribution) if kind == "explainer" else ""
            # escaped: rich would read the tags ('[gradients]') and any bracket as markup
            table.add_row(*map(escape, (name, kind, library, info.plugin, info.version,
                                        info.source, summary)))
    console.print(table)
    for name, what in sorted(registry.blocked.items()):
        console.print(f"blocked by -p no:{name}: {what}", highlight=False, markup=False)
    for message in registry.load_errors:
        console.print(f"[red]failed:[/] {escape(message)}", highlight=False)
    return 1 if registry.load_errors else 0


def find_plugin(registry, name: str, kind: str | None = None) -> list:
    """The registered classes called ``name`` (one per kind that has it); UserError if none."""
    kinds = [kind] if kind else list(registry.entries)
    found = [registry.entries[k][name] for k in kinds if name in registry.entries[k]]
    if not found:
        registry.info(kinds[0] if len(kinds) == 1 else "explainer", name)  # raises, did you mean
    return found


def options_table(info) -> Table:
    table = Table(title=f"{info.kind} {info.name} ({info.source} {info.version}): options",
                  caption=info.cls.summary or None)
    for column in ("option", "type", "default", "allowed", "in variant", "doc"):
        table.add_column(column, overflow="fold")
    for spec in info.cls.option_specs():
        table.add_row(spec.name, spec.type_name, format_value(spec.default),
                      spec.bounds_text() or "-", "yes" if spec.in_variant else "no", spec.doc)
    for profile, values in sorted(info.cls.profiles.items()):
        settings = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
        table.add_row(f"profile {profile}", "", settings, "", "", "")
    return table


def registry_json(registry, kind: str | None = None, name: str | None = None) -> dict:
    """{"plugins": [...], "load_errors": [...]}: each plugin with its declared options."""
    plugins = []
    for plugin_kind, entries in registry.entries.items():
        if kind and plugin_kind != kind:
            continue
        for entry_name in sorted(entries):
            if name and entry_name != name:
                continue
            info = entries[entry_name]
            record = {"name": info.name, "kind": info.kind, "plugin": info.plugin,
                      "distribution": info.distribution, "version": info.version,
                      "summary": info.cls.summary,
                      "options": [spec.as_dict() for spec in info.cls.option_specs()],
                      "profiles": {p: {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in values.items()}
                                   for p, values in info.cls.profiles.items()}}
            if info.kind == "metric":
                record.update(direction=info.cls.direction, metric_kind=info.cls.kind,
                              unit=info.cls.unit)
            elif info.kind == "explainer":
                record.update(needs_gradients=info.cls.needs_gradients,
                              uses_layer=info.cls.uses_layer,
                              library=info.cls.library or info.distribution)
            plugins.append(record)
    if name and not plugins:
        find_plugin(registry, name, kind)
    return {"plugins": plugins, "load_errors": list(registry.load_errors),
            "blocked": dict(sorted(registry.blocked.items()))}
