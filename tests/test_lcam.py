"""L-CAM-Fm / L-CAM-Img: head, tails, loss, training, checkpoints and one-pass inference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from xbench import LoadedModel
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench_plugins import lcam

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class ToyNet(nn.Module):
    """conv(3->4) 'features' -> ReLU -> global average pool -> fc(4->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, kernel_size=3, stride=4, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))


def toy_tail(net: ToyNet):
    return lambda features: net.fc(torch.relu(features).mean(dim=(2, 3)))


def toy_handle(seed: int = 0, name: str = "toy") -> ClassifierHandle:
    torch.manual_seed(seed)
    loaded = LoadedModel(module=ToyNet().eval(), input_size=32, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25), class_names=("a", "b", "c"),
                         default_layer="features")
    return ClassifierHandle(loaded, name=name)


def toy_checkpoint(tmp_path: Path, variant: str = "fm", model: str = "toy") -> Path:
    torch.manual_seed(1)
    head = lcam.AttentionHead(4, 3)
    path = tmp_path / f"{variant}.pt"
    lcam.save_checkpoint(path, head, lcam.HeadInfo(model=model, layer="features", variant=variant,
                                                   num_classes=3, in_channels=4, seed=1))
    return path


# ---- attention head -------------------------------------------------------------------------

def test_head_shape_and_class_indexing():
    head = lcam.AttentionHead(in_channels=3, num_classes=5)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.copy_(torch.arange(5.0) * 10)
        head.conv.weight[2, 1] = 1.0  # class 2 reads channel 1
        head.conv.weight[4, 0] = -2.0  # class 4 reads channel 0 (negated, doubled)
    features = torch.randn(2, 3, 4, 6)
    maps = head(features)
    assert maps.shape == (2, 5, 4, 6)
    torch.testing.assert_close(maps[:, 2], features[:, 1] + 20)
    torch.testing.assert_close(maps[:, 4], -2 * features[:, 0] + 40)
    torch.testing.assert_close(maps[:, 0], torch.zeros(2, 4, 6))
    selected = head.class_maps(features, torch.tensor([4, 2]))
    assert selected.shape == (2, 4, 6)
    torch.testing.assert_close(selected[0], maps[0, 4])
    torch.testing.assert_close(selected[1], maps[1, 2])


def test_class_maps_rejects_bad_input():
    head = lcam.AttentionHead(3, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        head.class_maps(torch.randn(1, 3, 2, 2), torch.tensor([5]))
    with pytest.raises(ValueError, match="expects features"):
        head.class_maps(torch.randn(1, 4, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="one class per image"):
        head.class_maps(torch.randn(2, 3, 2, 2), torch.tensor([0]))


# ---- tails: all-ones mask == frozen model -------------------------------------------------------

def _check_all_ones_reproduces(net: nn.Module, loaded: LoadedModel, layer: str, name: str):
    handle = ClassifierHandle(loaded, name=name)
    images = torch.rand(2, 3, loaded.input_size, loaded.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = handle(images)
        features = lcam.layer_features(handle, layer, images)
        tail = lcam.classifier_tail(handle.net, layer)
        ones = torch.ones(features.shape[0], *features.shape[2:])
        got = lcam.masked_logits_fm(tail, features, ones)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layer", ["_swish._bn1", "_bn1"])
def test_all_ones_mask_reproduces_efficientnet_lite0(layer):
    from xbench_plugins.efficientnet_lite import EfficientNetLite0

    loaded = EfficientNetLite0().load()
    _check_all_ones_reproduces(loaded.module, loaded, layer, "efficientnet-lite0")


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("vgg11", "features.19")])
def test_all_ones_mask_reproduces_torchvision(arch, layer):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None).eval()
    loaded = LoadedModel(module=net, input_size=64, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225), class_names=tuple(map(str, range(1000))),
                         default_layer=layer)
    _check_all_ones_reproduces(net, loaded, layer, arch)


def test_unsupported_tail_is_a_clear_error():
    with pytest.raises(UserError, match="L-CAM-Img"):
        lcam.classifier_tail(ToyNet(), "features")
    net = torchvision.models.resnet18(weights=None)
    with pytest.raises(UserError, match="'layer4'"):
        lcam.classifier_tail(net, "layer3")


# ---- loss ------------------------------------------------------------------------------------

def test_loss_terms_match_hand_computed_values():
    masks = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # one 2x2 checkerboard mask
    # TV: vertical diffs (1, 1) and horizontal diffs (1, 1) squared -> 4; edges: each of the 4
    # lines holds one 1 -> 4, times border 0.3 -> 1.2; / (power 2 * batch 1) -> 2.6
    assert float(lcam.total_variation(masks, power=2, border=0.3)) == pytest.approx(2.6)
    assert float(lcam.total_variation(masks, power=2, border=0.0)) == pytest.approx(2.0)
    # area: mean of (A + eps)^0.3 = (2 * eps^0.3 + 2 * (1 + eps)^0.3) / 4
    eps = 0.0005
    expected_area = (2 * eps ** 0.3 + 2 * (1 + eps) ** 0.3) / 4
    assert float(lcam.area_term(masks, power=0.3, eps=eps)) == pytest.approx(expected_area)
    assert float(lcam.area_term(masks, power=1)) == pytest.approx(0.5)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    terms = lcam.lcam_loss(logits, torch.tensor([1]), masks)
    assert float(terms["ce"]) == pytest.approx(1.5 * -math.log(0.75))
    assert float(terms["area"]) == pytest.approx(2.0 * expected_area)
    assert float(terms["tv"]) == pytest.approx(0.01 * 2.6)
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"] + terms["area"] + terms["tv"]))


def test_total_variation_is_a_per_image_average():
    mask = torch.rand(1, 3, 3)
    single = lcam.total_variation(mask)
    torch.testing.assert_close(lcam.total_variation(mask.repeat(4, 1, 1)), single)
    assert float(lcam.total_variation(torch.zeros(2, 3, 3))) == 0.0


# ---- training --------------------------------------------------------------------------------

def _train(variant: str, steps: int = 60) -> list[float]:
    model = toy_handle()
    lcam.freeze(model)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    torch.manual_seed(3)
    images = torch.rand(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    head = lcam.AttentionHead(4, 3)
    config = lcam.TrainConfig(variant=variant, epochs=1, lr=0.05)
    optimizer = lcam.make_optimizer(head, config)
    losses = []
    for _ in range(steps):
        features = lcam.layer_features(model, "features", images)
        with torch.enable_grad():
            stats = lcam.train_step(head, optimizer, config, labels, features,
                                    tail=toy_tail(model.net), model=model, images=images)
        losses.append(stats.loss)
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone must stay frozen"
    return losses


@pytest.mark.parametrize("variant", ["fm", "img"])
def test_training_steps_reduce_the_loss(variant):
    losses = _train(variant)
    assert losses[-1] < 0.8 * losses[0]
    checkpoints = losses[::10]
    assert all(b < a for a, b in zip(checkpoints, checkpoints[1:]))


def test_sgd_optimizer_doubles_the_bias_learning_rate():
    head = lcam.AttentionHead(4, 3)
    optimizer = lcam.make_optimizer(head, lcam.TrainConfig(variant="fm", epochs=1, lr=0.1,
                                                           optimizer="sgd"))
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]


def test_train_config_rejects_bad_values():
    with pytest.raises(UserError, match="--variant"):
        lcam.TrainConfig(variant="both", epochs=1)
    with pytest.raises(UserError, match="--epochs"):
        lcam.TrainConfig(variant="fm", epochs=0)


def test_augmented_view_center_and_random():
    square = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    torch.testing.assert_close(lcam.augmented_view(square, 4, None), square[..., 1:5, 1:5])
    views = lcam.augmented_view(square, 4, torch.Generator().manual_seed(0))
    again = lcam.augmented_view(square, 4, torch.Generator().manual_seed(0))
    assert views.shape == (2, 3, 4, 4) and torch.equal(views, again)


# ---- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    head = lcam.AttentionHead(4, 3)
    info = lcam.HeadInfo(model="toy", layer="features", variant="img", num_classes=3,
                         in_channels=4, command="xbench train lcam ...", seed=7)
    path = tmp_path / "head.pt"
    lcam.save_checkpoint(path, head, info, training={"epoch": 2})
    raw = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert raw["info"]["model"] == "toy" and raw["info"]["seed"] == 7
    loaded, loaded_info, training = lcam.load_checkpoint(path)
    assert loaded_info == info and training == {"epoch": 2}
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    lcam.save_checkpoint(tmp_path / "half.pt", head, info, half=True)
    half, _, none = lcam.load_checkpoint(tmp_path / "half.pt")
    assert none is None and half.conv.weight.dtype == torch.float32
    torch.testing.assert_close(half.conv.weight, head.conv.weight, atol=1e-3, rtol=1e-3)


def test_mismatched_model_is_refused(tmp_path):
    path = toy_checkpoint(tmp_path, model="toy")
    explainer = lcam.LCAMFm(checkpoint=str(path))
    other = toy_handle(name="resnet50")
    with pytest.raises(UserError, match=r"trained for model 'toy'.*not for 'resnet50'.*xbench train lcam"):
        explainer.explain(other, torch.rand(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(UserError, match="lcam-fm"):
        lcam.LCAMImg(checkpoint=str(path)).explain(toy_handle(), torch.rand(1, 3, 32, 32),
                                                   torch.tensor([0]))
    with pytest.raises(UserError, match="--layer"):
        lcam.LCAMFm(layer="fc", checkpoint=str(path)).explain(toy_handle(), torch.rand(1, 3, 32, 32),
                                                              torch.tensor([0]))


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        lcam.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an xbench L-CAM checkpoint"):
        lcam.load_checkpoint(tmp_path / "other.pt")


def test_no_shipped_head_says_how_to_train():
    with pytest.raises(UserError, match=r"no shipped .* head for model 'toy'.*xbench train lcam --model toy"):
        lcam.LCAMFm().explain(toy_handle(), torch.rand(1, 3, 32, 32), torch.tensor([0]))


# ---- inference -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,variant", [(lcam.LCAMFm, "fm"), (lcam.LCAMImg, "img")])
def test_one_forward_pass_per_image_and_map_value(tmp_path, cls, variant):
    path = toy_checkpoint(tmp_path, variant)
    model = toy_handle()
    images = torch.rand(3, 3, 32, 32)
    targets = torch.tensor([2, 0, 1])
    explainer = cls(checkpoint=str(path))
    assert explainer.needs_gradients is False
    with torch.no_grad(), model.counting() as counts:
        maps = explainer.explain(model, images, targets)
    assert counts == {"forward": 3, "backward": 0}
    assert not model.net.features._forward_hooks, "the capture hook must be removed"
    head, _, _ = lcam.load_checkpoint(path)
    with torch.no_grad():
        features = model.net.features(model.normalize(images))
        expected = torch.sigmoid(head(features))[torch.arange(3), targets]
    torch.testing.assert_close(maps, expected)
    assert explainer.variant.startswith(f"checkpoint={variant}.pt@")


@pytest.mark.real_data
def test_shipped_heads_give_finite_maps_on_efficientnet_lite0():
    if not (DATA / "imagenet_sample_1000").is_dir():
        pytest.skip("../shared/data is absent")
    from xbench.data import load_image
    from xbench_plugins.efficientnet_lite import EfficientNetLite0

    shipped = sorted(lcam.ASSETS.glob("lcam-*_efficientnet-lite0.pt"))
    assert lcam.default_checkpoint("fm", "efficientnet-lite0") in shipped
    model = ClassifierHandle(EfficientNetLite0().load(), name="efficientnet-lite0")
    path = sorted((DATA / "imagenet_sample_1000").glob("*.JPEG"))[0]
    images = load_image(path, 256, 224)[None]
    for file in shipped:
        assert file.stat().st_size < 10 * 2**20
        _, info, training = lcam.load_checkpoint(file)
        assert training is None and info.command.startswith("xbench train lcam")
        explainer = lcam.LCAMFm() if info.variant == "fm" else lcam.LCAMImg()
        with torch.no_grad(), model.counting() as counts:
            logits = model(images)
            maps = explainer.explain(model, images, logits.argmax(1))
        assert counts["forward"] == 2  # the prediction above plus exactly one for the map
        assert maps.shape == (1, 7, 7) and torch.isfinite(maps).all()
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1
        assert float(maps.max() - maps.min()) > 1e-3, "a trained head gives a non-constant map"


def test_zero_init_starts_at_half_masks():
    head = lcam.AttentionHead(4, 3, init="zero")
    maps = torch.sigmoid(head.class_maps(torch.randn(2, 4, 3, 3), torch.tensor([0, 2])))
    assert torch.equal(maps, torch.full((2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="'zero' or 'pytorch'"):
        lcam.AttentionHead(4, 3, init="xavier")


@pytest.mark.real_data
def test_train_command_checkpoints_resumes_and_ships(tmp_path):
    if not (DATA / "imagenet_sample_1000").is_dir():
        pytest.skip("../shared/data is absent")
    from xbench.cli import main

    out, ship = tmp_path / "train.pt", tmp_path / "ship.pt"
    common = ["train", "lcam", "--model", "efficientnet-lite0", "--variant", "fm", "--data",
              str(DATA / "imagenet_sample_1000"), "--limit", "4", "--batch-size", "2",
              "--output", str(out), "--seed", "3"]
    assert main(common + ["--epochs", "1"]) == 0
    _, info, training = lcam.load_checkpoint(out)
    assert (info.epochs_done, training["epoch"], info.seed) == (1, 1, 3)
    assert info.model == "efficientnet-lite0" and info.layer == "_swish._bn1" and info.num_classes == 1000
    assert main(common + ["--epochs", "2", "--resume", "--ship", str(ship)]) == 0
    _, info, training = lcam.load_checkpoint(out)
    assert training["epoch"] == 2 and "--resume" in info.command
    _, shipped_info, shipped_training = lcam.load_checkpoint(ship)
    assert shipped_training is None and shipped_info.epochs_done == 2
    assert main(common[:5] + ["img"] + common[6:] + ["--epochs", "3", "--resume"]) == 2  # refused
