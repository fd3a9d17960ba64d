"""Hook specifications: the only way plugins talk to xbench.

A plugin is a module (or object) with functions marked ``@xbench.hookimpl`` whose names and
argument names match the specifications below. It is found through the ``xbench`` entry-point
group in its distribution's metadata::

    [project.entry-points.xbench]
    my-plugin = "my_package.my_module"

Each registration hook receives a ``register`` callback and calls it once per class it provides.
The callback validates the class (right base class, a ``name``, no duplicate names) and raises
:class:`xbench.errors.PluginError` naming the plugin when something is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # the hooks are declared without importing torch (``xbench --help``)
    from xbench.base import Explainer, Metric, Model

hookspec = pluggy.HookspecMarker("xbench")


@hookspec
def register_explainers(register: Callable[[type[Explainer]], None]) -> None:
    """Register Explainer subclasses: call ``register(MyExplainer)`` for each.

    Contract: the class sets ``name`` (unique across all plugins), ``needs_gradients`` and
    implements :meth:`Explainer.explain`; its constructor accepts ``layer``, ``seed`` and keyword
    options only.
    """


@hookspec
def register_models(register: Callable[[type[Model]], None]) -> None:
    """Register Model subclasses: call ``register(MyModel)`` for each.

    Contract: the class sets ``name`` and implements :meth:`Model.load`, which returns a
    :class:`xbench.base.LoadedModel` and never downloads unless the user asked for it.
    """


@hookspec
def register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register Metric subclasses: call ``register(MyMetric)`` for each.

    Contract: the class sets ``name``, ``direction`` ("lower" or "higher" is better) and
    implements :meth:`Metric.score`.
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Register command-line subcommands: call ``register(name, help=..., configure=...,
    run=...)`` for each.

    ``name`` is the command (``"similarity"``) or a group and command (``"train lcam"`` adds
    ``xbench train lcam``). ``configure(parser)`` adds the command's arguments to its
    ``argparse`` parser and ``run(args)`` executes it, returning the exit status. Either may be
    a ``"module:function"`` string, imported only when that command is used, so registering
    commands costs nothing and ``xbench --help`` stays fast. Blocking the plugin
    (``-p no:NAME``) removes its commands.
    """
