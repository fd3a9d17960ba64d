"""Gradient-family adapters (plugins/captum_gradients.py) against captum called directly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import (DeepLift, DeepLiftShap, Deconvolution, GradientShap, InputXGradient,
                         IntegratedGradients, NoiseTunnel, Saliency)
from torch import nn

from xbench.base import LoadedModel
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.profiles import plugin_options
from xbench.testing import check_explainer, random_resnet18, toy_images, toy_model
from xbench_plugins import captum_gradients as cg
from xbench_plugins.controls import image_seed

REGISTRY = build_registry()
NAMES = ["saliency", "input-x-gradient", "integrated-gradients", "smoothgrad", "vargrad",
         "gradient-shap", "deeplift", "deconvolution"]
LIGHT = {"integrated-gradients": {"steps": 4}, "smoothgrad": {"samples": 3},
         "vargrad": {"samples": 3}, "gradient-shap": {"samples": 3}}


def relu_toy() -> ClassifierHandle:
    """The toy CNN with its ReLU6 replaced by ReLU: a network captum handles as it is."""
    handle = toy_model()
    net = copy.deepcopy(handle.loaded.module)
    net.act = nn.ReLU()
    return ClassifierHandle(LoadedModel(**{**handle.loaded.__dict__, "module": net}))


@pytest.fixture(scope="module")
def resnet18() -> ClassifierHandle:
    """torchvision ResNet-18, random weights (seeded), in-place ReLUs, 64 px input."""
    return random_resnet18(size=64)


def ours(name, model, images, targets, seed=0, **options):
    return REGISTRY.explainer(name)(seed=seed, **options).explain(model, images, targets)


def theirs(name, model, images, targets, seed=0, **options):
    """captum called directly with the settings the adapter documents, reduced by max |a|."""
    x = images.clone().requires_grad_(True)
    if name == "saliency":
        a = Saliency(model).attribute(x, target=targets, abs=False)
    elif name == "input-x-gradient":
        a = InputXGradient(model).attribute(x, target=targets)
    elif name == "integrated-gradients":
        a = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=targets,
                                                 n_steps=options.get("steps", 50))
    elif name == "deeplift":
        a = DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=targets)
    elif name == "deconvolution":
        a = Deconvolution(model).attribute(x, target=targets)
    else:  # stochastic: image by image, torch seeded as the adapter documents
        parts = []
        for i in range(len(images)):
            torch.manual_seed(image_seed(seed, images[i]))
            np.random.seed(image_seed(seed, images[i]) % 2 ** 32)  # GradientShap's path points
            xi, ti = x[i:i + 1], targets[i:i + 1]
            if name == "gradient-shap":
                parts.append(GradientShap(model).attribute(
                    xi, baselines=torch.zeros_like(xi), n_samples=options["samples"], stdevs=0.0,
                    target=ti))
            else:
                parts.append(NoiseTunnel(Saliency(model)).attribute(
                    xi, nt_type=name, nt_samples=options["samples"], stdevs=0.15, target=ti,
                    abs=False))
        a = torch.cat(parts)
    return a.detach().abs().amax(dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_conforms_with_quick_and_light_settings(name):
    cls = REGISTRY.explainer(name)
    assert cls.library == "captum" and not cls.uses_layer
    assert "quick" in cls.profiles or name in ("saliency", "input-x-gradient", "deeplift",
                                               "deconvolution")
    check_explainer(cls, options=LIGHT.get(name, {}))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("deeplift", "deconvolution")])
def test_equals_captum_called_directly_on_the_toy(name):
    model, images = toy_model(), toy_images(3)
    targets = torch.tensor([0, 4, 7])
    with torch.enable_grad():
        mine = ours(name, model, images, targets, seed=3, **LIGHT.get(name, {}))
        ref = theirs(name, model, images, targets, seed=3, **LIGHT.get(name, {}))
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["deeplift", "deconvolution", "saliency"])
def test_equals_captum_on_relu_networks(name, resnet18):
    """Where captum handles every module (ReLU only, ResNet's in-place ReLUs included)."""
    for model, size in ((relu_toy(), 32), (resnet18, 64)):
        images = toy_images(2, size=size, seed=1)
        targets = torch.tensor([1, 2])
        with torch.enable_grad():
            assert torch.allclose(ours(name, model, images, targets),
                                  theirs(name, model, images, targets), rtol=1e-4, atol=1e-7)


def test_deeplift_sums_to_delta_through_relu6_where_plain_captum_does_not():
    model, images = toy_model(), toy_images(2, seed=2)  # ToyCNN: ReLU6 at two call sites
    targets = torch.tensor([3, 5])
    with torch.enable_grad():
        a = cg._DeepLiftAnyActivation(model).attribute(
            images.clone().requires_grad_(True), baselines=torch.zeros_like(images),
            target=targets)
        plain = DeepLift(model).attribute(images.clone().requires_grad_(True),
                                          baselines=torch.zeros_like(images), target=targets)
        delta = (model(images) - model(torch.zeros_like(images))).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(a.sum(dim=(1, 2, 3)), delta.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.sum(dim=(1, 2, 3)), delta.detach(), rtol=1e-2, atol=1e-3)
    with torch.enable_grad():
        maps = ours("deeplift", model, images, targets)
    assert torch.allclose(maps, a.detach().abs().amax(dim=1))


def test_deconvolution_through_relu6_is_the_relu_rule():
    """The deconvnet backward ignores the forward, so a ReLU6 network's deconvolution equals
    captum's on the same network with ReLU in place of ReLU6."""
    images, targets = toy_images(2, seed=4), torch.tensor([2, 6])
    with torch.enable_grad():
        mine = ours("deconvolution", toy_model(), images, targets)
        ref = theirs("deconvolution", relu_toy(), images, targets)
        plain = theirs("deconvolution", toy_model(), images, targets)
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(mine, plain, rtol=1e-2, atol=1e-5)


def test_integrated_gradients_completeness_and_baselines():
    model, images = relu_toy(), toy_images(2, seed=5)
    targets = torch.tensor([0, 9])
    for baseline in ("black", "blur", "uniform"):
        x_ref = cg.make_baselines(images, baseline, 0, 0.05)
        explainer = REGISTRY.explainer("integrated-gradients")(steps=200, baseline=baseline)
        with torch.enable_grad():
            a = IntegratedGradients(model).attribute(images, baselines=x_ref, target=targets,
                                                     n_steps=200)
            maps = explainer.explain(model, images, targets)
        delta = (model(images) - model(x_ref)).gather(1, targets[:, None])[:, 0].detach()
        assert torch.allclose(a.sum(dim=(1, 2, 3)), delta, rtol=1e-2, atol=1e-3), baseline
        assert torch.allclose(maps, a.abs().amax(dim=1), rtol=1e-4, atol=1e-7), baseline


def test_baselines_by_hand():
    images = toy_images(2, size=16)
    assert torch.equal(cg.make_baselines(images, "black", 0, 0.1), torch.zeros_like(images))
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(cg.make_baselines(flat, "blur", 0, 0.1), flat)
    blurred = cg.make_baselines(images, "blur", 0, 0.1)
    assert blurred.var() < images.var() / 4 and torch.allclose(blurred.mean(), images.mean(),
                                                                atol=0.02)
    noise = cg.make_baselines(images, "uniform", 0, 0.1)
    assert torch.equal(noise, cg.make_baselines(images, "uniform", 0, 0.1))
    assert not torch.equal(noise, cg.make_baselines(images, "uniform", 1, 0.1))
    assert torch.equal(noise[1:], cg.make_baselines(images[1:], "uniform", 0, 0.1))


def test_reductions_by_hand():
    a = torch.tensor([[1.0, -3.0], [2.0, 2.0], [-2.0, 0.0]]).view(1, 3, 1, 2)
    assert torch.equal(cg.reduce_channels(a, "max-abs"), torch.tensor([[[2.0, 3.0]]]))
    assert torch.equal(cg.reduce_channels(a, "sum-abs"), torch.tensor([[[5.0, 5.0]]]))
    assert torch.equal(cg.reduce_channels(a, "sum"), torch.tensor([[[1.0, 0.0]]]))
    assert torch.allclose(cg.reduce_channels(a, "l2"), torch.tensor([[[3.0, 13 ** 0.5]]]))
    explainer = REGISTRY.explainer("saliency")(reduction="l2")
    assert explainer.variant == "reduction=l2"
    assert REGISTRY.explainer("integrated-gradients")(baseline="blur").variant == "baseline=blur"


@pytest.mark.parametrize("name, forward, backward", [
    ("saliency", 1, 1), ("input-x-gradient", 1, 1), ("integrated-gradients", 4, 4),
    ("smoothgrad", 3, 3), ("vargrad", 3, 3), ("gradient-shap", 3, 3), ("deeplift", 2, 2),
    ("deconvolution", 1, 1),
])
def test_pass_counts(name, forward, backward):
    model = toy_model()
    with model.counting() as counts, torch.enable_grad():
        ours(name, model, toy_images(3), torch.tensor([0, 1, 2]), **LIGHT.get(name, {}))
    assert (counts["forward"], counts["backward"]) == (3 * forward, 3 * backward)


def test_quick_profile_is_lighter():
    assert plugin_options("quick", REGISTRY.explainer("integrated-gradients"))["steps"] < 50
    assert plugin_options("quick", REGISTRY.explainer("smoothgrad"))["samples"] < 50


def test_bad_options_and_unsupported_modules_are_clear():
    with pytest.raises(ValueError, match="integrated-gradients.*baseline.*black"):
        REGISTRY.explainer("integrated-gradients")(baseline="grey")
    with pytest.raises(ValueError, match="saliency.*reduction"):
        REGISTRY.explainer("saliency")(reduction="mean")
    with pytest.raises(ValueError, match="smoothgrad.*samples"):
        REGISTRY.explainer("smoothgrad")(samples=0)
    model = toy_model()
    net = copy.deepcopy(model.loaded.module)
    net.block[1] = nn.PReLU()
    prelu = ClassifierHandle(LoadedModel(**{**model.loaded.__dict__, "module": net}))
    with pytest.raises(UserError, match="deeplift: module 'block.1'.*PReLU.*integrated-gradients"):
        with torch.enable_grad():
            ours("deeplift", prelu, toy_images(1), torch.tensor([0]))


@pytest.fixture(scope="module")
def lite0_photo():
    from xbench.data import load_image, sample_images

    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load(), name="lite0")
    path = sample_images()[0][1]
    image = load_image(path, model.loaded.resize_size, model.input_size)[None]
    return model, image, model.probabilities(image).argmax(dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["saliency", "integrated-gradients", "input-x-gradient"])
def test_equals_captum_on_efficientnet_lite0(lite0_photo, name):
    model, image, target = lite0_photo
    with torch.enable_grad():
        mine = ours(name, model, image, target, **LIGHT.get(name, {}))
        ref = theirs(name, model, image, target, **LIGHT.get(name, {}))
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_deeplift_sums_to_delta_on_efficientnet_lite0(lite0_photo):
    """EfficientNet-Lite's ReLU6s get the rescale rule: attributions sum to y(x) - y(0)."""
    model, image, target = lite0_photo
    with torch.enable_grad():
        a = cg._DeepLiftAnyActivation(model).attribute(
            image.clone().requires_grad_(True), baselines=torch.zeros_like(image), target=target)
    with torch.no_grad():
        delta = (model(image) - model(torch.zeros_like(image)))[0, target]
    assert a.sum().item() == pytest.approx(delta.item(), rel=1e-3, abs=1e-3)


# --- DeepLiftShap and Expected Gradients: reference distributions ------------------------------

REF_LIGHT = {"deeplift-shap": {"references": 3}, "expected-gradients": {"samples": 4,
                                                                        "references": 3}}


def references_of(image, seed=0, kind="uniform", count=3):
    return cg.make_references(image, kind, count, seed, 0.05)


def reference_peer(name, model, images, targets, seed=0, **options):
    """captum called directly, image by image, with the references the plugin documents."""
    parts = []
    for i in range(len(images)):
        x = images[i:i + 1].clone().requires_grad_(True)
        refs = references_of(images[i], seed, options.get("reference", "uniform"),
                             options["references"])
        torch.manual_seed(image_seed(seed, images[i]))
        np.random.seed(image_seed(seed, images[i]) % 2 ** 32)
        if name == "deeplift-shap":
            parts.append(DeepLiftShap(model).attribute(x, baselines=refs,
                                                       target=targets[i:i + 1]))
        else:
            parts.append(GradientShap(model).attribute(x, baselines=refs,
                                                       n_samples=options["samples"],
                                                       stdevs=0.0, target=targets[i:i + 1]))
    return torch.cat(parts).detach().abs().amax(dim=1)


@pytest.mark.parametrize("name", list(REF_LIGHT))
def test_reference_methods_conform(name):
    cls = REGISTRY.explainer(name)
    assert cls.library == "captum" and "quick" in cls.profiles
    check_explainer(cls, options=REF_LIGHT[name])
    check_explainer(cls, options={**REF_LIGHT[name], "reference": "blur"})


@pytest.mark.parametrize("name", list(REF_LIGHT))
def test_reference_methods_equal_captum_on_relu_networks(name, resnet18):
    for model, size in ((relu_toy(), 32), (resnet18, 64)):
        images = toy_images(2, size=size, seed=3)
        targets = torch.tensor([4, 1])
        with torch.enable_grad():
            mine = ours(name, model, images, targets, seed=2, **REF_LIGHT[name])
            ref = reference_peer(name, model, images, targets, seed=2, **REF_LIGHT[name])
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7), name


def test_expected_gradients_equals_gradient_shap_on_the_relu6_toy():
    model, images, targets = toy_model(), toy_images(2, seed=6), torch.tensor([0, 8])
    options = {"samples": 5, "references": 4, "reference": "blur"}
    with torch.enable_grad():
        assert torch.allclose(ours("expected-gradients", model, images, targets, **options),
                              reference_peer("expected-gradients", model, images, targets,
                                             **options), rtol=1e-4, atol=1e-7)


def test_deeplift_shap_is_the_mean_of_deeplifts_and_sums_to_the_mean_delta():
    """Through the toy's ReLU6: a = 1/n sum_j DeepLift(x; x'_j), and sum a = y(x) - mean_j
    y(x'_j) (summation to delta, averaged over the references)."""
    model, images, targets = toy_model(), toy_images(1, seed=7), torch.tensor([5])
    refs = references_of(images[0], count=3)
    x = images.clone().requires_grad_(True)
    with torch.enable_grad():
        a = cg._DeepLiftShapAnyActivation(model).attribute(x, baselines=refs, target=targets)
        each = torch.cat([cg._DeepLiftAnyActivation(model).attribute(
            images.clone().requires_grad_(True), baselines=refs[j:j + 1], target=targets)
            for j in range(3)])
        maps = ours("deeplift-shap", model, images, targets, references=3)
    assert torch.allclose(a[0], each.mean(dim=0), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        delta = model(images)[0, 5] - model(refs)[:, 5].mean()
    assert a.sum().item() == pytest.approx(delta.item(), rel=1e-4, abs=1e-5)
    assert torch.allclose(maps, a.detach().abs().amax(dim=1))


def test_references_by_hand():
    image = toy_images(1, size=16)[0]
    noise = references_of(image, count=4)
    assert noise.shape == (4, 3, 16, 16) and torch.equal(noise, references_of(image, count=4))
    assert not torch.equal(noise, references_of(image, seed=1, count=4))
    assert torch.equal(references_of(image, kind="black", count=2), torch.zeros(2, 3, 16, 16))
    blurred = references_of(image, kind="blur", count=3)
    assert blurred[0].var() > blurred[1].var() > blurred[2].var()  # wider and wider
    assert torch.allclose(blurred[2], cg.make_baselines(image[None], "blur", 0, 0.05)[0])


@pytest.mark.parametrize("name, options, forward, backward", [
    ("deeplift-shap", {"references": 3}, 6, 6),
    ("expected-gradients", {"samples": 4, "references": 3}, 4, 4)])
def test_reference_pass_counts(name, options, forward, backward):
    model = toy_model()
    with model.counting() as counts, torch.enable_grad():
        ours(name, model, toy_images(2), torch.tensor([0, 1]), **options)
    assert (counts["forward"], counts["backward"]) == (2 * forward, 2 * backward)
    assert REGISTRY.explainer(name)(**options).expected_forward_passes(model) == forward


@pytest.mark.slow
def test_deeplift_shap_sums_to_the_mean_delta_on_efficientnet_lite0(lite0_photo):
    model, image, target = lite0_photo
    refs = references_of(image[0], count=2)
    with torch.enable_grad():
        a = cg._DeepLiftShapAnyActivation(model).attribute(
            image.clone().requires_grad_(True), baselines=refs, target=target)
    with torch.no_grad():
        delta = model(image)[0, target] - model(refs)[:, target].mean()
    assert a.sum().item() == pytest.approx(delta.item(), rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_expected_gradients_equals_captum_on_efficientnet_lite0(lite0_photo):
    model, image, target = lite0_photo
    options = {"samples": 3, "references": 2}
    with torch.enable_grad():
        assert torch.allclose(ours("expected-gradients", model, image, target, **options),
                              reference_peer("expected-gradients", model, image, target,
                                             **options), rtol=1e-4, atol=1e-7)
