"""LRP (plugins/lrp.py) over zennit: known answers, conservation through the canonizers, and
zennit's own attributor on the same settings."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.testing import check_explainer, random_resnet18, toy_images, toy_model

zennit = pytest.importorskip("zennit")

from xbench_plugins import lrp  # noqa: E402 (after the skip)

REGISTRY = build_registry()


def resnet18(size=64) -> ClassifierHandle:
    return random_resnet18(size=size)


@pytest.fixture(scope="module")
def lite0():
    from xbench.data import load_image, sample_images

    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load(), name="lite0")
    image = load_image(sample_images()[0][1], model.loaded.resize_size, model.input_size)[None]
    return model, image, model.probabilities(image).argmax(dim=1)


def without_biases(model: ClassifierHandle) -> ClassifierHandle:
    """A copy whose merged biases are all 0 (batch-norm beta and mean, conv and fc biases)."""
    net = copy.deepcopy(model.net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    return ClassifierHandle(dataclasses.replace(model.loaded, module=net), name="no-bias")


def zennit_direct(model, images, targets, composite="epsilon-plus-flat"):
    """zennit's Gradient attributor on the bare network fed the normalised images, with the
    canonizers and composite the plugin documents; output relevance y^c."""
    from zennit.attribution import Gradient

    mean = torch.tensor(model.loaded.mean)[:, None, None]
    std = torch.tensor(model.loaded.std)[:, None, None]
    comp = lrp.make_composite(composite, 1e-6, model, lrp.canonizers(model.net))
    with torch.no_grad():
        logits = model(images)
    onehot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0) * logits
    with Gradient(model=model.net, composite=comp) as attributor:
        _, relevance = attributor((images - mean) / std, onehot)
    return relevance


@pytest.mark.parametrize("composite", lrp.COMPOSITES)
def test_conforms(composite):
    assert REGISTRY.explainer("lrp").library == "zennit"
    check_explainer(REGISTRY.explainer("lrp"), options={"composite": composite})


def test_epsilon_on_a_bias_free_relu_network_is_gradient_times_input():
    """LRP-epsilon (eps -> 0) on a bias-free ReLU network equals gradient x input
    (Montavon et al. 2019, sec. 10.2.1), at the network's input."""
    handle = without_biases(toy_model())
    net = handle.net
    net.act = nn.ReLU()
    images, targets = toy_images(2, seed=1), torch.tensor([3, 8])
    relevance = lrp.LRP(composite="epsilon", epsilon=1e-9).relevance(handle, images, targets)
    x = images.clone().requires_grad_(True)
    logits = handle(x)
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    mean = torch.tensor(handle.loaded.mean)[:, None, None]
    expected = grad * (images - mean)  # grad_n . x_n = grad_x std . (x - mean) / std
    assert torch.allclose(relevance, expected, rtol=1e-3, atol=1e-6)


def test_resnet18_relevance_is_conserved_through_the_canonizers():
    """Random ResNet-18 (batch-norm biases 0 at initialisation): the input relevance sums to
    y^c - b^c. Without the residual canonizer a skip passes its relevance down both paths."""
    model = resnet18()
    images = toy_images(2, size=64, seed=2)
    targets = model.probabilities(images).argmax(dim=1)
    with torch.no_grad():
        expected = model(images).gather(1, targets[:, None])[:, 0] - model.net.fc.bias[targets]
    relevance = lrp.LRP().relevance(model, images, targets)
    assert torch.allclose(relevance.sum(dim=(1, 2, 3)), expected, rtol=1e-3, atol=1e-4)
    merge_only = [lrp.canonizers(model.net)[0]]
    comp = zennit.composites.EpsilonPlusFlat(canonizers=merge_only)
    with comp.context(model.net):
        x = images.clone().requires_grad_(True)
        logits = model(x)
        onehot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        (grad,) = torch.autograd.grad(logits, x, grad_outputs=onehot * logits.detach())
    doubled = (grad * torch.tensor(model.loaded.std)[:, None, None]).sum(dim=(1, 2, 3))
    assert (doubled > 1.5 * expected).all()


def test_canonizers_keep_the_logits():
    for model in (toy_model(), resnet18()):
        images = toy_images(2, size=model.input_size, seed=3)
        comp = lrp.make_composite("epsilon", 1e-6, model, lrp.canonizers(model.net))
        with torch.no_grad():
            before = model(images)
            with comp.context(model.net):
                during = model(images)
            after = model(images)
        assert torch.allclose(before, during, atol=1e-5) and torch.equal(before, after)


def test_batch_norm_pairs():
    assert lrp.batch_norm_pairs(toy_model().net) == [(("stem",), "bn")]
    pairs = lrp.batch_norm_pairs(resnet18().net)
    assert (("conv1",), "bn1") in pairs and (("layer2.0.downsample.0",), "layer2.0.downsample.1") in pairs
    assert len(pairs) == 20


def test_equals_zennit_called_directly():
    for model in (toy_model(), resnet18()):
        images = toy_images(2, size=model.input_size, seed=4)
        targets = torch.tensor([1, 5])
        for composite in ("epsilon-plus-flat", "epsilon-gamma-box"):
            mine = lrp.LRP(composite=composite).relevance(model, images, targets)
            assert torch.allclose(mine, zennit_direct(model, images, targets, composite),
                                  rtol=1e-4, atol=1e-6), composite
    maps = REGISTRY.explainer("lrp")().explain(model, images, targets)
    assert torch.allclose(maps, lrp.LRP().relevance(model, images, targets).abs().amax(dim=1))


def test_pass_counts():
    model = toy_model()
    with model.counting() as counts:
        REGISTRY.explainer("lrp")().explain(model, toy_images(3), torch.tensor([0, 1, 2]))
    assert counts == {"forward": 3, "backward": 3}


@pytest.mark.slow
def test_efficientnet_lite0_canonizers(lite0):
    """Lite0: the canonized network gives the same logits (the batch-norm merge leaves an exact
    identity, unlike zennit 0.5.1's own, which leaves x / sqrt(1 + eps)); with every bias set to
    0 relevance is conserved through the MBConv skip canonizer; the adapter equals zennit."""
    model, image, target = lite0
    comp = lrp.make_composite("epsilon", 1e-6, model, lrp.canonizers(model.net))
    with torch.no_grad():
        before = model(image)
        with comp.context(model.net):
            during = model(image)
    assert torch.allclose(before, during, atol=1e-4)
    bare = without_biases(model)
    relevance = lrp.LRP().relevance(bare, image, target)
    with torch.no_grad():
        y = bare(image)[0, target]
    assert relevance.sum().item() == pytest.approx(y.item(), rel=1e-2)  # stabilisers: 0.3%
    assert torch.allclose(lrp.LRP().relevance(model, image, target),
                          zennit_direct(model, image, target), rtol=1e-4, atol=1e-6)
