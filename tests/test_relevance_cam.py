"""relevance-cam: LRP conservation, agreement with captum's LRP, a hand-computed map, the
ReLU6 fallback rule, and layer sweeps through the runner (raw map size per layer)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import xbench
from conftest import _toy_plugin, write_images
from xbench.base import LoadedModel
from xbench.model import ClassifierHandle, block_layers, capture_activations
from xbench.plugins import build_registry
from xbench.runner import RunConfig, Runner
from xbench.testing import check_explainer, toy_images, toy_model
from xbench_plugins.relevance_cam import RelevanceCAM, target_layer_relevance


class SmallReLUNet(nn.Module):
    """VGG-like: conv, ReLU, max pool, conv, ReLU, global average pool, linear."""

    def __init__(self, bias: bool, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.gap(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def _handle(net: nn.Module, size: int, default_layer: str, classes: int) -> ClassifierHandle:
    """Identity normalisation, so the handle feeds the network the pixels unchanged."""
    loaded = LoadedModel(module=net.eval(), input_size=size, mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0), class_names=tuple(map(str, range(classes))),
                         default_layer=default_layer)
    return ClassifierHandle(loaded)


def _small_net(bias: bool, inplace: bool = False, seed: int = 0) -> ClassifierHandle:
    torch.manual_seed(seed)
    return _handle(SmallReLUNet(bias, inplace), 16, "conv2", 5)


@pytest.mark.parametrize("layer", ["conv1", "relu1", "pool", "conv2", "relu2", "gap"])
def test_relevance_is_conserved_on_a_bias_free_relu_network(layer):
    # LRP-0 (eps = 0) without biases: every layer holds exactly the relevance y^c it received
    # (Bach et al. 2015, eq. 2 conservation); ReLU, max pool and average pool keep it too.
    model = _small_net(bias=False)
    images = toy_images(3, size=16)
    targets = torch.tensor([0, 3, 4])
    _, relevance, logits = target_layer_relevance(model, layer, images, targets, epsilon=0.0)
    expected = logits.gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(relevance.sum(dim=(1, 2, 3)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["conv1", "pool", "conv2"])  # captum has no ReLU target
def test_relevance_matches_captum_layer_lrp_with_epsilon_rule(layer):
    # captum's LRP covers this ReLU network (conv, linear and pooling layers: EpsilonRule);
    # our closed form must give the same relevance at every layer output.
    from captum.attr import LayerLRP

    model = _small_net(bias=True, seed=3)
    images = toy_images(2, size=16, seed=1)
    targets = model.probabilities(images).argmax(dim=1)
    _, ours, _ = target_layer_relevance(model, layer, images, targets, epsilon=1e-9)
    net = model.net
    reference = LayerLRP(net, getattr(net, layer)).attribute(images.requires_grad_(True),
                                                             target=targets)
    for module in net.modules():  # captum leaves its rule objects on the layers
        if hasattr(module, "rule"):
            del module.rule
    assert torch.allclose(ours, reference.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_relevance_matches_captum_on_torchvision_vgg16():
    # The architecture named in the issue: torchvision VGG-16 (random weights, 32 px input to
    # stay fast; in-place ReLUs), relevance at the last and the first conv.
    import torchvision
    from captum.attr import LayerLRP

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    model = _handle(net, 32, "features.28", 1000)
    images = toy_images(1, size=32)
    targets = model.probabilities(images).argmax(dim=1)
    for layer in ("features.28", "features.0"):
        _, ours, _ = target_layer_relevance(model, layer, images, targets)
        reference = LayerLRP(net, model.layer(layer)).attribute(
            images.clone().requires_grad_(True), target=targets).detach()
        for module in net.modules():
            if hasattr(module, "rule"):
                del module.rule
        assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-7), layer


class SaturatingNet(nn.Module):
    """1x1 conv (weight 2, no bias) -> ReLU6 -> global average pool -> linear (weight 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.act = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.fc.weight.fill_(3.0)

    def forward(self, x):
        return self.fc(self.gap(self.act(self.conv(x))).flatten(1))


def test_relu6_fallback_passes_relevance_through_saturated_units():
    # z = 2 r: pixels with r = 4 saturate ReLU6 (gradient 0) yet carry relevance under the
    # LRP activation rule: R_z = z * (relu6(z)/z) * 3/4 = 3/4 * relu6(z); sum R = y (eps = 0).
    model = _handle(SaturatingNet(), 2, "conv", 1)
    red = torch.tensor([[4.0, 1.0], [0.5, -1.0]])  # z = 8 (saturated), 2, 1, -2
    images = torch.stack([red, torch.zeros(2, 2), torch.zeros(2, 2)])[None]
    _, relevance, logits = target_layer_relevance(model, "conv", images, torch.tensor([0]),
                                                  epsilon=0.0)
    expected = torch.tensor([[6.0, 2.0], [1.0, 0.0]]) * 3 / 4
    assert torch.allclose(relevance[0, 0], expected)
    assert torch.isclose(relevance.sum(), logits[0, 0])  # 3 * (6 + 2 + 1 + 0) / 4 = 6.75


class LastLayerNet(nn.Module):
    """features = 1x1 conv copying R and G into 2 channels; GAP; linear with W = [[2,-1],[0,1]]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [0.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.3, -0.2]))

    def forward(self, x):
        return self.fc(self.gap(self.features(x)).flatten(1))


def test_map_at_the_last_layer_matches_a_hand_computation():
    model = _handle(LastLayerNet(), 2, "features", 2)
    red = torch.tensor([[0.2, 0.8], [0.4, 0.0]])
    green = torch.tensor([[0.5, 0.1], [0.3, 0.9]])
    images = torch.stack([red, green, torch.zeros(2, 2)])[None]
    # By hand, class 0: dy/dA_k = W_0k / 4, so R_0 = A_0 / 2 = [[.1,.4],[.2,0]],
    # R_1 = -A_1 / 4 = [[-.125,-.025],[-.075,-.225]]; alpha = (0.7, -0.45) (eq. 2);
    # sum_k R = [[-.025,.375],[.125,-.225]] -> S = [[0,1],[1/3,0]] (eq. 3);
    # sum_k alpha_k A_k S = [[0, .7*.8 - .45*.1], [(.7*.4 - .45*.3)/3, 0]] = [[0,.515],[.145/3,0]]
    # -> ReLU, divided by its max .515 (eq. 4).
    expected = torch.tensor([[0.0, 1.0], [0.145 / 3 / 0.515, 0.0]])
    maps = RelevanceCAM(layer="features").explain(model, images, torch.tensor([0]))
    assert maps.shape == (1, 2, 2)
    assert torch.allclose(maps[0], expected, atol=1e-6)


def test_in_place_relu_after_the_target_layer_does_not_alter_its_activations():
    images = toy_images(2, size=16)
    targets = torch.tensor([0, 1])
    plain = RelevanceCAM(layer="conv1").explain(_small_net(True), images, targets)
    inplace_model = _small_net(True, inplace=True)
    inplace = RelevanceCAM(layer="conv1").explain(inplace_model, images, targets)
    assert torch.equal(plain, inplace)
    check_explainer(RelevanceCAM, model=inplace_model, layer="conv1")


@pytest.mark.parametrize("layer", [None, "stem", "bn", "block", "head"])
def test_conforms_on_the_toy_model_at_any_layer(layer):
    maps = check_explainer(RelevanceCAM, layer=layer)
    assert torch.allclose(maps.flatten(1).amax(dim=1), torch.ones(2))  # normalised (eq. 4)


def test_forward_values_are_unchanged_by_the_lrp_hooks():
    model = toy_model()
    images = toy_images(2)
    plain = model(images).detach()
    _, _, logits = target_layer_relevance(model, "stem", images, torch.tensor([0, 1]))
    assert torch.equal(plain, logits)


def test_bad_epsilon_says_which_option():
    with pytest.raises(ValueError, match="option epsilon"):
        RelevanceCAM(epsilon=-1)
    assert RelevanceCAM(epsilon=0.25).variant == "rule=lrp-eps,epsilon=0.25"


class RecordingRelevanceCAM(RelevanceCAM):
    """relevance-cam that remembers the raw (pre-upsampling) shape of each map it returns."""

    name = "relevance-cam-recording"
    seen: list[tuple[str, tuple[int, ...]]] = []

    def explain(self, model, images, targets):
        maps = super().explain(model, images, targets)
        RecordingRelevanceCAM.seen.append((self.layer, tuple(maps.shape)))
        return maps


@pytest.mark.parametrize("layers", ["all", "stem,block,head"])
def test_layer_sweep_gives_one_map_per_layer_at_the_layer_size(tmp_path, layers):
    @xbench.hookimpl
    def register_explainers(register):
        register(RecordingRelevanceCAM)

    registry = build_registry(extra_plugins=[
        ("toy", _toy_plugin()),
        ("recording", types.SimpleNamespace(register_explainers=register_explainers))])
    write_images(tmp_path / "imgs", ["a.png", "b.png"], size=36)
    RecordingRelevanceCAM.seen = []
    config = RunConfig(explainers="relevance-cam-recording", metrics="insertion-deletion",
                       model="toy-cnn", data=str(tmp_path / "imgs"), batch_size=2, device="cpu",
                       channels_last=False, layers=layers, save_maps=False,
                       options=("insertion-deletion.step=512",))
    folder = Runner(config, registry, tmp_path / "out").run().folder

    handle = toy_model()
    names = block_layers(handle) if layers == "all" else layers.split(",")
    sizes = {}
    for name in names:
        with capture_activations(handle.layer(name), keep_grad=False) as store:
            handle(toy_images(1))
        sizes[name] = tuple(store["activation"].shape[-2:])
    assert [layer for layer, _ in RecordingRelevanceCAM.seen] == names
    assert [shape for _, shape in RecordingRelevanceCAM.seen] == [(2, *sizes[n]) for n in names]
    if layers != "all":
        assert [sizes[n] for n in names] == [(32, 32), (16, 16), (16, 16)]
    scored = [r for r in folder.rows() if r.metric == "insertion-deletion"]
    assert [r.layer for r in scored] == [n for n in names for _ in range(2)]
    assert all(r.status == "ok" for r in scored)


def test_costs_one_forward_and_one_backward_pass_per_image():
    model = toy_model()
    images = toy_images(3)
    with model.counting() as counts:
        RelevanceCAM(layer="block").explain(model, images, torch.tensor([0, 1, 2]))
    assert counts == {"forward": 3, "backward": 3}
