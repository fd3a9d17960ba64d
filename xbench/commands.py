"""Subcommands provided by plugins through the ``register_commands`` hook."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xbench.errors import PluginError, UserError


@dataclass(frozen=True)
class PluginCommand:
    """One registered command: ``words`` is ("similarity",) or ("train", "lcam")."""

    words: tuple[str, ...]
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | str
    run: Callable[[argparse.Namespace], int | None] | str
    plugin: str

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def resolve(self, target: Callable[..., Any] | str) -> Callable[..., Any]:
        if callable(target):
            return target
        module, _, attribute = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"command 'xbench {self.name}' of plugin {self.plugin!r}: cannot "
                              f"load {target!r}: {exc}") from exc


def collect_commands(pm: Any, dists: dict[str, tuple[str, str]],
                     reserved: Sequence[str]) -> tuple[list[PluginCommand], list[str]]:
    """The commands every loaded plugin registers, and one error per refused registration."""
    commands: dict[tuple[str, ...], PluginCommand] = {}
    errors: list[str] = []
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        plugin = impl.plugin_name
        dist = " ".join(dists.get(plugin, ("(registered in code)", "")))

        def register(name: str, help: str = "", configure: Any = None, run: Any = None,
                     _plugin: str = plugin, _dist: str = dist) -> None:
            words = tuple(name.split())
            where = f"plugin {_plugin!r} ({_dist.strip()})"
            if not words or len(words) > 2 or run is None or configure is None:
                raise PluginError(f"{where}: register_commands needs a name of one or two words "
                                  f"plus configure and run, got {name!r}")
            if words[0] in reserved and len(words) == 1:
                raise PluginError(f"{where}: 'xbench {name}' is a core command")
            if words in commands:
                other = commands[words].plugin
                raise PluginError(f"{where}: 'xbench {name}' is registered twice (also by plugin "
                                  f"{other!r}); block one of them with -p no:NAME")
            commands[words] = PluginCommand(words, help, configure, run, _plugin)

        try:
            impl.function(register=register)
        except PluginError as exc:
            errors.append(str(exc))
    return list(commands.values()), errors


def chosen_words(argv: Sequence[str]) -> list[str]:
    """The positional words of ``argv`` (the command and its group), skipping ``-p VALUE``."""
    words, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "-p":
            skip = True
        elif not token.startswith("-"):
            words.append(token)
    return words


def add_commands(subparsers: Any, commands: list[PluginCommand], argv: Sequence[str]) -> None:
    """Add each command's parser; only the command being run is configured (imported)."""
    from xbench.cli.options import add_block_option

    chosen = chosen_words(argv)
    groups: dict[str, Any] = {}
    for command in sorted(commands, key=lambda c: c.words):
        if len(command.words) == 1:
            parent = subparsers
        else:
            group = command.words[0]
            if group not in groups:
                parser = subparsers.add_parser(group, help=f"{group} commands of plugins")
                groups[group] = parser.add_subparsers(dest=f"{group}_command", required=True,
                                                      metavar="COMMAND")
            parent = groups[group]
        parser = parent.add_parser(command.words[-1], help=command.help, description=command.help)
        if list(command.words) == chosen[:len(command.words)]:
            command.resolve(command.configure)(parser)
            add_block_option(parser)  # -p no:NAME after the command, as in the core commands
            run = command.resolve(command.run)
            parser.set_defaults(func=run)
        else:
            parser.set_defaults(func=_not_configured(command))


def _not_configured(command: PluginCommand) -> Callable[[argparse.Namespace], int]:
    def fail(args: argparse.Namespace) -> int:
        raise UserError(f"'xbench {command.name}' was not set up for this command line")
    return fail
