"""Perturbation-family adapters (plugins/captum_perturbation.py) against captum directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnLasso
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion, ShapleyValueSampling
from torch import nn

from xbench.base import LoadedModel
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.testing import check_explainer, random_resnet18, toy_images, toy_model
from xbench_plugins.captum_perturbation import patch_mask, slic_mask
from xbench_plugins.controls import image_seed

REGISTRY = build_registry()
LIGHT = {"occlusion": {}, "feature-ablation": {"segments": "patches", "patch": 8},
         "lime": {"samples": 30, "output": "logit", "segments": "patches", "patch": 8,
                  "lasso_alpha": 1e-4},
         "kernel-shap": {"samples": 30, "segments": "patches", "patch": 8},
         "shapley-value-sampling": {"samples": 2, "segments": "patches", "patch": 8}}


class Linear(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)  # a spatial layer, for the census
        self.fc = nn.Linear(2 * size * size, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def linear_model(size: int = 16) -> ClassifierHandle:
    torch.manual_seed(0)
    loaded = LoadedModel(module=Linear(size).eval(), input_size=size, mean=(0.5,) * 3,
                         std=(0.25,) * 3, class_names=("a", "b"), default_layer="conv")
    return ClassifierHandle(loaded, name="linear")


def explain(name, model, images, targets, seed=0, **options):
    return REGISTRY.explainer(name)(seed=seed, **options).explain(model, images, targets)


@pytest.mark.parametrize("name", list(LIGHT))
def test_conforms(name):
    cls = REGISTRY.explainer(name)
    assert cls.library == ("xbench" if name == "shapley-value-sampling" else "captum")
    assert not cls.needs_gradients and "quick" in cls.profiles
    maps = check_explainer(cls, options={**LIGHT[name], "sign": "abs"})
    assert maps.amax(dim=(1, 2)).gt(0).all()  # not degenerate with these settings


def test_conforms_with_slic():
    check_explainer(REGISTRY.explainer("feature-ablation"), options={"n_segments": 8})


def captum_direct(name, model, images, targets, seed=0, **options):
    f = (lambda x: model.predict(x).float()) if options.get("output") == "logit" else \
        (lambda x: model.predict(x).float().softmax(dim=1))
    out = []
    for i in range(len(images)):
        x, t = images[i:i + 1], targets[i:i + 1]
        mask = patch_mask(x.shape[-2], x.shape[-1], options.get("patch", 32))[None, None]
        torch.manual_seed(image_seed(seed, images[i]))
        np.random.seed(image_seed(seed, images[i]) % 2 ** 32)
        if name == "occlusion":
            a = Occlusion(f).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8),
                                       baselines=0.0, target=t)
        elif name == "feature-ablation":
            a = FeatureAblation(f).attribute(x, baselines=0.0, feature_mask=mask, target=t)
        elif name == "lime":
            a = Lime(f, interpretable_model=SkLearnLasso(alpha=options["lasso_alpha"])).attribute(
                x, baselines=0.0, feature_mask=mask, target=t, n_samples=options["samples"])
        elif name == "shapley-value-sampling":
            a = ShapleyValueSampling(f).attribute(x, baselines=0.0, feature_mask=mask,
                                                  target=t, n_samples=options["samples"])
        else:
            a = KernelShap(f).attribute(x, baselines=0.0, feature_mask=mask, target=t,
                                        n_samples=options["samples"])
        out.append(a[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("name", list(LIGHT))
def test_equals_captum_called_directly(name):
    """captum with its own defaults (one perturbation per forward, eager) vs the adapter
    (full engine batches): the same maps."""
    model, images = toy_model(), toy_images(2, seed=3)
    targets = torch.tensor([2, 7])
    ref = captum_direct(name, model, images, targets, seed=5, **LIGHT[name])
    assert ref.abs().amax(dim=(1, 2)).gt(0).all()
    mine = explain(name, model, images, targets, seed=5, **LIGHT[name])
    assert torch.allclose(mine, ref.clamp(min=0), rtol=1e-4, atol=1e-6)
    mine = explain(name, model, images, targets, seed=5, **{**LIGHT[name], "sign": "abs"})
    assert torch.allclose(mine, ref.abs(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, per_image", [
    ("occlusion", 1 + 9), ("feature-ablation", 1 + 16), ("lime", 30), ("kernel-shap", 30),
    ("shapley-value-sampling", 1 + 2 * 16)])
def test_pass_counts(name, per_image):
    model = toy_model()  # 32 px: occlusion 16/8 -> 3 x 3 windows; 8 px patches -> 16 segments
    with model.counting() as counts:
        explain(name, model, toy_images(2), torch.tensor([0, 1]), **LIGHT[name])
    assert counts == {"forward": 2 * per_image, "backward": 0}
    if name == "shapley-value-sampling":
        assert REGISTRY.explainer(name)(**LIGHT[name]).expected_forward_passes(model) == per_image


def test_feature_ablation_and_occlusion_on_a_linear_model_by_hand():
    """logit = w . (x - 0.5) / 0.25: removing a region (fill 0) drops the logit by
    sum_region w x / 0.25 exactly."""
    model = linear_model(16)
    images = toy_images(1, size=16, seed=1)
    target = torch.tensor([1])
    effective = torch.autograd.functional.jacobian(
        lambda x: model(x)[0, 1], images)[0]  # (3, 16, 16): w / 0.25 per pixel
    contribution = (effective * images[0]).sum(dim=0)  # (16, 16)
    mask = patch_mask(16, 16, 4)
    expected = torch.zeros(16, 16)
    for segment in range(16):
        expected[mask == segment] = contribution[mask == segment].sum()
    maps = explain("feature-ablation", model, images, target, output="logit", sign="abs",
                   segments="patches", patch=4)
    assert torch.allclose(maps[0], expected.abs(), rtol=1e-4, atol=1e-5)
    # a linear score is additive: every ordering gives each segment its exact contribution
    shapley = explain("shapley-value-sampling", model, images, target, output="logit",
                      sign="abs", segments="patches", patch=4, samples=2)
    assert torch.allclose(shapley[0], expected.abs(), rtol=1e-4, atol=1e-5)
    occluded = explain("occlusion", model, images, target, output="logit", sign="abs",
                       window=8, stride=8)
    blocks = contribution.view(2, 8, 2, 8).sum(dim=(1, 3)).abs()  # 2 x 2 windows
    assert torch.allclose(occluded[0], blocks.repeat_interleave(8, 0).repeat_interleave(8, 1),
                          rtol=1e-4, atol=1e-5)


def test_patch_mask_by_hand():
    mask = patch_mask(5, 7, 3)
    assert mask.tolist()[0] == [0, 0, 0, 1, 1, 1, 2]
    assert mask.tolist()[4] == [3, 3, 3, 4, 4, 4, 5]
    assert mask.max() == 5


def test_slic_mask_is_skimage_slic():
    from skimage.segmentation import slic

    image = toy_images(1, size=32, seed=2)[0]
    ours = slic_mask(image, 10, 10.0, 1.0)
    theirs = slic(image.permute(1, 2, 0).numpy().astype(np.float64), n_segments=10,
                  compactness=10.0, sigma=1.0, start_label=0, channel_axis=-1)
    assert np.array_equal(ours.numpy(), theirs) and ours.min() == 0


def test_lime_and_kernel_shap_are_seeded():
    model, images = toy_model(), toy_images(1, seed=6)
    a = explain("kernel-shap", model, images, torch.tensor([0]), seed=0, **LIGHT["kernel-shap"])
    b = explain("kernel-shap", model, images, torch.tensor([0]), seed=1, **LIGHT["kernel-shap"])
    assert not torch.allclose(a, b)


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="lime.*segments"):
        REGISTRY.explainer("lime")(segments="grid")
    with pytest.raises(ValueError, match="occlusion.*fill"):
        REGISTRY.explainer("occlusion")(fill=2.0)
    with pytest.raises(UserError, match="occlusion: option window=64.*larger"):
        explain("occlusion", toy_model(), toy_images(1), torch.tensor([0]), window=64)


@pytest.mark.slow
def test_lime_default_is_not_degenerate_on_efficientnet_lite0():
    """With probability outputs captum's Lasso(alpha=0.01) zeroes every weight on the cat
    photo (p = 0.38): the reason lime's default output is the logit."""
    from xbench.data import load_image, sample_images

    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load())
    path = sample_images()[0][1]
    image = load_image(path, model.loaded.resize_size, model.input_size)[None]
    target = model.probabilities(image).argmax(dim=1)
    lime = REGISTRY.explainer("lime")
    assert lime().options.output == "logit"
    assert explain("lime", model, image, target, samples=60).amax() > 0
    assert explain("lime", model, image, target, samples=60, output="probability").amax() == 0


def test_shapley_value_sampling_equals_captum_on_random_resnet18():
    model = random_resnet18(size=64)
    images, targets = toy_images(1, size=64, seed=2), torch.tensor([3])
    options = {"samples": 2, "segments": "patches", "patch": 16, "output": "logit"}
    ref = captum_direct("shapley-value-sampling", model, images, targets, seed=1, **options)
    mine = explain("shapley-value-sampling", model, images, targets, seed=1, sign="abs",
                   **options)
    assert torch.allclose(mine, ref.abs(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_shapley_value_sampling_equals_captum_on_efficientnet_lite0():
    from xbench.data import load_image, sample_images

    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load())
    image = load_image(sample_images()[1][1], model.loaded.resize_size, model.input_size)[None]
    target = model.probabilities(image).argmax(dim=1)
    options = {"samples": 1, "segments": "patches", "patch": 56}
    ref = captum_direct("shapley-value-sampling", model, image, target, **options)
    mine = explain("shapley-value-sampling", model, image, target, sign="abs", **options)
    assert ref.abs().amax() > 0
    assert torch.allclose(mine, ref.abs(), rtol=1e-4, atol=1e-5)
