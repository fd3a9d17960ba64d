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


# appended to every "as shipped" script, which defines call(), rounds and imports time
_TIMING = """
call()  # warm-up
best = float("inf")
for _ in range(rounds):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
print(best)
"""


def _as_shipped_seconds(script: str, names: tuple[str, ...], *args: str,
                        processes: int = 2) -> dict[str, float]:
    """{name: best seconds}: ``script`` run as ``python -c script NAME *args`` in a fresh
    process per call, with the user's environment (without XBENCH_NO_MALLOPT); its best of
    ``rounds`` calls after a warm-up call, the best over ``processes`` interleaved processes
    per name, so that every contender sees the same background load."""
    env = {k: v for k, v in os.environ.items() if k != "XBENCH_NO_MALLOPT"}
    best = {name: float("inf") for name in names}
    for _ in range(processes):
        for name in names:
            out = subprocess.run([sys.executable, "-c", script + _TIMING, name, *args],
                                 capture_output=True, text=True, env=env, check=True)
            best[name] = min(best[name], float(out.stdout.strip().splitlines()[-1]))
    return best


@pytest.fixture
def as_shipped_seconds() -> Callable[..., dict[str, float]]:
    """:func:`_as_shipped_seconds`, for the "as shipped" comparisons."""
    return _as_shipped_seconds
