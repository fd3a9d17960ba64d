"""Keeping a long run alive around plugin code: time limits and leaked hooks."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


class PluginTimeout(Exception):
    """A plugin call ran past its time limit."""


def _hook_keys(module: nn.Module) -> dict[tuple[int, str], set[int]]:
    return {(id(m), name): set(getattr(m, name, {}) or {}) for m in module.modules()
            for name in _HOOK_DICTS}


@contextlib.contextmanager
def no_leaked_hooks(module: nn.Module, plugin: str) -> Iterator[None]:
    """Remove hooks a plugin registered on ``module`` and left behind, then report them.

    Raises RuntimeError naming the plugin after cleaning up, so the leak is recorded as a
    failure of that plugin and cannot corrupt the explainers and metrics that run after it.
    """
    before = _hook_keys(module)
    try:
        yield
    finally:
        leaked = 0
        for m in module.modules():
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if not hooks:
                    continue
                for key in set(hooks) - before.get((id(m), name), set()):
                    del hooks[key]
                    leaked += 1
    if leaked:
        raise RuntimeError(f"plugin {plugin!r} left {leaked} hook(s) on the model (removed); "
                           "remove hooks in a finally block")


@contextlib.contextmanager
def time_limit(seconds: float | None, plugin: str) -> Iterator[None]:
    """Raise PluginTimeout in the main thread when the block runs past ``seconds``.

    Uses SIGALRM (POSIX, main thread only; elsewhere the limit is not enforced). A call stuck
    inside one long native operation is interrupted when that operation returns.
    """
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise PluginTimeout(f"plugin {plugin!r} exceeded the {seconds:g} s time limit "
                            "(--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
