"""xbench: a benchmark suite for visual explanation methods of image classifiers.

The names below are imported on first use (PEP 562), so that ``xbench --help`` and
``xbench --version`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
PROTOCOL_VERSION = "2"

_LAZY = {
    "Explainer": "xbench.base", "LoadedModel": "xbench.base", "Metric": "xbench.base",
    "MetricBatch": "xbench.base", "Model": "xbench.base", "hookimpl": "xbench.plugins",
    "run": "xbench.api", "explain": "xbench.api", "load_model": "xbench.api",
}

__all__ = ["Explainer", "LoadedModel", "Metric", "MetricBatch", "Model", "hookimpl",
           "run", "explain", "load_model", "__version__", "PROTOCOL_VERSION"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
