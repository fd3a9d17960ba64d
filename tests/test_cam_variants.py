"""CAM variants (plugins/cam_variants.py) against pytorch-grad-cam called directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbench.data import load_image, sample_images
from xbench.errors import UserError
from xbench.model import ClassifierHandle, capture_activations
from xbench.plugins import build_registry
from xbench.saliency import normalize_maps
from xbench.testing import check_explainer, random_resnet18, toy_images, toy_model
from xbench_plugins.cam_variants import eigen_projection
from xbench_plugins.gradcam import target_layer_gradients

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

REGISTRY = build_registry()
PEERS = {"xgradcam": "XGradCAM", "hirescam": "HiResCAM",
         "gradcam-elementwise": "GradCAMElementWise", "eigencam": "EigenCAM",
         "eigengradcam": "EigenGradCAM"}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def peer_maps(peer_name, model, layer, images, targets) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, peer_name)(model=model, target_layers=[model.layer(layer)])
    try:
        out = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(out).float()


def ablation_peer(model, layer, images, targets) -> torch.Tensor:
    return peer_maps("AblationCAM", model, layer, images, targets)


@pytest.mark.parametrize("layer", ["block.1", "block"])  # post-ReLU: the peer ablates to 0 too
def test_ablation_cam_agrees_with_pytorch_grad_cam_on_the_toy(layer):
    model, images = toy_model(), toy_images(2, seed=4)
    targets = model.probabilities(images).argmax(dim=1)
    maps = explain("ablation-cam", model, images, targets, layer=layer, batch_size=5)
    mine, degenerate = normalize_maps(maps, images.shape[-2:])
    assert not degenerate.any()
    theirs = ablation_peer(model, layer, images, targets)
    for i in range(2):
        assert pearson(mine[i], theirs[i]) >= 0.999, (layer, i)


@pytest.mark.slow
def test_ablation_cam_agrees_on_random_resnet18(resnet18):
    """layer2 (K = 128, post-ReLU): layer4's 512 channels cost ~45 s for the two here."""
    images = toy_images(1, size=96, seed=8)
    targets = resnet18.probabilities(images).argmax(dim=1)
    maps = explain("ablation-cam", resnet18, images, targets, layer="layer2", batch_size=64)
    mine, degenerate = normalize_maps(maps, images.shape[-2:])
    assert not degenerate.any()
    assert pearson(mine[0], ablation_peer(resnet18, "layer2", images, targets)[0]) >= 0.999


def test_ablation_cam_weights_by_hand():
    """Toy head -> ReLU6 -> mean pool -> fc: zeroing channel k of the post-ReLU6 call site
    lowers y^c by fc.weight[c, k] * mean(A^k)."""
    model = toy_model()
    images = toy_images(1, seed=9)
    layer = "act.head"
    with capture_activations(model.layer(layer), keep_grad=False) as store:
        logits = model(images)
    a = store["activation"].detach()
    y = logits[0, 2].item()
    weights = model.net.fc.weight[2].detach() * a.mean(dim=(2, 3))[0] / y
    expected = torch.relu((weights[:, None, None] * a[0]).sum(dim=0))
    with model.counting() as counts:
        maps = explain("ablation-cam", model, images, torch.tensor([2]), layer=layer,
                       batch_size=3)
    assert torch.allclose(maps[0], expected, rtol=1e-4, atol=1e-6)
    assert counts == {"forward": 1 + 16, "backward": 0}
    # max_channels: only the 5 channels of largest mean activation are ablated, the rest
    # weigh 0, for 1 + 5 forwards
    top = a.mean(dim=(2, 3))[0].topk(5).indices
    kept = torch.zeros_like(weights)
    kept[top] = weights[top]
    expected = torch.relu((kept[:, None, None] * a[0]).sum(dim=0))
    with model.counting() as counts:
        maps = explain("ablation-cam", model, images, torch.tensor([2]), layer=layer,
                       batch_size=3, max_channels=5)
    assert torch.allclose(maps[0], expected, rtol=1e-4, atol=1e-6)
    assert counts == {"forward": 1 + 5, "backward": 0}


def explain(name, model, images, targets, layer=None, **options):
    with torch.enable_grad():
        return REGISTRY.explainer(name)(layer=layer, **options).explain(model, images, targets)


def assert_agrees(name, model, layer, images, targets):
    maps = explain(name, model, images, targets, layer=layer)
    mine, degenerate = normalize_maps(maps, images.shape[-2:])
    assert not degenerate.any()
    theirs = peer_maps(PEERS[name], model, layer or model.default_layer, images, targets)
    for i in range(len(images)):
        if name in ("eigencam", "eigengradcam"):
            # the peer keeps numpy's arbitrary SVD sign: it matches ours or the flipped one
            activation, gradient, _ = target_layer_gradients(model, layer, images[i:i + 1],
                                                             targets[i:i + 1])
            features = activation if name == "eigencam" else activation * gradient
            signed = eigen_projection(features)
            flipped, _ = normalize_maps(torch.relu(-signed), images.shape[-2:])
            best = max(pearson(mine[i], theirs[i]), pearson(flipped[0], theirs[i]))
            assert best >= 0.999, (name, layer, i, best)
        else:
            assert pearson(mine[i], theirs[i]) >= 0.999, (name, layer, i)


@pytest.mark.parametrize("name", [*PEERS, "ablation-cam"])
@pytest.mark.parametrize("layer", ["head", "stem"])
def test_conforms_on_every_layer(name, layer):
    assert REGISTRY.explainer(name).library == "xbench"
    check_explainer(REGISTRY.explainer(name), layer=layer)


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("layer", ["head", "block.0"])
def test_agrees_with_pytorch_grad_cam_on_the_toy(name, layer):
    model = toy_model()
    images = toy_images(3, seed=2)
    assert_agrees(name, model, layer, images, torch.tensor([1, 4, 8]))


@pytest.fixture(scope="module")
def lite0():
    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load(), name="lite0")
    paths = [path for _, path, _ in sample_images()[:2]]
    images = torch.stack([load_image(p, model.loaded.resize_size, model.input_size)
                          for p in paths])
    return model, images, model.probabilities(images).argmax(dim=1)


@pytest.fixture(scope="module")
def resnet18() -> ClassifierHandle:
    """torchvision ResNet-18 with random (seeded) weights, in-place ReLUs, 96 px input."""
    return random_resnet18(size=96)


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("layer", ["layer4"])
def test_agrees_with_pytorch_grad_cam_on_random_resnet18(name, layer, resnet18):
    images = toy_images(2, size=96, seed=7)
    assert_agrees(name, resnet18, layer, images, torch.tensor([3, 6]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEERS))
def test_agrees_with_pytorch_grad_cam_on_efficientnet_lite0(name, lite0):
    model, images, targets = lite0
    assert_agrees(name, model, None, images, targets)


def test_eigen_sign_rule_is_the_peers_sign_correction():
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    features = torch.randn(3, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    ours = eigen_projection(features)
    theirs = get_2d_projection_with_sign_correction(features.numpy())
    assert np.allclose(ours.numpy(), theirs, atol=1e-5)
    assert (ours.amax(dim=(1, 2)) >= ours.amin(dim=(1, 2)).abs()).all()


def test_eigencam_of_a_rank_one_layer_is_its_spatial_pattern():
    """A = u(position) x c(channel): the centred matrix is rank one, so the first component
    recovers u - mean(u) up to scale (and the sign rule picks +)."""
    u = torch.tensor([[0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    channels = torch.tensor([1.0, 2.0, -0.5, 3.0])
    features = channels[None, :, None, None] * u[None, None]
    projection = eigen_projection(features)[0]
    centred = u - u.mean()
    scale = (projection * centred).sum() / centred.pow(2).sum()
    assert torch.allclose(projection, scale * centred, atol=1e-5)
    assert scale > 0 and scale == pytest.approx(channels.norm().item(), rel=1e-5)
    active = eigen_projection(features, "activation", features)[0]
    # mean activation over channels is 1.375 u, positively correlated: no flip
    assert torch.allclose(active, projection)
    assert torch.allclose(eigen_projection(-features, "activation", -features)[0], -projection)


def test_xgradcam_and_elementwise_by_hand():
    a = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, K=2, 1, 2)
    g = torch.tensor([[[[2.0, -1.0]], [[-1.0, 5.0]]]])
    from xbench_plugins.cam_variants import xgradcam_map

    # w_1 = (1*2 + 3*-1) / 4 = -0.25; w_2 = (2*-1 + 0) / 2 = -1
    expected = torch.relu(-0.25 * a[0, 0] - 1.0 * a[0, 1])
    assert torch.allclose(xgradcam_map(a, g, 0.0), expected)
    assert torch.equal(torch.relu(g * a).sum(dim=1), torch.tensor([[[2.0, 0.0]]]))


@pytest.mark.parametrize("name, forward, backward", [
    ("xgradcam", 1, 1), ("hirescam", 1, 1), ("gradcam-elementwise", 1, 1), ("eigencam", 1, 0),
    ("eigengradcam", 1, 1)])
def test_pass_counts(name, forward, backward):
    model = toy_model()
    with model.counting() as counts:
        explain(name, model, toy_images(3), torch.tensor([0, 1, 2]))
    assert (counts["forward"], counts["backward"]) == (3 * forward, 3 * backward)


@pytest.mark.parametrize("name", [*PEERS, "ablation-cam"])
def test_unknown_layer_and_bad_options(name):
    with pytest.raises(UserError, match="no layer 'nope'"):
        explain(name, toy_model(), toy_images(1), torch.tensor([0]), layer="nope")
    with pytest.raises(ValueError, match="eigencam.*sign"):
        REGISTRY.explainer("eigencam")(sign="positive")


# --- KPCA-CAM, ShapleyCAM, FinerCAM, RandomCAM (pytorch-grad-cam 1.5.7's definitions) --------

NEW = ["kpca-cam", "shapleycam", "finercam", "randomcam"]


def new_peer(name, model, layer, images, targets, seed=0) -> torch.Tensor:
    """pytorch-grad-cam's map, image by image (RandomCAM draws from numpy's global generator,
    seeded here as the plugin seeds its per-image RandomState)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    from xbench_plugins.controls import image_seed

    module = [model.layer(layer)]
    if name == "finercam":  # the peer chooses the main class itself: the top-1, as our targets
        cam = pytorch_grad_cam.FinerCAM(model, module)
        try:
            return torch.from_numpy(cam(images)).float()
        finally:
            cam.base_cam.activations_and_grads.release()
    peer = {"kpca-cam": "KPCA_CAM", "shapleycam": "ShapleyCAM", "randomcam": "RandomCAM"}[name]
    target = ClassifierOutputReST if name == "shapleycam" else ClassifierOutputTarget
    cam = getattr(pytorch_grad_cam, peer)(model=model, target_layers=module)
    outs = []
    try:
        for i in range(len(images)):
            np.random.seed(image_seed(seed, images[i]) % 2 ** 32)
            outs.append(cam(input_tensor=images[i:i + 1], targets=[target(int(targets[i]))]))
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.concatenate(outs)).float()


def assert_new_agrees(name, model, layer, images):
    targets = model.probabilities(images).argmax(dim=1)
    mine, degenerate = normalize_maps(explain(name, model, images, targets, layer=layer),
                                      images.shape[-2:])
    theirs = new_peer(name, model, layer, images, targets)
    for i in range(len(images)):
        if degenerate[i]:  # an all-zero ReLU (RandomCAM can draw one): the peer's too
            assert theirs[i].abs().max() < 1e-6, (name, layer, i)
        else:
            assert pearson(mine[i], theirs[i]) >= 0.999, (name, layer, i)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("layer", ["head", "block.0"])
def test_new_variants_agree_with_pytorch_grad_cam_on_the_toy(name, layer):
    assert_new_agrees(name, toy_model(), layer, toy_images(2, seed=3))


@pytest.mark.parametrize("name", NEW)
def test_new_variants_agree_on_random_resnet18(name, resnet18):
    assert_new_agrees(name, resnet18, "layer4", toy_images(2, size=96, seed=3))


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_new_variants_agree_on_efficientnet_lite0(name, lite0):
    model, images, _ = lite0
    assert_new_agrees(name, model, model.default_layer, images[:1])


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("layer", ["head", "stem"])
def test_new_variants_conform_on_every_layer(name, layer):
    assert REGISTRY.explainer(name).library == "xbench"
    check_explainer(REGISTRY.explainer(name), layer=layer)


@pytest.mark.parametrize("name, options, forward, backward", [
    ("kpca-cam", {}, 1, 0), ("randomcam", {}, 1, 0), ("finercam", {}, 1, 1),
    ("shapleycam", {}, 1, 2), ("shapleycam", {"score": "logit"}, 1, 1)])
def test_new_pass_counts(name, options, forward, backward):
    model = toy_model()
    with model.counting() as counts:
        explain(name, model, toy_images(3), torch.tensor([0, 1, 2]), **options)
    assert (counts["forward"], counts["backward"]) == (3 * forward, 3 * backward)


def test_kpca_linear_kernel_is_eigencam_and_lobpcg_is_the_dense_pair():
    """With k(x, y) = x.y the centred kernel matrix is X X^T, whose top eigenvector is the
    first left singular vector of X: KPCA-CAM's map is EigenCAM's up to the scale
    sqrt(lambda_1) / sigma_1 = 1. LOBPCG finds the same pair as the dense solver."""
    from xbench_plugins.cam_variants import kernel_pca_projection

    features = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(1))
    linear = kernel_pca_projection(features, "linear")
    assert torch.allclose(linear, eigen_projection(features), atol=1e-4)
    sigmoid = kernel_pca_projection(features)
    assert torch.allclose(kernel_pca_projection(features, dense_limit=3), sigmoid, atol=1e-4)
    assert not torch.allclose(sigmoid / sigmoid.norm(), linear / linear.norm(), atol=1e-2)


def test_shapleycam_logit_on_a_piecewise_linear_net_is_gradcam():
    """ReLU6 network, logit score: H A = 0, so the weights are Grad-CAM's mean gradient."""
    model, images, targets = toy_model(), toy_images(2, seed=5), torch.tensor([3, 7])
    assert torch.allclose(explain("shapleycam", model, images, targets, layer="head",
                                  score="logit"),
                          explain("gradcam", model, images, targets, layer="head"), atol=1e-6)
    assert not torch.allclose(explain("shapleycam", model, images, targets, layer="head"),
                              explain("gradcam", model, images, targets, layer="head"),
                              atol=1e-4)


def test_finercam_with_alpha_0_and_one_comparison_is_gradcam():
    """alpha = 0, eps = 0: the score p_j y^c / p_j is y^c itself, so the map is Grad-CAM's."""
    model, images, targets = toy_model(), toy_images(2, seed=6), torch.tensor([1, 2])
    mine = explain("finercam", model, images, targets, layer="head", alpha=0.0, comparisons=1,
                   eps=0.0)
    assert torch.allclose(mine, explain("gradcam", model, images, targets, layer="head"),
                          rtol=1e-4, atol=1e-6)


def test_randomcam_is_seeded_per_image():
    model, images = toy_model(), toy_images(3, seed=7)
    targets = torch.tensor([0, 1, 2])
    a = explain("randomcam", model, images, targets, layer="head")
    assert torch.equal(a, REGISTRY.explainer("randomcam")(layer="head", seed=0).explain(
        model, images, targets))
    assert torch.equal(a[1:], explain("randomcam", model, images[1:], targets[1:], layer="head"))
    b = REGISTRY.explainer("randomcam")(layer="head", seed=1).explain(model, images, targets)
    assert not torch.equal(a, b)
