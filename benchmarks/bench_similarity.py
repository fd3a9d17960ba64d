"""Speed of the per-neuron guided backprop of the similarity analysis (issue 7).

Run: ``pytest benchmarks/bench_similarity.py --benchmark-enable -s`` (about a minute on 2 cores).

Target, asserted as a ratio measured in the same run: computing GBP(I, j, k) for the channels of
a layer in batches (one replicated input, each copy back-propagating its own channel, forward
stopped at the layer) has a higher throughput than the same visualisations computed one channel
at a time (channel_batch=1: one truncated forward + one backward per channel): >= 2x on the
digits model, whose one-channel passes are too small to keep the cores busy, and >= 1.2x on
VGG-11 at 80 px, where single-image convolutions already do (batching then only removes
per-call overhead; both do the same arithmetic).
The machine is shared, so each side is the minimum over interleaved rounds.
"""

from __future__ import annotations

import time

import pytest
import torch
import torchvision

from xbench import LoadedModel
from xbench.model import ClassifierHandle
from xbench_plugins import similarity as sim

ROUNDS = 4
CASES = {
    # name: (network builder, input size, layer, channels, minimum speed-up)
    "digits-vgg relu4 (32 ch, 32 px)": (sim.build_digits_vgg, 32, "features.relu4", 32, 2.0),
    "vgg11 features.4 (128 ch, 80 px)": (lambda: torchvision.models.vgg11(weights=None), 80,
                                          "features.4", 128, 1.2),
}


def handle(builder, size: int) -> ClassifierHandle:
    torch.manual_seed(0)
    loaded = LoadedModel(module=builder().eval(), input_size=size, mean=(0.5,) * 3,
                         std=(0.5,) * 3, class_names=tuple(str(i) for i in range(1000)),
                         default_layer="")
    return ClassifierHandle(loaded)


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("case", list(CASES))
def test_batched_channel_gbp_speedup(benchmark, case):
    builder, size, layer, channels, min_speedup = CASES[case]
    model = handle(builder, size)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    batched = lambda: sim.channel_guided_backprop(model, image, layer, channel_batch=64)  # noqa: E731
    single = lambda: sim.channel_guided_backprop(model, image, layer, channel_batch=1)  # noqa: E731
    assert sim.probe_layers(model, [layer])[0].channels == channels
    batched(), single()  # warm-up (allocator, oneDNN kernels)
    times = {"batched": [], "single": []}
    for _ in range(ROUNDS):  # interleaved: both sides see the same background load
        times["batched"].append(elapsed(batched))
        times["single"].append(elapsed(single))
    t_batched, t_single = min(times["batched"]), min(times["single"])
    speedup = t_single / t_batched
    benchmark.extra_info.update({"channels": channels, "batched_s": t_batched,
                                 "single_s": t_single, "speedup": speedup})
    print(f"\n{case}: batched {channels / t_batched:.1f} channels/s, one at a time "
          f"{channels / t_single:.1f} channels/s, speedup {speedup:.2f}x")
    benchmark.pedantic(batched, rounds=1, iterations=1)
    assert speedup >= min_speedup, f"batched GBP only {speedup:.2f}x faster than one at a time"
