"""Speed of the classic explainers against references measured in the same run (issue 3).

Run: ``pytest benchmarks/bench_explainers.py --benchmark-enable -s`` (a few minutes on 2 cores).

Targets, asserted as ratios so that a slow or busy machine does not matter:
- Score-CAM within 1.3x of its own forward-pass bound (K + 1 forwards at the best batch size,
  measured with the engine that runs them: eager PyTorch, and ONNX Runtime, the default on CPU,
  see xbench/engine.py);
- Score-CAM at least 2.5x faster than the faster of pytorch-grad-cam's and torchcam's ScoreCAM
  (issue 3), each library run the way it ships, in its own fresh process: xbench as every xbench
  command sets itself up (allocator, channels_last, default engine), a peer in a plain Python
  process on the same model. This is the setting of issue 3's own peer timings (72.7 s and
  52.6 s against a 17.8 s forward bound);
- in one process, where the peers share xbench's allocator setting and channels_last model,
  never slower than the faster peer (there every contender pays the same K + 1 forwards and
  only the engine differs);
- RISE within 1.3x of N forwards at the best batch size (with either engine);
- Grad-CAM, Grad-CAM++, LayerCAM and guided backprop within 1.3x of one forward + one backward
  (the gradient of the target logits w.r.t. the input, the full backward pass).

Configuration, the same for every contender: EfficientNet-Lite0 (real weights), channels_last,
inference mode where no gradient is needed. Score-CAM uses layer ``_blocks.7._bn2`` (K = 80
channels, 14 x 14) instead of the default ``_swish._bn1`` (K = 1280): the peers need ~1 min per image at K = 1280
here, and the ratios are per forward pass, so K only scales every contender alike. RISE uses
N = 256 masks (the cost is linear in N; the paper's 4000 would take minutes per round).

The machine is shared, so every measurement is the minimum over interleaved rounds: load from
other processes only ever adds time, and interleaving exposes all contenders to the same load.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable

import pytest
import torch

from xbench.data import load_image, sample_images
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench_plugins.gradcam import GradCAM
from xbench_plugins.gradcampp import GradCAMPlusPlus
from xbench_plugins.guided_backprop import GuidedBackprop
from xbench_plugins.layercam import LayerCAM
from xbench_plugins.rise import RISE
from xbench_plugins.scorecam import ScoreCAM

SIZE = 224
# K = 80 by default; XBENCH_BENCH_SCORECAM_LAYER=_swish._bn1 runs the K = 1280 setting (slow)
SCORECAM_LAYER = os.environ.get("XBENCH_BENCH_SCORECAM_LAYER", "_blocks.7._bn2")
RISE_MASKS = 256
BATCH_SIZES = (16, 32, 64)  # batch 1..8 is never the fastest here
ROUNDS = 2


@pytest.fixture(scope="module")
def model() -> ClassifierHandle:
    loaded = build_registry().model("efficientnet-lite0")().load()
    handle = ClassifierHandle(loaded, channels_last=True, name="efficientnet-lite0")
    handle.probabilities(torch.rand(16, 3, SIZE, SIZE))  # warm-up: allocator, oneDNN kernels
    return handle


@pytest.fixture(scope="module")
def photos(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embedded photos and their top-1 classes."""
    paths = [path for _, path, _ in sample_images()[:2]]
    images = torch.stack([load_image(p, model.loaded.resize_size, SIZE) for p in paths])
    return images, model.probabilities(images).argmax(dim=1)


def interleaved_min(contenders: dict[str, Callable[[], object]],
                    rounds: int = ROUNDS) -> dict[str, float]:
    """Best wall time of each contender over ``rounds`` rounds that alternate between them."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def forward_bound(model: ClassifierHandle, count: int) -> dict[str, Callable[[], object]]:
    """Contenders 'forward@B': ``count`` images pushed through the model in batches of B."""
    inputs = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    return {f"forward@{b}": partial(model.probabilities, inputs, batch_size=b)
            for b in BATCH_SIZES}


def engine_bound(engine_model: ClassifierHandle, count: int) -> dict[str, Callable[[], object]]:
    """Contender 'engine forward': ``count`` images through the engine, in its batches (ONNX
    Runtime runs a short last batch as it is, so no padding is timed)."""
    inputs = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    return {"engine forward": partial(engine_model.probabilities, inputs)}


def best_bound(times: dict[str, float]) -> float:
    return min(times[f"forward@{b}"] for b in BATCH_SIZES)


def report(benchmark, times: dict[str, float], **ratios: float) -> None:
    lines = [f"  {name:<26} {seconds * 1000:10.1f} ms" for name, seconds in times.items()]
    lines += [f"  {name:<26} {value:10.2f}" for name, value in ratios.items()]
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update({k: round(v, 4) for k, v in {**times, **ratios}.items()})


def run(explainer, model, images, targets, grad: bool):
    with torch.enable_grad() if grad else torch.no_grad():
        return explainer.explain(model, images, targets)


def pytorch_grad_cam_scorecam(model: ClassifierHandle, image: torch.Tensor, target: int):
    from pytorch_grad_cam import ScoreCAM as PeerScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = PeerScoreCAM(model=model, target_layers=[model.layer(SCORECAM_LAYER)])
    try:
        return cam(input_tensor=image[None], targets=[ClassifierOutputTarget(target)])
    finally:
        cam.activations_and_grads.release()


def torchcam_scorecam(model: ClassifierHandle, image: torch.Tensor, target: int):
    from torchcam.methods import ScoreCAM as PeerScoreCAM

    with PeerScoreCAM(model, target_layer=f"net.{SCORECAM_LAYER}",
                      input_shape=(3, SIZE, SIZE)) as extractor:
        with torch.inference_mode():
            scores = model(image[None])
        return extractor(class_idx=target, scores=scores)


def test_scorecam_speed(benchmark, model, engine_model, photos):
    images, targets = photos
    image, target = images[:1], targets[:1]
    channels = model.layer(SCORECAM_LAYER).num_features
    ours = ScoreCAM(layer=SCORECAM_LAYER)
    for handle in (model, engine_model):
        with handle.counting() as counts:
            run(ours, handle, image, target, grad=False)
        assert int(ours.last_skipped[0]) == 0
        assert counts["forward"] == 1 + channels

    contenders = {
        **forward_bound(model, 1 + channels),
        **engine_bound(engine_model, 1 + channels),
        "xbench eager": partial(run, ours, model, image, target, False),
        "xbench": partial(run, ours, engine_model, image, target, False),
        "pytorch-grad-cam": partial(pytorch_grad_cam_scorecam, model, image[0], int(target)),
        "torchcam": partial(torchcam_scorecam, model, image[0], int(target)),
    }
    times = interleaved_min(contenders, rounds=3)
    peer = min(times["pytorch-grad-cam"], times["torchcam"])
    ratios = {"xbench eager / eager bound": times["xbench eager"] / best_bound(times),
              "xbench / engine bound": times["xbench"] / times["engine forward"],
              "faster peer / xbench": peer / times["xbench"]}
    report(benchmark, times, K=channels, **ratios)
    benchmark.pedantic(contenders["xbench"], rounds=1, iterations=1)
    assert ratios["xbench eager / eager bound"] <= 1.3
    assert ratios["xbench / engine bound"] <= 1.3
    assert ratios["faster peer / xbench"] >= 1.0


# One contender per fresh process, set up the way its users run it: xbench as every xbench command
# does (allocator tuned, channels_last model, the engine --engine auto picks); a peer in a plain
# Python process (glibc's default allocator, the model in its default memory format). Prints the
# best seconds of ``rounds`` calls after one warm-up call (conftest.py; the engine's one-off
# export, ~2 s, happens before both, as in a run).
AS_SHIPPED = """
import sys, time, torch
which, layer, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "xbench":
    from xbench.environment import tune_allocator
    tune_allocator()
from xbench.data import load_image, sample_images
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
loaded = build_registry().model("efficientnet-lite0")().load()
model = ClassifierHandle(loaded, channels_last=which == "xbench")
image = load_image(sample_images()[0][1], loaded.resize_size, 224)[None]
target = int(model.probabilities(image).argmax())
if which == "xbench":
    from xbench.engine import auto_engine
    from xbench.model import masked_batch_size
    from xbench_plugins.scorecam import ScoreCAM
    cpu = torch.device("cpu")
    model.use_engine(auto_engine(cpu, "fp32")[0], masked_batch_size(cpu))
    explainer = ScoreCAM(layer=layer)
    def call():
        with torch.no_grad():
            explainer.explain(model, image, torch.tensor([target]))
elif which == "pytorch-grad-cam":
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam = ScoreCAM(model=model, target_layers=[model.layer(layer)])
    def call():
        cam(input_tensor=image, targets=[ClassifierOutputTarget(target)])
else:
    from torchcam.methods import ScoreCAM
    extractor = ScoreCAM(model, target_layer="net." + layer, input_shape=(3, 224, 224))
    def call():
        with torch.inference_mode():
            scores = model(image)
        extractor(class_idx=target, scores=scores)
"""


def test_scorecam_as_shipped(benchmark, as_shipped_seconds):
    """Issue 3's target: at least 2.5x faster than the faster peer, each library run the way it
    ships (see the module docstring)."""
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("torchcam")
    times = as_shipped_seconds(AS_SHIPPED, ("xbench", "pytorch-grad-cam", "torchcam"),
                               SCORECAM_LAYER, "2")
    ratio = min(times["pytorch-grad-cam"], times["torchcam"]) / times["xbench"]
    report(benchmark, times, **{"faster peer / xbench (as shipped)": ratio})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert ratio >= 2.5


def test_rise_speed(benchmark, model, engine_model, photos):
    images, targets = photos
    image, target = images[:1], targets[:1]
    ours = RISE(n_masks=RISE_MASKS)
    ours.prepare(model, (3, SIZE, SIZE))  # the random part is drawn once, before timing
    for handle in (model, engine_model):
        with handle.counting() as counts:
            run(ours, handle, image, target, grad=False)
        assert counts["forward"] == RISE_MASKS
    contenders = {**forward_bound(model, RISE_MASKS), **engine_bound(engine_model, RISE_MASKS),
                  "xbench eager": partial(run, ours, model, image, target, False),
                  "xbench": partial(run, ours, engine_model, image, target, False)}
    times = interleaved_min(contenders, rounds=3)
    ratios = {"xbench eager / eager bound": times["xbench eager"] / best_bound(times),
              "xbench / engine bound": times["xbench"] / times["engine forward"]}
    report(benchmark, times, **ratios)
    benchmark.pedantic(contenders["xbench"], rounds=1, iterations=1)
    assert ratios["xbench eager / eager bound"] <= 1.3
    assert ratios["xbench / engine bound"] <= 1.3


def forward_backward(model: ClassifierHandle, images: torch.Tensor, targets: torch.Tensor):
    """One forward and one full backward pass: d(target logits)/d(input)."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        score = model(x).gather(1, targets[:, None]).sum()
        return torch.autograd.grad(score, x)


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus, LayerCAM, GuidedBackprop])
def test_gradient_explainer_speed(benchmark, model, photos, cls):
    images, targets = photos
    explainer = cls()  # default layer _swish._bn1 for the CAMs
    contenders = {"forward+backward": partial(forward_backward, model, images, targets),
                  "xbench": partial(run, explainer, model, images, targets, True)}
    times = interleaved_min(contenders, rounds=10)
    ratio = times["xbench"] / times["forward+backward"]
    report(benchmark, times, **{"xbench / (F+B)": ratio})
    benchmark.pedantic(contenders["xbench"], rounds=1, iterations=1)
    assert ratio <= 1.3
