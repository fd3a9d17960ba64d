"""Plugin discovery: entry points -> pluggy plugin manager -> a registry of named classes.

Built-in plugins live in the ``xbench`` distribution and are found through the same ``xbench``
entry-point group as third-party plugins. Autoloading of third-party plugins can be disabled
(``XBENCH_DISABLE_PLUGIN_AUTOLOAD=1``, the way pytest does it) and single plugins blocked
(``XBENCH_BLOCK_PLUGINS=a,b`` or ``-p no:NAME`` on the command line).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from xbench import hookspecs
from xbench.base import PLUGIN_KINDS, Explainer, Metric, Model
from xbench.errors import PluginError, UserError, did_you_mean

ENTRY_POINT_GROUP = "xbench"
PROJECT_NAME = "xbench"
hookimpl = pluggy.HookimplMarker("xbench")


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered class came from."""

    name: str
    kind: str
    plugin: str
    distribution: str
    version: str
    cls: type

    @property
    def source(self) -> str:
        return "built-in" if self.distribution == PROJECT_NAME else self.distribution


@dataclass
class Registry:
    """Named Explainer, Model and Metric classes, plus the plugins that failed to load."""

    entries: dict[str, dict[str, PluginInfo]] = field(
        default_factory=lambda: {kind: {} for kind in PLUGIN_KINDS}
    )
    load_errors: list[str] = field(default_factory=list)
    #: what ``-p no:NAME`` / XBENCH_BLOCK_PLUGINS blocked: {NAME: what it blocked}
    blocked: dict[str, str] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def info(self, kind: str, name: str) -> PluginInfo:
        table = self.entries[kind]
        if name in table:
            return table[name]
        if name in self.blocked:
            raise UserError(f"{kind} {name!r} is blocked in this command ({self.blocked[name]}); "
                            f"drop '-p no:{name}' (or XBENCH_BLOCK_PLUGINS) to use it")
        message = f"unknown {kind} {name!r}.{did_you_mean(name, table)}"
        blocked_plugins = [n for n, what in self.blocked.items() if what.startswith("plugin")]
        if blocked_plugins:
            message += (" Plugins blocked in this command, which may provide it: "
                        + ", ".join(f"-p no:{n}" for n in blocked_plugins) + ".")
        message += f" Run 'xbench plugins' to list the installed {kind}s."
        if self.load_errors:
            message += " Some plugins failed to load: " + "; ".join(self.load_errors)
        raise UserError(message)

    def get(self, kind: str, name: str) -> type:
        return self.info(kind, name).cls

    def explainer(self, name: str) -> type[Explainer]:
        return self.get("explainer", name)

    def model(self, name: str) -> type[Model]:
        return self.get("model", name)

    def metric(self, name: str) -> type[Metric]:
        return self.get("metric", name)

    def select(self, kind: str, spec: str | Iterable[str]) -> list[str]:
        """Resolve 'all' or a comma-separated list of names, in the order given."""
        names = spec.split(",") if isinstance(spec, str) else list(spec)
        names = [n.strip() for n in names if n.strip()]
        if names == ["all"]:
            return self.names(kind)
        for name in names:
            self.info(kind, name)
        return names

    def versions(self) -> dict[str, str]:
        """{distribution: version} of every distribution that registered something."""
        out: dict[str, str] = {}
        for table in self.entries.values():
            for info in table.values():
                out[info.distribution] = info.version
        return dict(sorted(out.items()))


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.metadata["Name"], dist.version


def make_plugin_manager(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] = (),
    extra_plugins: Iterable[tuple[str, Any]] = (),
) -> tuple[pluggy.PluginManager, list[str], dict[str, tuple[str, str]]]:
    """Build a plugin manager with the entry-point plugins loaded.

    Returns (manager, load_errors, {plugin name: (distribution, version)}). A plugin that fails to import or does not match the hook
    specifications is skipped and reported in ``load_errors`` with its name and distribution;
    it never takes the other plugins down with it.
    """
    if autoload is None:
        autoload = os.environ.get("XBENCH_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    blocked = set(blocked) | {b for b in os.environ.get("XBENCH_BLOCK_PLUGINS", "").split(",") if b}
    pm = pluggy.PluginManager("xbench")
    pm.add_hookspecs(hookspecs)
    errors: list[str] = []
    dists: dict[str, tuple[str, str]] = {}
    for ep in _entry_points():
        dist_name, dist_version = _dist_of(ep)
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            dists[ep.name] = (dist_name, dist_version)
            continue
        if not autoload and dist_name != PROJECT_NAME:
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            errors.append(
                f"plugin {ep.name!r} from distribution {dist_name} {dist_version}: "
                "another plugin already uses this entry-point name; rename one of them"
            )
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any import error is the plugin's, report it
            errors.append(
                f"plugin {ep.name!r} from distribution {dist_name} {dist_version} failed to load: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        dists[ep.name] = (dist_name, dist_version)
    for name, plugin in extra_plugins:
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        pm.register(plugin, name=name)
    errors.extend(_drop_unknown_hooks(pm, dists))
    return pm, errors, dists


def _drop_unknown_hooks(pm: pluggy.PluginManager, dists: dict[str, tuple[str, str]]) -> list[str]:
    """Unregister each plugin with a hook no specification names (a misspelt
    ``register_explainer`` would otherwise be ignored); one message per plugin."""
    errors = []
    while True:
        try:
            pm.check_pending()
            return errors
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            dist_name, dist_version = dists.get(name, ("(registered in code)", "?"))
            hooks = sorted(hook for hook, caller in vars(pm.hook).items()
                           if isinstance(caller, pluggy.HookCaller) and not caller.has_spec()
                           and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls()))
            specs = [n for n in dir(hookspecs) if n.startswith("register_")]
            hints = "".join(did_you_mean(hook, specs) for hook in hooks)
            errors.append(f"plugin {name!r} from distribution {dist_name} {dist_version} "
                          f"implements unknown hook(s) {', '.join(hooks)}.{hints} "
                          f"The hooks are: {', '.join(specs)}")
            pm.unregister(exc.plugin)


def build_registry(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] = (),
    extra_plugins: Iterable[tuple[str, Any]] = (),
) -> Registry:
    """Load all plugins and collect what they register. Cheap enough to call per command."""
    blocked = set(blocked) | {b for b in os.environ.get("XBENCH_BLOCK_PLUGINS", "").split(",") if b}
    pm, errors, dists = make_plugin_manager(autoload=autoload, blocked=blocked, extra_plugins=extra_plugins)
    registry = Registry(load_errors=errors)
    for name in blocked:
        if pm.is_blocked(name):
            dist_name, dist_version = dists.get(name, ("?", "?"))
            registry.blocked[name] = f"plugin {name!r} from {dist_name} {dist_version}"
    hooks = {"explainer": pm.hook.register_explainers, "model": pm.hook.register_models,
             "metric": pm.hook.register_metrics}
    for kind, hook in hooks.items():
        base = PLUGIN_KINDS[kind]
        for impl in reversed(hook.get_hookimpls()):
            plugin_name = impl.plugin_name
            dist_name, dist_version = dists.get(plugin_name, ("(registered in code)", "?"))

            def register(cls: type, _kind=kind, _base=base, _plugin=plugin_name,
                         _dist=dist_name, _version=dist_version) -> None:
                _validate(cls, _kind, _base, _plugin, _dist)
                table = registry.entries[_kind]
                name = cls.name
                if name in table:
                    other = table[name]
                    raise PluginError(
                        f"{_kind} name {name!r} is registered twice: by plugin {other.plugin!r} "
                        f"({other.distribution}) and by plugin {_plugin!r} ({_dist}); "
                        f"uninstall or block one of them (-p no:{_plugin})"
                    )
                table[name] = PluginInfo(name, _kind, _plugin, _dist, _version, cls)

            try:
                impl.function(register=register)
            except PluginError as exc:
                registry.load_errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001
                registry.load_errors.append(
                    f"plugin {plugin_name!r} from distribution {dist_name} {dist_version} failed "
                    f"in {impl.function.__name__}: {type(exc).__name__}: {exc}"
                )
    _block_registered_names(registry, blocked - set(registry.blocked))
    return registry


def _block_registered_names(registry: Registry, names: set[str]) -> None:
    """``-p no:NAME`` for a registered explainer, model or metric name removes that class."""
    for name in sorted(names):
        kinds = [kind for kind, table in registry.entries.items() if name in table]
        if not kinds:
            known = {n for table in registry.entries.values() for n in table}
            known |= {ep.name for ep in _entry_points()}
            raise UserError(f"-p no:{name}: no plugin and no explainer, model or metric is "
                            f"called {name!r}, so nothing was blocked.{did_you_mean(name, known)}"
                            " Run 'xbench plugins' to list them")
        for kind in kinds:
            info = registry.entries[kind].pop(name)
            registry.blocked[name] = f"{kind} {name!r} of plugin {info.plugin!r}"


def _validate(cls: Any, kind: str, base: type, plugin: str, dist: str) -> None:
    where = f"plugin {plugin!r} ({dist})"
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise PluginError(f"{where} registered {cls!r} as a {kind}, but it is not a subclass of "
                          f"xbench.{base.__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise PluginError(f"{where}: {kind} class {cls.__name__} needs a class attribute 'name' "
                          "(a non-empty string without commas or surrounding spaces)")
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"{where}: {kind} {name!r} does not implement {missing}")
    if kind == "metric" and getattr(cls, "direction", None) not in ("lower", "higher"):
        raise PluginError(f"{where}: metric {name!r} must set direction = 'lower' or 'higher'")
