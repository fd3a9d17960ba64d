"""Speed of the issue-20 adapters against captum called directly, and of the black-box ones
against their forward-pass bound (issue 20, "Speed").

Run: ``pytest benchmarks/bench_issue20.py --benchmark-enable -s`` (a few minutes on 2 cores).

Targets, as ratios measured in one process with interleaved rounds (minimum per contender):
- each gradient adapter within 1.2x of the same captum call made directly (same model, image,
  target and settings);
- occlusion, kernel-shap and lime within 1.3x of their forward-pass bound (1 + windows, resp. n
  forwards, through the engine ``xbench run`` uses on this CPU, in its batches).
The remaining zoo methods (last session's second half): deeplift-shap and expected-gradients
against captum's DeepLiftShap / GradientShap on the same references, lrp against zennit's
Gradient attributor with the same composite and canonizers, shapley-value-sampling against its
forward bound (1 + n x segments). Run only these with ``-k "zoo"``.
Light settings keep a round short: IG 16 steps, SmoothGrad 10 samples, occlusion 32/32 (49
windows), KernelSHAP 64 samples; the ratios are per pass, so they hold for heavier settings.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch
from captum.attr import DeepLift, IntegratedGradients, NoiseTunnel, Saliency

from xbench.data import load_image, sample_images
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry

from bench_explainers import interleaved_min, report  # noqa: E402 (benchmarks/ on sys.path)

REGISTRY = build_registry()
SIZE = 224


@pytest.fixture(scope="module")
def model() -> ClassifierHandle:
    loaded = REGISTRY.model("efficientnet-lite0")().load()
    handle = ClassifierHandle(loaded, channels_last=True, name="efficientnet-lite0")
    handle.probabilities(torch.rand(16, 3, SIZE, SIZE))  # warm-up
    return handle


@pytest.fixture(scope="module")
def photo(model):
    path = sample_images()[0][1]
    image = load_image(path, model.loaded.resize_size, SIZE)[None]
    return image, model.probabilities(image).argmax(dim=1)


def relu_twin(model: ClassifierHandle) -> ClassifierHandle:
    """Lite0 with every ReLU6 replaced by ReLU: captum's DeepLift hooks the same modules as
    the adapter, so the two do the same work."""
    net = copy.deepcopy(model.loaded.module)
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.ReLU6):
                setattr(parent, child_name, torch.nn.ReLU())
    loaded = dataclasses.replace(model.loaded, module=net)
    return ClassifierHandle(loaded, channels_last=True, name="lite0-relu")


def ours(name, model, image, target, **options):
    explainer = REGISTRY.explainer(name)(**options)
    with torch.enable_grad() if explainer.needs_gradients else torch.no_grad():
        return explainer.explain(model, image, target)


def direct(fn):
    def call():
        with torch.enable_grad():
            return fn().abs().amax(dim=1)
    return call


@pytest.mark.parametrize("name, options, peer", [
    ("saliency", {}, lambda m, x, t: Saliency(m).attribute(x, target=t, abs=False)),
    ("integrated-gradients", {"steps": 16},
     lambda m, x, t: IntegratedGradients(m).attribute(x, baselines=torch.zeros_like(x), target=t,
                                                      n_steps=16, internal_batch_size=16)),
    ("smoothgrad", {"samples": 10},
     lambda m, x, t: NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", nt_samples=10,
                                                        nt_samples_batch_size=16, stdevs=0.15,
                                                        target=t, abs=False)),
    # on the ReLU twin (below): plain captum hooks no ReLU6, so on Lite0 it does less work
    ("deeplift", {}, lambda m, x, t: DeepLift(m).attribute(x, baselines=torch.zeros_like(x),
                                                           target=t)),
])
def test_gradient_adapter_within_1_2x_of_captum(benchmark, model, photo, name, options, peer):
    image, target = photo
    if name == "deeplift":
        model = relu_twin(model)
    x = image.clone().requires_grad_(True)
    times = interleaved_min({
        "xbench": partial(ours, name, model, image, target, **options),
        "captum": direct(partial(peer, model, x, target)),
    })
    ratio = times["xbench"] / times["captum"]
    report(benchmark, times, ratio=ratio)
    assert ratio <= 1.2, f"{name}: {ratio:.2f}x captum"


@pytest.mark.parametrize("name, options, passes", [
    ("occlusion", {"window": 32, "stride": 32}, 1 + 49),
    # measured 1.62x while the test suite shared the 2 cores, 1.13x on an idle host
    ("kernel-shap", {"samples": 64, "segments": "patches", "patch": 32}, 64),
    ("lime", {"samples": 64, "segments": "patches", "patch": 32}, 64),
])
def test_black_box_within_1_3x_of_forward_bound(benchmark, engine_model, photo, name, options,
                                                passes):
    image, target = photo
    inputs = torch.rand(passes, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    times = interleaved_min({
        "xbench": partial(ours, name, engine_model, image, target, **options),
        "engine forward": partial(engine_model.probabilities, inputs),
    })
    ratio = times["xbench"] / times["engine forward"]
    report(benchmark, times, ratio=ratio)
    assert ratio <= 1.3, f"{name}: {ratio:.2f}x its forward bound"


def _references(image, count):
    from xbench_plugins.captum_gradients import make_references

    return make_references(image[0], "uniform", count, 0, 0.05)


def _seeded_peer(fn, image):
    from xbench_plugins.captum_gradients import seeded
    from xbench_plugins.controls import image_seed

    def call():
        with seeded(image_seed(0, image[0]), image.device):
            return fn()
    return call


def _zennit_lrp(model, image, target):
    from zennit.attribution import Gradient

    from xbench_plugins import lrp

    mean = torch.tensor(model.loaded.mean)[:, None, None]
    std = torch.tensor(model.loaded.std)[:, None, None]
    composite = lrp.make_composite("epsilon-plus-flat", 1e-6, model, lrp.canonizers(model.net))
    with torch.no_grad():
        logits = model.net((image - mean) / std)
    onehot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0) * logits
    with Gradient(model=model.net, composite=composite) as attributor:
        _, relevance = attributor((image - mean) / std, onehot)
    return relevance


@pytest.mark.parametrize("name", ["deeplift-shap", "expected-gradients", "lrp"])
def test_zoo_adapter_within_1_2x_of_library(benchmark, model, photo, name):
    from captum.attr import DeepLiftShap, GradientShap

    image, target = photo
    x = image.clone().requires_grad_(True)
    refs = _references(image, 4)
    if name == "deeplift-shap":
        model = relu_twin(model)  # plain captum hooks no ReLU6 (see deeplift above)
        options = {"references": 4}
        peer = direct(_seeded_peer(
            lambda: DeepLiftShap(model).attribute(x, baselines=refs, target=target), image))
    elif name == "expected-gradients":
        options = {"samples": 8, "references": 4}
        peer = direct(_seeded_peer(lambda: GradientShap(model).attribute(
            x, baselines=refs, n_samples=8, stdevs=0.0, target=target), image))
    else:
        options = {}
        peer = partial(lambda: _zennit_lrp(model, image, target).abs().amax(dim=1))
    times = interleaved_min({
        "xbench": partial(ours, name, model, image, target, **options),
        "library": peer,
    })
    ratio = times["xbench"] / times["library"]
    report(benchmark, times, ratio=ratio)
    assert ratio <= 1.2, f"{name}: {ratio:.2f}x the library"


def test_zoo_shapley_value_sampling_within_1_3x_of_forward_bound(benchmark, engine_model,
                                                                  photo):
    image, target = photo
    options = {"samples": 2, "segments": "patches", "patch": 56}  # 16 patches: 1 + 32 passes
    passes = 1 + 2 * 16
    inputs = torch.rand(passes, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    times = interleaved_min({
        "xbench": partial(ours, "shapley-value-sampling", engine_model, image, target,
                          **options),
        "engine forward": partial(engine_model.probabilities, inputs),
    })
    ratio = times["xbench"] / times["engine forward"]
    report(benchmark, times, ratio=ratio)
    assert ratio <= 1.3, f"shapley-value-sampling: {ratio:.2f}x its forward bound"
