"""Guided backprop: equal to captum on plain-ReLU models, equal to a hand-written guided rule on
models with a shared ReLU6 (where captum silently falls back to plain gradients), LeakyReLU per
docs/protocol.md, and Guided Grad-CAM as the product of its parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbench import LoadedModel
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench.testing import _hook_count, toy_images, toy_model
from xbench_plugins.gradcam import GradCAM
from xbench_plugins.guided_backprop import (
    GuidedBackprop,
    GuidedGradCAM,
    channel_max_abs,
    guided_gradients,
    guided_relus,
)


class Net(nn.Module):
    """conv-act-conv-act-conv-act-pool-fc with ONE activation module reused three times."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.act = act
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c1(x))
        x = self.act(self.c2(x) + x)  # a residual, as in real networks
        x = self.act(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


def handle(act: nn.Module, seed: int = 0, scale: float = 1.0) -> ClassifierHandle:
    torch.manual_seed(seed)
    net = Net(act)
    with torch.no_grad():  # large weights put many ReLU6 inputs above 6
        for conv in (net.c1, net.c2, net.c3):
            conv.weight.mul_(scale)
    loaded = LoadedModel(module=net.eval(), input_size=16, mean=(0.5, 0.4, 0.3),
                         std=(0.2, 0.3, 0.25), class_names=tuple("abcde"), default_layer="c3")
    return ClassifierHandle(loaded)


class GuidedRule(torch.autograd.Function):
    """Reference rule, written out: forward act(x); backward 1[x > 0] d(x) 1[g > 0] g."""

    @staticmethod
    def forward(ctx, x, upper):
        """upper: 6.0 for ReLU6, inf for ReLU, None for LeakyReLU(0.1)."""
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(min=0, max=upper) if upper is not None else F.leaky_relu(x, 0.1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        passing = x > 0
        if ctx.upper is not None:
            passing &= x < ctx.upper
        return grad.clamp(min=0) * passing, None


def reference_gradient(model: ClassifierHandle, images: torch.Tensor, targets: torch.Tensor,
                       upper: float | None) -> torch.Tensor:
    """The same network evaluated by hand with GuidedRule at each of the three call sites."""
    net = model.net
    act = lambda t: GuidedRule.apply(t, upper)  # noqa: E731
    x = images.clone().requires_grad_(True)
    h = act(net.c1(model.normalize(x)))
    h = act(net.c2(h) + h)
    h = act(net.c3(h))
    logits = net.fc(h.mean(dim=(2, 3)))
    (gradient,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return gradient


@pytest.mark.parametrize("inplace", [False, True])
def test_matches_captum_on_a_plain_relu_model(inplace):
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    model = handle(nn.ReLU(inplace=inplace))
    images = toy_images(3, size=16)
    targets = torch.tensor([0, 2, 4])
    ours = guided_gradients(model, images, targets)
    with pytest.warns(UserWarning):
        theirs = CaptumGuidedBackprop(model).attribute(images.clone(), target=targets)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(GuidedBackprop().explain(model, images, targets),
                               channel_max_abs(theirs))


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_relu6_matches_the_hand_written_rule(seed):
    model = handle(nn.ReLU6(), seed=seed, scale=6.0)
    images = toy_images(2, size=16, seed=seed)
    targets = torch.tensor([1, 3])
    # the weights really drive units into both ReLU6 dead zones
    with torch.no_grad():
        pre = model.net.c1(model.normalize(images))
    assert (pre > 6).any() and (pre < 0).any()
    ours = guided_gradients(model, images, targets)
    torch.testing.assert_close(ours, reference_gradient(model, images, targets, upper=6.0))


def test_captum_misses_relu6_which_is_why_we_hook_it_ourselves():
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    model = handle(nn.ReLU6(), scale=6.0)
    images = toy_images(2, size=16)
    targets = torch.tensor([1, 3])
    with pytest.warns(UserWarning):
        theirs = CaptumGuidedBackprop(model).attribute(images.clone(), target=targets)
    x = images.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    torch.testing.assert_close(theirs, plain)  # captum: ordinary gradients on ReLU6
    assert not torch.allclose(guided_gradients(model, images, targets), plain)


def test_leaky_relu_passes_nothing_through_its_negative_branch():
    model = handle(nn.LeakyReLU(0.1))
    images = toy_images(2, size=16)
    targets = torch.tensor([0, 1])
    ours = guided_gradients(model, images, targets)
    torch.testing.assert_close(ours, reference_gradient(model, images, targets, upper=None))


def test_conformance_toy_cnn_is_guided_at_every_call():
    """The conformance toy CNN calls one ReLU6 twice (as EfficientNet-Lite does) and has a plain
    ReLU; written out by hand with the guided rule at all three call sites."""
    model = toy_model()
    images = toy_images(2)
    targets = torch.tensor([0, 1])
    net = model.net
    x = images.clone().requires_grad_(True)
    h = GuidedRule.apply(net.bn(net.stem(model.normalize(x))), 6.0)
    h = GuidedRule.apply(net.block[0](h), float("inf"))
    h = GuidedRule.apply(net.head(h), 6.0)
    logits = net.fc(net.pool(h).flatten(1))
    (expected,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    torch.testing.assert_close(guided_gradients(model, images, targets), expected)


def test_no_relu_family_module_is_a_clear_error():
    loaded = LoadedModel(module=nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), input_size=4,
                         mean=(0.0,) * 3, std=(1.0,) * 3, class_names=("a", "b"),
                         default_layer="1")
    with pytest.raises(UserError, match="no nn.ReLU / nn.ReLU6 / nn.LeakyReLU module"):
        GuidedBackprop().explain(ClassifierHandle(loaded), torch.rand(1, 3, 4, 4),
                                 torch.tensor([0]))


def test_hooks_are_removed_even_when_the_forward_fails():
    model = toy_model()
    before = _hook_count(model)
    with pytest.raises(RuntimeError):
        with guided_relus(model.net):
            model(torch.rand(1, 5, 32, 32))  # wrong channel count
    assert _hook_count(model) == before


def test_guided_gradcam_is_guided_gradient_times_upsampled_gradcam():
    model = toy_model()
    images = toy_images(2)
    targets = torch.tensor([4, 6])
    with torch.enable_grad():
        product = GuidedGradCAM(layer="block.0").explain(model, images, targets)
        cam = GradCAM(layer="block.0").explain(model, images, targets)
    gradient = guided_gradients(model, images, targets)
    up = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(product, channel_max_abs(gradient * up))
