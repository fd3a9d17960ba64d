"""Neuron similarity value (plugins/similarity.py): known answers on hand-made data and toys."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from xbench import LoadedModel
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench_plugins import similarity as sim
from xbench_plugins.similarity import pruning as sim_pruning


def digits_handle(seed: int = 0) -> ClassifierHandle:
    """The digits-vgg architecture with random weights (no training needed for these checks)."""
    torch.manual_seed(seed)
    net = sim.build_digits_vgg().eval()
    loaded = LoadedModel(module=net, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                         class_names=tuple("0123456789"), default_layer="features.relu5")
    return ClassifierHandle(loaded)


def no_hooks_left(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


# ---- class average images -------------------------------------------------------------------

def test_simple_average_matches_hand_computation():
    # channel 0: min 0 in data and mean -> pure ratio 3/2; channel 1: affine 1 + (M-2)*3/2;
    # channel 2: constant -> unchanged
    images = torch.tensor([
        [[[0., 1.], [2., 3.]], [[1., 2.], [3., 4.]], [[.5, .5], [.5, .5]]],
        [[[0., 3.], [2., 1.]], [[3., 2.], [1., 4.]], [[.5, .5], [.5, .5]]],
    ])
    expected = torch.tensor([[[0., 3.], [3., 3.]], [[1., 1.], [1., 4.]], [[.5, .5], [.5, .5]]])
    torch.testing.assert_close(sim.simple_average(images), expected)


def test_simple_average_rejects_empty_class():
    with pytest.raises(ValueError, match="N>0"):
        sim.simple_average(torch.zeros(0, 3, 4, 4))


def test_confidence_averages_hand_computed_and_stable_ties():
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2) * 10
    confidence = torch.tensor([0.2, 0.9, 0.5, 0.9])  # order: 1, 3 (tie kept), 2, 0
    most, least = sim.confidence_averages(images, confidence, k=2)
    torch.testing.assert_close(most, torch.full((3, 2, 2), 20.0))  # (10 + 30) / 2
    torch.testing.assert_close(least, torch.full((3, 2, 2), 10.0))  # (20 + 0) / 2
    most, least = sim.confidence_averages(images, confidence, k=1)
    torch.testing.assert_close(most, torch.full((3, 2, 2), 10.0))
    torch.testing.assert_close(least, torch.full((3, 2, 2), 0.0))
    everything, _ = sim.confidence_averages(images, confidence, k=99)  # capped at N
    torch.testing.assert_close(everything, torch.full((3, 2, 2), 15.0))
    with pytest.raises(ValueError, match="top-K"):
        sim.confidence_averages(images, confidence, k=0)


def test_network_driven_average_raises_the_class_score():
    model = digits_handle()
    start = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    ascended = sim.network_driven_average(model, start, cls=3, steps=15, lr=0.05)
    with torch.no_grad():
        before, after = model(start[None])[0, 3], model(ascended[None])[0, 3]
    assert after > before
    assert ascended.min() >= 0 and ascended.max() <= 1


# ---- guided backprop ------------------------------------------------------------------------

class SharedUnitToy(nn.Module):
    """out = v . act(W act(x) + b) with ONE activation module object used twice."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act
        self.W = nn.Parameter(torch.tensor([[1.0, -2.0, 0.1, 1.0], [-1.0, 1.0, 0.3, -0.5],
                                            [0.5, 0.5, -0.2, 2.0]]))
        self.b = nn.Parameter(torch.tensor([0.5, 1.0, 2.0]))
        self.v = nn.Parameter(torch.tensor([2.0, -1.0, 1.5]))

    def forward(self, x):
        hidden = self.act(x)
        return self.act(hidden @ self.W.T + self.b) @ self.v


def guided_by_hand(x: np.ndarray, W: np.ndarray, b: np.ndarray, v: np.ndarray, top: float):
    """Springenberg's rule at each unit: pass only where the unit's derivative is non-zero
    (0 < input < top) and the incoming gradient is positive."""
    def unit_grad(pre, incoming):
        return ((pre > 0) & (pre < top)) * np.maximum(incoming, 0)

    hidden = np.clip(x, 0, top)
    pre2 = W @ hidden + b
    g_hidden = W.T @ unit_grad(pre2, v)
    return unit_grad(x, g_hidden)


@pytest.mark.parametrize("act,top", [(nn.ReLU6(), 6.0), (nn.ReLU6(inplace=True), 6.0),
                                     (nn.ReLU(), np.inf), (nn.ReLU(inplace=True), np.inf)])
def test_guided_rule_on_a_shared_reused_unit(act, top):
    toy = SharedUnitToy(act)
    # second use: unit 1 gets v = -1 < 0 while active (clamped); first use: input 1 is active but
    # receives -3.25 (clamped), input 2 = 7 saturates ReLU6, input 3 < 0. Hooking only one of the
    # two calls gives [3.75, 0, 0, 0] or [2.75, -3.25, ...] instead of [2.75, 0, 0, 0].
    x_np = np.array([1.0, 0.5, 7.0, -1.0])
    x = torch.tensor(x_np, dtype=torch.float32, requires_grad=True)
    with sim.guided_relus(toy) as hooked:
        (grad,) = torch.autograd.grad(toy(x.clone()), x)
    assert hooked == 1
    W, b, v = (p.detach().numpy().astype(np.float64) for p in (toy.W, toy.b, toy.v))
    expected = guided_by_hand(x_np, W, b, v, top)
    np.testing.assert_allclose(grad.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(expected, [2.75, 0, 0, 0])
    (plain,) = torch.autograd.grad(toy(x.clone()), x)
    assert not np.allclose(plain.numpy(), expected)
    assert no_hooks_left(toy)


def test_guided_relus_refuses_a_model_without_relu_modules():
    with pytest.raises(UserError, match="ReLU"):  # the shared rule of plugins/guided_backprop.py
        with sim.guided_relus(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Tanh())):
            pass


def test_batched_channel_gbp_equals_one_channel_at_a_time():
    model = digits_handle()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    batched, activation = sim.channel_guided_backprop(model, image, "features.relu3", channel_batch=7)
    single, _ = sim.channel_guided_backprop(model, image, "features.relu3", channel_batch=1)
    assert batched.shape == (32, 3, 32, 32) and activation.shape == (32, 16, 16)
    assert batched.abs().sum() > 0
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    subset, _ = sim.channel_guided_backprop(model, image, "features.relu3", channels=[5, 2])
    torch.testing.assert_close(subset, single[[5, 2]], rtol=1e-5, atol=1e-7)
    assert no_hooks_left(model.net)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_channel_gbp_agrees_with_captum_guided_backprop():
    captum_attr = pytest.importorskip("captum.attr")
    model = digits_handle()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours, _ = sim.channel_guided_backprop(model, image, "features.relu3")

    class UpToRelu3(nn.Module):  # the same network, cut after relu3, channel sums as outputs
        def __init__(self):
            super().__init__()
            self.body = model.net.features[:7]  # conv1 .. relu3

        def forward(self, x):
            return self.body((x - 0.5) / 0.5).sum(dim=(2, 3))

    peer = captum_attr.GuidedBackprop(UpToRelu3())
    for k in (0, 9, 31):
        theirs = peer.attribute(image[None].clone(), target=k)[0]
        torch.testing.assert_close(ours[k], theirs, rtol=1e-5, atol=1e-7)
    phi = sim.class_guided_backprop(model, image, 4)
    theirs = captum_attr.GuidedBackprop(model).attribute(image[None].clone(), target=4)[0]
    torch.testing.assert_close(phi, theirs, rtol=1e-5, atol=1e-7)


def test_truncated_forward_stops_at_the_layer():
    model = digits_handle()
    later = []
    handle = model.net.classifier.fc2.register_forward_hook(lambda *a: later.append(1))
    try:
        out = sim.truncated_forward(model, torch.rand(2, 3, 32, 32), model.layer("features.relu2"))
    finally:
        handle.remove()
    assert out.shape == (2, 16, 32, 32) and not later
    assert no_hooks_left(model.net)


def test_layers_default_to_conv_relus_and_shared_modules_are_refused():
    model = digits_handle()
    assert sim.default_layers(model) == list(sim.DIGITS_LAYERS)
    infos = sim.probe_layers(model, ["features.relu3", "features.relu1"])
    assert [(i.name, i.channels) for i in infos] == [("features.relu1", 16), ("features.relu3", 32)]

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU6()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.act(self.conv(x)).mean(dim=(2, 3))))

    loaded = LoadedModel(module=Shared(), input_size=8, mean=(0,) * 3, std=(1,) * 3,
                         class_names=("a", "b"), default_layer="conv")
    with pytest.raises(UserError, match="runs 2 times per forward"):
        sim.probe_layers(ClassifierHandle(loaded), ["act"])
    with pytest.raises(UserError, match="no layer"):
        sim.probe_layers(model, ["features.relu9"])


def test_default_layers_skip_batchnorm_and_avoid_shared_relus():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(weights=None).eval()
    loaded = LoadedModel(module=net, input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3,
                         class_names=tuple(str(i) for i in range(1000)), default_layer="layer4")
    model = ClassifierHandle(loaded)
    layers = sim.default_layers(model)
    # stem: conv1 -> bn1 -> relu; blocks: conv -> bn -> the call site of the block's relu (the
    # shared relu is split per call site when the model loads); where a downsampling block's
    # bn2 is followed by the downsample conv, bn2 itself; the downsample conv -> bn -> the
    # block's last relu call site; 1 + 8 blocks x 2 convs + 3 downsamples
    assert layers[:4] == ["relu", "layer1.0.relu.bn1", "layer1.0.relu.bn2", "layer1.1.relu.bn1"]
    assert ["layer2.0.bn2", "layer2.0.relu.bn2"] == [n for n in layers if n.startswith("layer2.0.")][1:]
    assert len(layers) == 20
    assert len(sim.probe_layers(model, layers)) == 20


def test_default_layers_on_efficientnet_lite_with_its_shared_relu6():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    net = lite.EfficientNet.from_name("efficientnet-lite0").eval()
    loaded = LoadedModel(module=net, input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3,
                         class_names=tuple(str(i) for i in range(1000)), default_layer="_bn1")
    layers = sim.default_layers(ClassifierHandle(loaded))
    # its convs carry a padding child module (so they are not leaves); the _swish each block
    # calls twice is split per call site, so every expansion and depthwise conv gets its ReLU6;
    # the projection convs have none (linear bottleneck): their BN outputs are taken
    assert layers[:5] == ["_swish._bn0", "_blocks.0._swish", "_blocks.0._bn2",
                          "_blocks.1._swish._bn0", "_blocks.1._swish._bn1"]
    assert layers[-1] == "_swish._bn1" and len(layers) == 49


# ---- similarity values ----------------------------------------------------------------------

def test_cosine_similarity_matches_numpy_and_flags_zero_maps():
    rng = np.random.default_rng(0)
    maps, ref = rng.normal(size=(5, 3, 4, 4)), rng.normal(size=(3, 4, 4))
    maps[2] = 0.0
    ours = sim.cosine_similarity(torch.from_numpy(maps).float(), torch.from_numpy(ref).float())
    flat = maps.reshape(5, -1)
    with np.errstate(invalid="ignore"):
        expected = flat @ ref.ravel() / (np.linalg.norm(flat, axis=1) * np.linalg.norm(ref))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    assert torch.isnan(ours[2])
    assert torch.isnan(sim.cosine_similarity(torch.ones(2, 3), torch.zeros(3))).all()


def test_neuron_similarities_table_and_never_activated_neuron():
    model = digits_handle()
    with torch.no_grad():
        model.net.features.conv1.bias[0] = -1e4  # relu1 channel 0 is never positive
    images = {c: torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(c)) for c in (1, 7)}
    table, visuals = sim.neuron_similarities(model, images, ["features.relu1", "features.relu3"],
                                             methods=(1, 2), channel_batch=16, show=3)
    assert list(table.columns) == ["class", "layer", "neuron", "method", "similarity", "activated",
                                   "activation"]
    assert len(table) == 2 * (16 + 32) * 2
    dead = table[(table["layer"] == "features.relu1") & (table["neuron"] == 0)]
    assert len(dead) == 4 and dead["similarity"].isna().all() and not dead["activated"].any()
    # method 1 of class 7, relu3, recomputed independently
    gbp, _ = sim.channel_guided_backprop(model, images[7], "features.relu3")
    rows = table[(table["class"] == 7) & (table["layer"] == "features.relu3") & (table["method"] == 1)]
    expected = sim.cosine_similarity(gbp, images[7]).numpy()
    np.testing.assert_allclose(rows["similarity"].to_numpy(), expected, rtol=1e-6)
    v = visuals[(7, "features.relu3", 1)]
    assert v.top[0] == int(np.nanargmax(expected)) and v.bottom[0] == int(np.nanargmin(expected))
    assert v.top_maps.shape == (3, 3, 32, 32)
    with pytest.raises(UserError, match="--method"):
        sim.neuron_similarities(model, images, ["features.relu1"], methods=(3,))


def test_layer_curves_hand_computed():
    table = pd.DataFrame({
        "class": [0, 0, 0, 1, 1, 1], "layer": ["a", "a", "b", "a", "a", "b"],
        "neuron": [0, 1, 0, 0, 1, 0], "method": 1,
        "similarity": [0.1, 0.3, np.nan, 0.5, 0.9, 0.2]})
    table["layer"] = pd.Categorical(table["layer"], categories=["a", "b"], ordered=True)
    curves = sim.layer_curves(table).set_index(["class", "layer"])
    assert curves.loc[("0", "a"), "mean"] == pytest.approx(0.2)
    assert curves.loc[("0", "a"), "std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert curves.loc[("0", "b"), "n_nan"] == 1
    assert curves.loc[("all", "a"), "mean"] == pytest.approx((0.2 + 0.7) / 2)
    assert curves.loc[("all", "a"), "std"] == pytest.approx(
        (np.std([0.1, 0.3], ddof=1) + np.std([0.5, 0.9], ddof=1)) / 2)
    assert curves.loc[("all", "b"), "mean"] == pytest.approx(0.2)


# ---- pruning check --------------------------------------------------------------------------

def test_zero_channels_zeroes_exactly_those_and_restores_the_model():
    model = digits_handle()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layer = model.layer("features.relu3")
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    try:
        with torch.no_grad():
            before = model(x)
            clean = seen["out"]
            with sim.zero_channels(model, {"features.relu3": [0, 5, 7]}):
                pruned_logits = model(x)
            pruned = seen["out"]
            after = model(x)
    finally:
        handle.remove()
    # our hook was registered after theirs in the block, so `seen` holds the unpruned output;
    # read the pruned one through the next layer's input instead
    assert torch.equal(clean, pruned)
    inputs = {}
    handle = model.net.features.conv4.register_forward_pre_hook(
        lambda m, i: inputs.__setitem__("x", i[0].detach().clone()))
    try:
        with torch.no_grad(), sim.zero_channels(model, {"features.relu3": [0, 5, 7]}):
            model(x)
    finally:
        handle.remove()
    zeroed = inputs["x"]
    assert torch.all(zeroed[:, [0, 5, 7]] == 0)
    keep = [c for c in range(32) if c not in (0, 5, 7)]
    assert torch.equal(zeroed[:, keep], clean[:, keep])
    assert clean[:, [0, 5, 7]].abs().sum() > 0
    assert not torch.equal(pruned_logits, before)
    assert torch.equal(after, before) and no_hooks_left(model.net)


def test_pruning_table_zeroes_top_and_bottom_by_mean_similarity():
    model = digits_handle()
    # similarity of neuron k = k / 100 for class 0 and k / 50 for class 1 (same ranking);
    # neuron 3 never visualised
    rows = [{"class": c, "layer": "features.relu1", "neuron": k, "method": 1,
             "similarity": np.nan if k == 3 else k / (100 if c == 0 else 50)}
            for c in (0, 1) for k in range(16)]
    table = pd.DataFrame(rows)
    infos = sim.probe_layers(model, ["features.relu1"])
    test = sim.ImageSplit(torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                          torch.arange(40) % 10)
    result = sim.pruning_table(model, table, infos, test, ratio=0.25).iloc[0]
    assert result["pruned"] == 4 and result["never_visualised"] == 1
    with sim.zero_channels(model, {"features.relu1": [12, 13, 14, 15]}):
        top = sim.accuracy(model, test)
    with sim.zero_channels(model, {"features.relu1": [0, 1, 2, 4]}):  # 3 is skipped
        bottom = sim.accuracy(model, test)
    assert result["acc_prune_top"] == top and result["acc_prune_bottom"] == bottom
    assert result["difference"] == pytest.approx(bottom - top)
    assert result["acc_baseline"] == sim.accuracy(model, test)
    assert 0 <= result["acc_prune_random"] <= 100
    # every random draw of 4 from a pool of 4 is the same pruning
    assert sim_pruning._random_pruning_accuracy(model, test, "features.relu1", [0, 1, 2, 4], 4, 3, 0) == bottom
    again = sim.pruning_table(model, table, infos, test, ratio=0.25).iloc[0]
    assert again["acc_prune_random"] == result["acc_prune_random"]  # seeded
    with pytest.raises(UserError, match="--ratio"):
        sim.pruning_table(model, table, infos, test, ratio=1.5)


def test_accuracy_hand_checked():
    model = digits_handle()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 10
    assert sim.accuracy(model, sim.ImageSplit(images, labels), batch_size=4) == pytest.approx(400 / 6)


# ---- embedded default -----------------------------------------------------------------------

def test_digits_data_split():
    train, test = sim.digits_data()
    assert train.images.shape == (1347, 3, 32, 32) and test.images.shape == (450, 3, 32, 32)
    assert train.images.min() >= 0 and train.images.max() <= 1
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_checkpoint_roundtrip_and_wrong_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    net = sim.build_digits_vgg()
    path = tmp_path / "digits-vgg.pt"
    sim.save_digits_checkpoint(net, 12.5, path)
    loaded = sim.DigitsVGG(weights=str(path)).load()
    assert loaded.extra["test_accuracy"] == 12.5 and loaded.input_size == 32
    for a, b in zip(net.state_dict().values(), loaded.module.state_dict().values()):
        assert torch.equal(a, b)
    torch.save({"arch": "resnet-something", "state_dict": {}}, path)
    with pytest.raises(UserError, match="belongs to architecture 'resnet-something'"):
        sim.DigitsVGG(weights=str(path)).load()
    with pytest.raises(UserError, match="not found"):
        sim.DigitsVGG(weights=str(tmp_path / "missing.pt")).load()


def test_the_shipped_digits_model_is_the_default_and_scores_what_it_records():
    loaded = sim.DigitsVGG().load()
    assert loaded.weights == str(sim.SHIPPED_DIGITS_WEIGHTS)
    _, test = sim.digits_data()
    with torch.inference_mode():
        predicted = loaded.module((test.images - 0.5) / 0.5).argmax(dim=1)
    accuracy = 100.0 * (predicted == test.labels).float().mean().item()
    assert accuracy == pytest.approx(loaded.extra["test_accuracy"], abs=1e-6)
    assert accuracy > 90


def test_cli_end_to_end_on_digits(tmp_path):
    from xbench.cli import main

    weights = tmp_path / "random-digits-vgg.pt"
    torch.manual_seed(0)
    sim.save_digits_checkpoint(sim.build_digits_vgg().eval(), 10.0, weights)
    out = tmp_path / "out"
    code = main(["similarity", "--weights", str(weights), "--layers",
                 "features.relu1,features.relu5", "--classes", "0,3",
                 "--ascent-steps", "2", "--top-k", "5", "--ratio", "0.25", "--output", str(out)])
    assert code == 0
    for name in ("similarity.csv", "layer_curves.csv", "layer_curves.png", "pruning.csv",
                 "top_bottom.csv", "averages.png", "run.json", "neurons/method2_class3.png"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "similarity.csv")
    assert len(table) == 2 * (16 + 64) * 2
    pruning = pd.read_csv(out / "pruning.csv")
    assert list(pruning["layer"]) == ["features.relu1", "features.relu5"] * 2
    assert list(pruning["pruned"]) == [4, 16] * 2
    assert pruning["acc_prune_random"].between(0, 100).all()
    info = json.loads((out / "run.json").read_text())
    assert info["classes"] == [0, 3] and info["ratio"] == 0.25
    assert main(["similarity", "--ratio", "2", "--output", str(out)]) == 2
    assert main(["similarity", "--classes", "12", "--output", str(out)]) == 2


# ---- the model-scope metric similarity-value ---------------------------------------------------

def test_similarity_value_metric_by_hand_with_a_dead_neuron():
    from xbench import MetricBatch

    model = digits_handle()
    conv = model.net.features.conv5 if hasattr(model.net.features, "conv5") else [
        m for m in model.net.features if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():  # channel 0 of the last conv never fires: no visualisation
        conv.weight[0] = 0
        conv.bias[0] = -1
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([3, 7])
    batch = MetricBatch(model=model, images=images, targets=targets, saliency=None,
                        degenerate=None, clean_probs=torch.ones(2), explain_forward=None,
                        explain_backward=None, explain_seconds=None)
    metric = sim.SimilarityValue(layer="features.relu5", neurons=None, channel_batch=5)
    scores = metric.score(batch)
    assert set(scores) == {"method=1,layer=features.relu5,neurons=all",
                           "method=2,layer=features.relu5,neurons=all"}
    for i in range(2):
        single, _ = sim.channel_guided_backprop(model, images[i], "features.relu5", channel_batch=1)
        flat = single.reshape(len(single), -1).double().numpy()
        assert not flat[0].any()  # the dead neuron
        phi = sim.class_guided_backprop(model, images[i], int(targets[i])).reshape(-1).double().numpy()
        for key, reference in (("method=1", images[i].reshape(-1).double().numpy()), ("method=2", phi)):
            alive = flat[np.linalg.norm(flat, axis=1) > 0]  # channel 0 and any other dead one
            cosines = alive @ reference / (np.linalg.norm(alive, axis=1) * np.linalg.norm(reference))
            value = scores[f"{key},layer=features.relu5,neurons=all"][i].item()
            assert value == pytest.approx(cosines.mean(), rel=1e-6)
    assert no_hooks_left(model.net)


def test_similarity_value_spreads_neurons_and_validates_options():
    assert sim.spread_channels(10, 4).tolist() == [0, 3, 6, 9]
    assert sim.spread_channels(3, 8).tolist() == [0, 1, 2]
    assert sim.spread_channels(5, None).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="methods"):
        sim.SimilarityValue(methods=(3,))
    with pytest.raises(ValueError, match="neurons"):
        sim.SimilarityValue(neurons=0)


def test_similarity_value_runs_once_per_image_and_only_when_asked(tmp_path):
    from xbench.cli import main
    from xbench.records import RunFolder

    out = tmp_path / "results"
    assert main(["run", "--explainers", "gradcam", "--metrics", "similarity-value,average-drop",
                 "--limit", "2", "--output", str(out), "-o", "similarity-value.neurons=4",
                 "-o", "similarity-value.methods=1"]) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    rows = [r for r in RunFolder(run).rows() if r.metric == "similarity-value"]
    assert len(rows) == 2 and all(r.explainer == "" and r.status == "ok" for r in rows)
    assert {r.variant for r in rows} == {"method=1,layer=_swish._bn1,neurons=4"}
    text = (out / "LEADERBOARD.md").read_text()
    assert "Model-scope metrics" in text and "similarity-value@method=1,layer=_swish._bn1,neurons=4" in text
    from xbench.plugins import build_registry
    from xbench.runner import RunConfig, Runner

    runner = Runner(RunConfig(explainers="gradcam", metrics="all"), build_registry(), tmp_path)
    assert "similarity-value" not in runner.metric_names and "average-drop" in runner.metric_names
