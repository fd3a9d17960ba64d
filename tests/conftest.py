"""Shared fixtures: the real data folder (skipped when absent), a toy-model plugin, images."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xbench
from xbench.environment import tune_allocator
from xbench.plugins import build_registry
from xbench.testing import toy_model

tune_allocator()  # what every `xbench` command does; in-process runs below inherit it

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VAL_DIR = SHARED_DATA / "ilsvrc2012_val_1000"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/device_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_val() -> Path:
    if not VAL_DIR.is_dir():
        pytest.skip(f"real ILSVRC2012 images not found at {VAL_DIR}")
    return VAL_DIR


class ToyModel(xbench.Model):
    """The conformance kit's toy CNN as a Model plugin (fast end-to-end runs)."""

    name = "toy-cnn"

    def load(self):
        return toy_model(seed=0).loaded


def _toy_plugin() -> types.SimpleNamespace:
    @xbench.hookimpl
    def register_models(register):
        register(ToyModel)

    return types.SimpleNamespace(register_models=register_models)


@pytest.fixture
def toy_registry():
    """All installed plugins plus the 'toy-cnn' model."""
    return build_registry(extra_plugins=[("toy", _toy_plugin())])


def write_images(folder: Path, names: list[str], size: int = 40, seed: int = 0) -> list[Path]:
    """Small random RGB images, written with the format their extension implies."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        array = rng.integers(0, 256, size=(size, size + 7, 3), dtype=np.uint8)
        path = folder / name
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
