"""xbench's CUDA branches on a real GPU: event timing, the compiled engine under autocast,
Score-CAM and RISE in 64-mask GPU batches against CPU. Marked ``gpu``: skipped without CUDA
(tests/conftest.py); benchmarks/device_check.sh runs them."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from xbench.engine import AGREEMENT, build_engine
from xbench.model import masked_batch_size
from xbench.testing import toy_images, toy_model
from xbench.timing import Stopwatch
from xbench_plugins.rise import RISE
from xbench_plugins.scorecam import ScoreCAM

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _device_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_stopwatch_includes_an_asynchronous_kernel():
    check = _device_check()
    launch = check.cuda_sleep_launcher(CUDA, seconds=0.05)
    problems, values = check.stopwatch_problems(lambda: Stopwatch(CUDA), launch,
                                                torch.cuda.synchronize)
    assert problems == [], values
    assert 0.04 <= values["stopwatch"] < 0.5


def test_stopwatch_times_a_forward_positively():
    model = toy_model(device=CUDA)
    with Stopwatch(CUDA) as watch, torch.no_grad():
        model(toy_images(8).to(CUDA))
    assert watch.seconds > 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_compiled_engine_agrees_with_eager_on_cuda(dtype):
    model = toy_model(device=CUDA)
    model.net.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else None
    engine = build_engine("compiled", model.net, 64, (3, 32, 32), CUDA, torch.channels_last,
                          autocast() if autocast else None)
    inputs = toy_images(70, seed=1).to(CUDA)  # a full and a padded chunk
    with torch.inference_mode(), autocast() if autocast else contextlib.nullcontext():
        compiled, eager = engine(inputs).float(), model.net(inputs).float()
    assert compiled.shape == (70, 10)
    assert (compiled - eager).abs().max() <= AGREEMENT * eager.abs().max()


@pytest.mark.parametrize("explainer", [ScoreCAM(seed=0), RISE(seed=0, n_masks=256)],
                         ids=["scorecam", "rise"])
def test_masked_batches_on_cuda_give_the_cpu_maps(explainer):
    images, targets = toy_images(3), torch.tensor([1, 4, 7])
    cpu_model, gpu_model = toy_model(), toy_model(device=CUDA)
    assert masked_batch_size(CUDA) == 64
    with cpu_model.counting() as cpu_counts:
        cpu = explainer.explain(cpu_model, images, targets)
    with gpu_model.counting() as gpu_counts:
        gpu = explainer.explain(gpu_model, images.to(CUDA), targets.to(CUDA))
    assert gpu.device.type == CUDA.type
    assert gpu_counts == cpu_counts  # same work in 64-image instead of 16-image chunks
    scale = float(cpu.abs().max())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4 * scale, rtol=1e-3)
