"""Speed of the faithfulness metrics against references measured in the same run.

Run: ``pytest benchmarks/bench_metrics.py --benchmark-enable -s`` (a few minutes on 2 cores);
``XBENCH_BENCH_STEP=224`` for the protocol's 224 steps (slower).

Targets (issue 4), asserted here as ratios so that a slow or busy machine does not matter:
- insertion + deletion of one image and one map within 1.3x of the forward-pass bound, i.e. the
  time to push the same 2 x (steps + 1) images through the model at its best batch size, with
  the engine that runs them (eager PyTorch, and ONNX Runtime, the default on CPU: xbench/engine.py);
- at least 3x faster than torchcam's ``DeletionInsertionMetric`` at equal steps, each library run
  the way it ships in its own fresh process (xbench set up as every xbench command sets itself
  up; torchcam in a plain Python process, at our batch size, its best here); in one process,
  where torchcam shares our allocator setting and channels_last model, never slower; and faster
  than a per-step loop;
- Average Drop + Average Increase at three retention levels within 1.3x of 3 forwards per image.

The machine is shared, so every measurement is the minimum over interleaved rounds: load from
other processes only ever adds time, and interleaving exposes all contenders to the same load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from functools import partial
from collections.abc import Callable

import pytest
import torch

from xbench import MetricBatch
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench_plugins.average_drop import AverageDrop, AverageIncrease
from xbench_plugins.insertion_deletion import (
    Deletion,
    Insertion,
    blurred,
    default_batch_size,
    step_counts,
)

SIZE = 224
# 14 steps of 3584 pixels (16 rows) keep a round to 30 forwards on a loaded 2-core machine; the
# per-forward ratios do not depend on the number of steps. XBENCH_BENCH_STEP=224 measures the
# protocol default (224 steps, 450 forwards per round).
STEP = int(os.environ.get("XBENCH_BENCH_STEP", 16 * SIZE))
STEPS = len(step_counts(SIZE * SIZE, STEP)) - 1
BATCH_SIZES = (8, 16, 32)  # batch 1 is never the fastest on CPU or GPU
ROUNDS = 4
PEER_BATCH = default_batch_size(torch.device("cpu"))  # torchcam at our batch size


@pytest.fixture(scope="module")
def model() -> ClassifierHandle:
    loaded = build_registry().model("efficientnet-lite0")().load()
    handle = ClassifierHandle(loaded, channels_last=True)
    handle.probabilities(torch.rand(8, 3, SIZE, SIZE))  # warm-up: allocator, oneDNN kernels
    return handle


def images_and_maps(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and smooth random maps (upsampled 7x7 noise, few ties like real CAMs)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, SIZE, SIZE, generator=generator)
    coarse = torch.rand(count, 1, 7, 7, generator=generator)
    maps = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    maps = (maps - maps.amin(dim=(1, 2), keepdim=True)) / (
        maps.amax(dim=(1, 2), keepdim=True) - maps.amin(dim=(1, 2), keepdim=True))
    return images, maps


def make_batch(model: ClassifierHandle, images: torch.Tensor, maps: torch.Tensor) -> MetricBatch:
    probs = model.probabilities(images)
    targets = probs.argmax(dim=1)
    zeros = torch.zeros(len(images))
    return MetricBatch(model=model, images=images, targets=targets, saliency=maps,
                       degenerate=torch.zeros(len(images), dtype=torch.bool),
                       clean_probs=probs.gather(1, targets[:, None])[:, 0],
                       explain_forward=zeros, explain_backward=zeros, explain_seconds=zeros)


def fresh(batch: MetricBatch) -> MetricBatch:
    """The same batch with an empty cache, so that every timed call does all its work."""
    return dataclasses.replace(batch, cache={}, curves={})


def interleaved_min(contenders: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Best wall time of each contender over ``rounds`` rounds that alternate between them."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def forward_bound(model: ClassifierHandle, count: int) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    """Contenders 'forward@B': ``count`` images pushed through the model in batches of B."""
    inputs = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    return {f"forward@{b}": partial(model.probabilities, inputs, batch_size=b)
            for b in BATCH_SIZES}, inputs


def per_step_loop(model: ClassifierHandle, image: torch.Tensor, saliency: torch.Tensor,
                  target: int) -> tuple[list[float], list[float]]:
    """The straightforward implementation (RISE's reference loop): one forward per step, moving
    the next ``STEP`` pixels in place between forwards."""
    order = torch.sort(saliency.flatten(), descending=True, stable=True).indices
    curves = []
    for start, finish in ((image.clone(), model.mean.expand_as(image[None])[0]),
                          (blurred(image[None], model.mean)[0], image)):
        current = start.clone().view(3, -1)
        finish = finish.reshape(3, -1)
        curve = []
        for k in range(STEPS + 1):
            curve.append(model.probabilities(current.view(1, 3, SIZE, SIZE))[0, target].item())
            moved = order[k * STEP:(k + 1) * STEP]
            current[:, moved] = finish[:, moved]
        curves.append(curve)
    return curves[0], curves[1]


class FixedMaps:
    """The part of a torchcam CAM extractor its metrics use, returning a map we choose."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self):
        yield


def report(benchmark, times: dict[str, float], **ratios: float) -> None:
    lines = [f"  {name:<22} {seconds * 1000:9.1f} ms" for name, seconds in times.items()]
    lines += [f"  {name:<22} {value:9.2f}" for name, value in ratios.items()]
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update({k: round(v, 4) for k, v in {**times, **ratios}.items()})


def insertion_deletion(template: MetricBatch) -> MetricBatch:
    """Both curves of ``template``'s images, computed afresh (default batch size)."""
    batch = fresh(template)
    Insertion(step=STEP).score(batch)
    Deletion(step=STEP).score(batch)
    return batch


def test_insertion_deletion_speed(benchmark, model, engine_model):
    images, maps = images_and_maps(1)
    forwards = 2 * (STEPS + 1)
    bound, inputs = forward_bound(model, forwards)
    template = make_batch(model, images, maps)
    target = int(template.targets[0])
    ours = partial(insertion_deletion, dataclasses.replace(template, model=engine_model))
    ours_eager = partial(insertion_deletion, template)

    # ours with its default batch size against the forwards at the best of several sizes
    contenders = {**bound, "engine forward": partial(engine_model.probabilities, inputs),
                  "xbench eager": ours_eager, "xbench": ours}
    metrics = pytest.importorskip("torchcam.metrics")
    has_peer = hasattr(metrics, "DeletionInsertionMetric")
    if has_peer:
        def torchcam():
            peer = metrics.DeletionInsertionMetric(
                FixedMaps(model, maps), partial(torch.softmax, dim=-1), steps=STEPS,
                baseline=model.mean, batch_size=PEER_BATCH)
            peer.update(images, class_idx=[target])
            return peer.summary()
        contenders[f"torchcam@{PEER_BATCH}"] = torchcam
    times = interleaved_min(contenders)
    # the per-step loop is slow and far behind: fewer rounds suffice
    loop = partial(per_step_loop, model, images[0], maps[0], target)
    times["per-step loop"] = interleaved_min({"loop": loop}, rounds=2)["loop"]

    eager_bound = min(times[f"forward@{b}"] for b in BATCH_SIZES)
    ratios = {"xbench eager / eager bound": times["xbench eager"] / eager_bound,
              "xbench / engine bound": times["xbench"] / times["engine forward"],
              "per-step / xbench": times["per-step loop"] / times["xbench"]}
    if has_peer:
        ratios["torchcam / xbench (same batch)"] = times[f"torchcam@{PEER_BATCH}"] / times["xbench"]
    report(benchmark, times, **ratios)
    benchmark.pedantic(ours, rounds=1, iterations=1)

    # the same numbers as the straightforward loop, with either engine
    deletion, insertion = loop()
    for batch in (ours_eager(), ours()):
        torch.testing.assert_close(batch.curves[("deletion", f"step={STEP}")][0],
                                   torch.tensor(deletion, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.curves[("insertion", f"step={STEP}")][0],
                                   torch.tensor(insertion, dtype=torch.float64), atol=1e-5, rtol=0)

    assert ratios["xbench eager / eager bound"] <= 1.3
    assert ratios["xbench / engine bound"] <= 1.3
    assert ratios["per-step / xbench"] >= 1.5
    if has_peer:
        # torchcam batches the steps too: in one process, on our model, only the engine differs
        assert ratios["torchcam / xbench (same batch)"] >= 1.0


# One contender per fresh process, set up the way its users run it (see the module docstring);
# times insertion + deletion on one image (conftest.py).
AS_SHIPPED = """
import sys, time, torch
which, rounds, here = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, here)
if which == "xbench":
    from xbench.environment import tune_allocator
    tune_allocator()
from functools import partial
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
import bench_metrics as b
loaded = build_registry().model("efficientnet-lite0")().load()
model = ClassifierHandle(loaded, channels_last=which == "xbench")
images, maps = b.images_and_maps(1)
if which == "xbench":
    from xbench.engine import auto_engine
    from xbench.model import masked_batch_size
    cpu = torch.device("cpu")
    model.use_engine(auto_engine(cpu, "fp32")[0], masked_batch_size(cpu))
    call = partial(b.insertion_deletion, b.make_batch(model, images, maps))
else:
    from torchcam.metrics import DeletionInsertionMetric
    target = int(model.probabilities(images).argmax())
    def call():
        peer = DeletionInsertionMetric(b.FixedMaps(model, maps), partial(torch.softmax, dim=-1),
                                       steps=b.STEPS, baseline=model.mean, batch_size=b.PEER_BATCH)
        peer.update(images, class_idx=[target])
        return peer.summary()
"""


def test_insertion_deletion_as_shipped(benchmark, as_shipped_seconds):
    """Issue 4's target: at least 3x faster than torchcam's DeletionInsertionMetric at equal
    steps, each library run the way it ships."""
    metrics = pytest.importorskip("torchcam.metrics")
    if not hasattr(metrics, "DeletionInsertionMetric"):
        pytest.skip("this torchcam has no DeletionInsertionMetric")
    times = as_shipped_seconds(AS_SHIPPED, ("xbench", "torchcam"), "3",
                               os.path.dirname(os.path.abspath(__file__)))
    ratio = times["torchcam"] / times["xbench"]
    report(benchmark, times, **{"torchcam / xbench (as shipped)": ratio})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert ratio >= 3.0


def test_average_drop_increase_speed(benchmark, model, engine_model):
    count = 8
    images, maps = images_and_maps(count, seed=1)
    forwards = 3 * count
    bound, inputs = forward_bound(model, forwards)
    template = make_batch(model, images, maps)

    def ours(handle: ClassifierHandle) -> MetricBatch:
        batch = fresh(dataclasses.replace(template, model=handle))
        AverageDrop().score(batch)
        AverageIncrease().score(batch)
        return batch

    times = interleaved_min({**bound, "engine forward": partial(engine_model.probabilities, inputs),
                             "xbench eager": partial(ours, model),
                             "xbench": partial(ours, engine_model)})
    best_forward = min(times[f"forward@{b}"] for b in BATCH_SIZES)
    ratios = {"xbench eager / eager bound": times["xbench eager"] / best_forward,
              "xbench / engine bound": times["xbench"] / times["engine forward"]}
    report(benchmark, times, **ratios)
    benchmark.pedantic(partial(ours, engine_model), rounds=1, iterations=1)
    for handle in (model, engine_model):
        with handle.counting() as counts:
            ours(handle)
        assert counts["forward"] == forwards
    assert ratios["xbench eager / eager bound"] <= 1.3
    assert ratios["xbench / engine bound"] <= 1.3
