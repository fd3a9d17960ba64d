"""FullGrad (plugins/fullgrad.py): the decomposition it rests on, and pytorch-grad-cam's map."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xbench.base import LoadedModel
from xbench.model import ClassifierHandle
from xbench.plugins import build_registry
from xbench.saliency import normalize_maps
from xbench.testing import check_explainer, random_resnet18, toy_images, toy_model
from xbench_plugins.fullgrad import layer_bias

REGISTRY = build_registry()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def explain(model, images, targets, **options):
    with torch.enable_grad():
        return REGISTRY.explainer("fullgrad")(**options).explain(model, images, targets)


def peer(model, images, targets) -> torch.Tensor:
    """pytorch-grad-cam's FullGrad on the bare network, fed the normalised images."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    mean = torch.tensor(model.loaded.mean)[:, None, None]
    std = torch.tensor(model.loaded.std)[:, None, None]
    cam = grad_cam.FullGrad(model.net, [])
    try:
        out = cam(input_tensor=(images - mean) / std,
                  targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(out).float()


def assert_agrees(model, images):
    targets = model.probabilities(images).argmax(dim=1)
    mine, degenerate = normalize_maps(explain(model, images, targets), images.shape[-2:])
    assert not degenerate.any()
    theirs = peer(model, images, targets)
    for i in range(len(images)):
        assert pearson(mine[i], theirs[i]) >= 0.999, i
    assert torch.allclose(mine, theirs, atol=1e-4)  # the same min-max too


def test_conforms():
    maps = check_explainer(REGISTRY.explainer("fullgrad"))
    assert REGISTRY.explainer("fullgrad").library == "xbench"
    check_explainer(REGISTRY.explainer("fullgrad"),
                    options={"rescale": "layer", "align_corners": True, "input_space": "pixel"})
    assert maps.shape[-2:] == (32, 32)


def test_agrees_with_pytorch_grad_cam_on_the_toy():
    assert_agrees(toy_model(), toy_images(2, seed=3))


def test_agrees_with_pytorch_grad_cam_on_random_resnet18():
    """In-place ReLUs after every batch norm: z_l is read before they overwrite it."""
    model = random_resnet18(size=64)
    assert_agrees(model, toy_images(2, size=64, seed=4))


@pytest.mark.slow
def test_agrees_with_pytorch_grad_cam_on_efficientnet_lite0():
    from xbench.data import load_image, sample_images

    model = ClassifierHandle(REGISTRY.model("efficientnet-lite0")().load(), name="lite0")
    image = load_image(sample_images()[0][1], model.loaded.resize_size, model.input_size)[None]
    assert_agrees(model, image)


def test_full_gradient_decomposition_is_complete_on_a_relu_toy():
    """The paper's eq. 2 on the toy with ReLU for ReLU6 (piecewise linear, no saturation):
    y^c = grad_n . x_n + sum_l grad_{z_l} . b_l + b_fc[c], with the biases layer_bias gives
    (a conv's, and beta - mu gamma / sigma for batch norm)."""
    handle = toy_model()
    net = copy.deepcopy(handle.loaded.module)
    net.act = nn.ReLU()
    model = ClassifierHandle(LoadedModel(**{**handle.loaded.__dict__, "module": net}))
    images, targets = toy_images(2, seed=5), torch.tensor([2, 6])
    outputs, biases = [], []

    def keep(module, _inputs, output):
        outputs.append(output)
        biases.append(layer_bias(module))

    handles = [m.register_forward_hook(keep) for m in net.modules() if layer_bias(m) is not None]
    x = images.clone().requires_grad_(True)
    logits = model(x)
    for h in handles:
        h.remove()
    assert len(outputs) == 4  # stem conv, batch norm, block conv, head conv
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), [x, *outputs])
    mean = torch.tensor(model.loaded.mean)[:, None, None]
    total = (grads[0] * (images - mean)).sum(dim=(1, 2, 3))
    total += sum((g * b[:, None, None]).sum(dim=(1, 2, 3)) for g, b in zip(grads[1:], biases))
    total += net.fc.bias[targets]
    assert torch.allclose(total, logits.gather(1, targets[:, None])[:, 0], atol=1e-4)


def test_options_change_the_map_and_the_variant():
    model, images, targets = toy_model(), toy_images(2, seed=6), torch.tensor([1, 3])
    base = explain(model, images, targets)
    for options in ({"rescale": "layer"}, {"align_corners": True}, {"input_space": "pixel"}):
        assert not torch.allclose(base, explain(model, images, targets, **options)), options
    assert REGISTRY.explainer("fullgrad")(rescale="layer").variant == "rescale=layer"


def test_pass_counts():
    model = toy_model()
    with model.counting() as counts:
        explain(model, toy_images(3), torch.tensor([0, 1, 2]))
    assert counts == {"forward": 3, "backward": 3}
