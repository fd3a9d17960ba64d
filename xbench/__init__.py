"""xbench: a benchmark suite for visual explanation methods of image classifiers.

``__all__`` is the public API plugins use; names are imported on first use so that
``import xbench`` (and ``xbench --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
PROTOCOL_VERSION = "2"

_PUBLIC = {
    # contracts
    "Explainer": "xbench.base", "Model": "xbench.base", "Metric": "xbench.base",
    "LoadedModel": "xbench.base", "MetricBatch": "xbench.base",
    # declared pass counts (xbench run --dry-run)
    "Passes": "xbench.base", "PassFacts": "xbench.base",
    "hookimpl": "xbench.plugins",
    # declared options
    "Options": "xbench.options", "option": "xbench.options", "OptionError": "xbench.options",
    # errors with a message for the user
    "UserError": "xbench.errors",
    # what explainers and metrics call on the model
    "ClassifierHandle": "xbench.model", "capture_activations": "xbench.model",
    "masked_batch_size": "xbench.model",
    # map helpers
    "descending_order": "xbench.saliency", "retention_masks": "xbench.saliency",
    "normalize_maps": "xbench.saliency",
    # ImageNet class names for model plugins
    "imagenet_class_names": "xbench.imagenet",
    # object boxes, for localisation metrics (docs/protocol.md)
    "box_distance2": "xbench.boxes", "pad_boxes": "xbench.boxes",
    # for commands plugins add (register_commands): the installed plugins, datasets read into
    # memory, progress bars and the CLI's consoles
    "build_registry": "xbench.plugins", "open_dataset": "xbench.data",
    "load_labelled_images": "xbench.data", "LabelledImages": "xbench.data",
    "Progress": "xbench.progress", "message_console": "xbench.cli.console",
    "table_console": "xbench.cli.console",
    # the Python entry point for notebooks (docs/python-api.md)
    "run": "xbench.api", "explain": "xbench.api", "load_model": "xbench.api",
}

__all__ = sorted(_PUBLIC) + ["__version__", "PROTOCOL_VERSION"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'xbench' has no attribute {name!r}")
    target = "class_names" if name == "imagenet_class_names" else name
    value = getattr(importlib.import_module(module), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
