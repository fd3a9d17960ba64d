"""Gradient CAMs (Grad-CAM, Grad-CAM++, LayerCAM): peer agreement, known answers, pass counts.

Peers: pytorch-grad-cam (PyPI ``grad-cam``) on EfficientNet-Lite0 with its real weights and
real photos, compared after the harness's upsampling and min-max normalisation.
Pass counts of every explainer of issue 3 are checked here against docs/protocol.md "Cost".
"""

from __future__ import annotations

import pytest
import torch

from xbench.data import load_image, sample_images
from xbench.errors import UserError
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.saliency import normalize_maps
from xbench.testing import check_explainer, toy_images, toy_model
from xbench_plugins.gradcam import GradCAM, target_layer_gradients
from xbench_plugins.gradcampp import GradCAMPlusPlus, gradcampp_weights
from xbench_plugins.guided_backprop import GuidedBackprop, GuidedGradCAM
from xbench_plugins.layercam import LayerCAM, layercam_map
from xbench_plugins.rise import RISE
from xbench_plugins.scorecam import ScoreCAM

REGISTRY = build_registry()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def lite0() -> ClassifierHandle:
    loaded = REGISTRY.model("efficientnet-lite0")().load()
    return ClassifierHandle(loaded, name="efficientnet-lite0")


@pytest.fixture(scope="module")
def photos(lite0) -> torch.Tensor:
    """Two embedded photos (cat, espresso), preprocessed as the harness does."""
    paths = [path for _, path, _ in sample_images()[:2]]
    return torch.stack([load_image(p, lite0.loaded.resize_size, lite0.input_size) for p in paths])


def test_registered_names():
    names = set(REGISTRY.names("explainer"))
    assert {"gradcam++", "layercam", "scorecam", "rise", "guided-backprop",
            "guided-gradcam"} <= names


@pytest.mark.parametrize("cls", [GradCAMPlusPlus, LayerCAM, ScoreCAM, GuidedGradCAM])
@pytest.mark.parametrize("layer", ["stem", "bn", "block.0", "head"])
def test_layer_explainers_conform_on_every_layer(cls, layer):
    """Any module name works as --layer, shallow (32x32) to deep (16x16); no hooks left."""
    maps = check_explainer(cls, layer=layer)
    assert maps.shape[-1] in (16, 32)


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, GuidedGradCAM])
def test_unknown_layer_is_a_user_error(cls):
    model = toy_model()
    images = toy_images(1)
    with pytest.raises(UserError, match="no layer 'nope'"):
        with torch.enable_grad():
            cls(layer="nope").explain(model, images, torch.tensor([0]))


# ---------------------------------------------------------------- peers: pytorch-grad-cam

def _peer_maps(peer_cls, model: ClassifierHandle, layer: str, images: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.layer(layer)
    cam = peer_cls(model=model, target_layers=[module])
    try:
        out = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("ours, peer_name, layer, agreement", [
    # the default layer, post-activation ReLU6(_bn1): the CAM papers' kind of layer
    (GradCAM, "GradCAM", "_swish._bn1", 0.999),
    (LayerCAM, "LayerCAM", "_swish._bn1", 0.999),
    # the peer adds eps = 1e-6 to the alpha denominator 2 g^2 + sum(A) g^3: see the test below
    (GradCAMPlusPlus, "GradCAMPlusPlus", "_swish._bn1", 0.99),
    (GradCAM, "GradCAM", "_bn1", 0.99),  # pre-activation, still selectable by name
    (LayerCAM, "LayerCAM", "_blocks.3._swish._bn1", 0.99),  # shallow: 28x28 feature maps
])
def test_gradient_cams_agree_with_pytorch_grad_cam(lite0, photos, ours, peer_name, layer, agreement):
    import pytorch_grad_cam

    targets = lite0.probabilities(photos).argmax(dim=1)
    with torch.enable_grad():
        maps = ours(layer=layer).explain(lite0, photos, targets)
    mine, degenerate = normalize_maps(maps, photos.shape[-2:])
    assert not degenerate.any()
    theirs = _peer_maps(getattr(pytorch_grad_cam, peer_name), lite0, layer, photos, targets)
    for i in range(len(photos)):
        assert pearson(mine[i], theirs[i]) >= agreement, (peer_name, layer, i)


@pytest.mark.parametrize("ours, peer_name", [(GradCAM, "GradCAM"), (LayerCAM, "LayerCAM")])
def test_gradient_cams_agree_with_torchcam_at_the_default_layer(lite0, photos, ours, peer_name):
    methods = pytest.importorskip("torchcam.methods")
    targets = lite0.probabilities(photos).argmax(dim=1)
    with torch.enable_grad():
        mine, _ = normalize_maps(ours().explain(lite0, photos, targets), photos.shape[-2:])
    for i in range(len(photos)):
        extractor = getattr(methods, peer_name)(lite0, target_layer=lite0.layer(None),
                                                input_shape=(3, 224, 224))
        try:
            with torch.enable_grad():
                scores = lite0(photos[i:i + 1])
                (cam,) = extractor(int(targets[i]), scores)
        finally:
            extractor.remove_hooks()
        theirs, _ = normalize_maps(cam.detach(), photos.shape[-2:])
        assert pearson(mine[i], theirs[0]) >= 0.999, (peer_name, i)


def test_gradcampp_differs_from_pytorch_grad_cam_only_by_its_eps(lite0, photos):
    """Mid-network the peer's denominator eps (1e-6) is as large as 2 g^2 and bends its alpha
    (Pearson ~0.94 with the paper's formula here); with that eps added, the two are identical."""
    import pytorch_grad_cam

    layer = "_blocks.10._bn2"
    targets = lite0.probabilities(photos).argmax(dim=1)
    activation, gradient, _ = target_layer_gradients(lite0, layer, photos, targets)
    with_eps = torch.relu((gradcampp_weights(activation, gradient, eps=1e-6) * activation).sum(1))
    mine, _ = normalize_maps(with_eps, photos.shape[-2:])
    theirs = _peer_maps(pytorch_grad_cam.GradCAMPlusPlus, lite0, layer, photos, targets)
    for i in range(len(photos)):
        assert pearson(mine[i], theirs[i]) >= 0.9999


# ---------------------------------------------------------------- known answers

def test_gradcampp_weights_by_hand():
    """One channel, two locations: alpha = g^2 / (2 g^2 + sum(A) g^3), w = sum alpha relu(g)."""
    activation = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)  # sum_ab A = 4
    gradient = torch.tensor([0.5, -2.0]).view(1, 1, 1, 2)
    # location 0: 0.25 / (0.5 + 4 * 0.125) = 0.25; relu(g) = 0.5 -> 0.125
    # location 1: relu(g) = 0 -> contributes nothing (alpha = 4 / (8 - 32) = -1/6)
    assert gradcampp_weights(activation, gradient).flatten().tolist() == pytest.approx([0.125])


def test_gradcampp_zero_gradient_gives_zero_weight_not_nan():
    activation = torch.randn(2, 3, 4, 4)
    gradient = torch.zeros(2, 3, 4, 4)
    weights = gradcampp_weights(activation, gradient)
    assert torch.equal(weights, torch.zeros(2, 3, 1, 1))


def test_layercam_by_hand():
    """ReLU(sum_k ReLU(g) * A): negative gradients and negative sums are cut."""
    activation = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    gradient = torch.tensor([[[[2.0, 1.0]], [[-1.0, 0.5]]]])
    # location 0: 2*1 + 0*3 = 2; location 1: 1*(-2) + 0.5*4 = 0
    assert layercam_map(activation, gradient).flatten().tolist() == [2.0, 0.0]


def test_gradcam_on_the_toy_head_by_hand():
    """Toy head: y^c = sum_k v_k mean(ReLU6(A_k)) + b, so dy^c/dA_k = v_k / hw where 0 < A < 6
    and 0 elsewhere; the gradients and the Grad-CAM map match that closed form."""
    model = toy_model()
    images = toy_images(2)
    targets = torch.tensor([3, 7])
    activation, gradient, _ = target_layer_gradients(model, None, images, targets)
    v = model.net.fc.weight[targets][:, :, None, None]
    hw = activation.shape[-1] * activation.shape[-2]
    expected_grad = v / hw * ((activation > 0) & (activation < 6))
    torch.testing.assert_close(gradient, expected_grad)
    cam = GradCAM().explain(model, images, targets)
    expected = torch.relu((expected_grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1))
    torch.testing.assert_close(cam, expected)


# ---------------------------------------------------------------- pass counts (docs/protocol.md)

@pytest.mark.parametrize("cls, forward, backward", [
    (GradCAM, 1, 1), (GradCAMPlusPlus, 1, 1), (LayerCAM, 1, 1), (GuidedBackprop, 1, 1),
    (GuidedGradCAM, 1, 2),
])
def test_gradient_explainers_pass_counts(cls, forward, backward):
    model = toy_model()
    images = toy_images(3)
    with model.counting() as counts, torch.enable_grad():
        cls().explain(model, images, torch.tensor([0, 1, 2]))
    assert (counts["forward"], counts["backward"]) == (3 * forward, 3 * backward)


def test_scorecam_pass_count_is_one_plus_channels():
    model = toy_model()  # layer 'head': K = 16 channels, none constant on random images
    explainer = ScoreCAM(batch_size=5)
    with model.counting() as counts, torch.no_grad():
        explainer.explain(model, toy_images(2), torch.tensor([0, 1]))
    assert explainer.last_skipped.tolist() == [0, 0]
    assert counts == {"forward": 2 * (1 + 16), "backward": 0}


def test_rise_pass_count_is_n_masks():
    model = toy_model()
    with model.counting() as counts, torch.no_grad():
        RISE(n_masks=50, batch_size=16).explain(model, toy_images(3), torch.tensor([0, 1, 2]))
    assert counts == {"forward": 3 * 50, "backward": 0}
