"""Benchmarks run under the same CPU allocator settings as every `xbench` command
(:func:`xbench.environment.tune_allocator`); references measured in-process share them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from xbench.engine import auto_engine
from xbench.environment import tune_allocator
from xbench.model import ClassifierHandle, masked_batch_size

tune_allocator()

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine_model(model: ClassifierHandle) -> ClassifierHandle:
    """The module's ``model`` with its hook-free forwards through the engine ``xbench run``
    picks on this CPU (``--engine auto``)."""
    name, _ = auto_engine(CPU, "fp32")
    if name == "eager":
        pytest.skip("no engine besides eager here (pip install onnxruntime onnx)")
    handle = ClassifierHandle(model.loaded, channels_last=True, name=model.name)
    handle.use_engine(name, masked_batch_size(CPU))
    return handle


def _fresh_process_seconds(script: str, *args: str) -> float:
    """Run ``script`` in a fresh Python process with the user's environment (without
    XBENCH_NO_MALLOPT) and return the seconds it prints on its last line."""
    env = {k: v for k, v in os.environ.items() if k != "XBENCH_NO_MALLOPT"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def fresh_process_seconds() -> Callable[..., float]:
    """:func:`_fresh_process_seconds`, for the "as shipped" comparisons."""
    return _fresh_process_seconds
