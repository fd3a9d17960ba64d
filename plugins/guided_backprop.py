"""Guided backpropagation (Springenberg et al., ICLR-W 2015) and Guided Grad-CAM (Selvaraju et
al., ICCV 2017).

Guided backprop changes only the backward rule of the rectifiers (paper sec. 3.4, fig. 1):
at every ReLU-family unit the gradient reaching its input is

    R_in = 1[forward input > 0] * d(x) * 1[R_out > 0] * R_out

where ``d(x)`` is the unit's own local derivative (1 on (0, 6) for ReLU6, so a saturated ReLU6
passes nothing, exactly as ordinary backprop would). The map handed to the metrics is the
channel-wise max of |dy^c/dx| in pixel space (docs/protocol.md "Explainers").

Why not captum's ``GuidedBackprop`` directly: it hooks ``nn.ReLU`` modules only, so on
EfficientNet-Lite (``nn.ReLU6``) it silently degrades to plain gradients. Swapping modules for
guided copies fails the other way: EfficientNet-Lite calls ONE ReLU6 object from several places
of a forward pass, and ``torch.relu`` calls are invisible to both. Here a forward hook on each
ReLU-family module puts a gradient hook on the *output tensor of every call*, so a module reused
k times is guided k times; in-place activations are fine because the graph is never rewritten.
captum's GuidedBackprop is the test oracle on plain-ReLU models (tests/test_explainers.py).

ReLU family handled: ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``. For ReLU and ReLU6 the rule
above equals captum's ``relu(grad_input)``. For LeakyReLU it follows docs/protocol.md literally ("pass
gradient only where the forward input and the incoming gradient are both positive"): the
negative-slope branch passes nothing. Other activations (SiLU, GELU, ...) keep their ordinary
gradient; a model without any ReLU-family module is refused with a clear error, because
guided backprop would then silently be plain gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from xbench import ClassifierHandle, Explainer, UserError, capture_activations, hookimpl
from xbench import Passes

RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


def relu_family_modules(net: nn.Module) -> list[nn.Module]:
    """Distinct ReLU-family modules of ``net`` (a module reused k times appears once)."""
    seen: dict[int, nn.Module] = {}
    for module in net.modules():
        if isinstance(module, RELU_FAMILY):
            seen.setdefault(id(module), module)
    return list(seen.values())


@contextlib.contextmanager
def guided_relus(net: nn.Module, state: dict[str, bool] | None = None) -> Iterator[int]:
    """Within the block, backward passes through ``net``'s ReLU-family units use the guided rule.

    Yields the number of hooked modules. ``state`` (optional) switches the rule at backward time:
    with ``state["guided"] = False`` gradients pass unchanged, so one forward can serve both an
    ordinary and a guided backward pass. All hooks are removed on exit, whatever happens.
    """
    modules = relu_family_modules(net)
    if not modules:
        raise UserError(
            "guided-backprop: the model has no nn.ReLU / nn.ReLU6 / nn.LeakyReLU module, so there "
            "is no rectifier to guide (functional torch.relu calls cannot be hooked); use another "
            "explainer for this model")
    state = state if state is not None else {"guided": True}

    def forward_hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        # 1[forward input > 0] read from the output: y > 0 <=> x > 0 for ReLU, ReLU6, LeakyReLU.
        positive = output > 0 if isinstance(module, nn.LeakyReLU) else None

        def gate(grad: torch.Tensor) -> torch.Tensor | None:
            if not state["guided"]:
                return None
            grad = grad.clamp(min=0)  # 1[R_out > 0] * R_out; the unit's own backward adds d(x)
            return grad * positive if positive is not None else grad

        output.register_hook(gate)

    handles = [m.register_forward_hook(forward_hook) for m in modules]
    try:
        yield len(modules)
    finally:
        for handle in handles:
            handle.remove()


def guided_gradients(model: ClassifierHandle, images: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """Guided-backprop gradient of the target logits w.r.t. the pixel-space images (B, 3, H, W);
    one forward and one backward pass."""
    with torch.enable_grad(), guided_relus(model.net):
        x = images.detach().requires_grad_(True)
        score = model(x).gather(1, targets[:, None]).sum()  # images are independent in eval mode
        (gradient,) = torch.autograd.grad(score, x)
    return gradient


def channel_max_abs(gradient: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): max over channels of |gradient| (the map given to metrics)."""
    return gradient.abs().amax(dim=1)


class GuidedBackprop(Explainer):
    """Channel-wise max of |guided-backprop gradient| of the target logit (1 F + 1 B)."""

    name = "guided-backprop"
    needs_gradients = True
    uses_layer = False
    summary = "Guided backprop: gradients gated at every ReLU/ReLU6/LeakyReLU call (1 F + 1 B)"
    passes = Passes(1, 1)

    def explain(self, model, images, targets):
        return channel_max_abs(guided_gradients(model, images, targets))


class GuidedGradCAM(Explainer):
    """Guided Grad-CAM: guided gradient x upsampled Grad-CAM map (Selvaraju et al. sec. 3.1).

    One forward and two backward passes per image: Grad-CAM needs the *ordinary* gradient at the
    target layer and guided backprop the *guided* gradient at the input; both backward passes
    share the forward. The map for metrics is the channel-wise max of |product|.
    """

    name = "guided-gradcam"
    needs_gradients = True
    summary = "Guided Grad-CAM: guided backprop x Grad-CAM (1 F + 2 B)"
    passes = Passes(1, 2)

    def explain(self, model, images, targets):
        state = {"guided": False}
        module = model.layer(self.layer)
        with torch.enable_grad(), guided_relus(model.net, state), \
                capture_activations(module, keep_grad=False, name=self.layer) as store:
            x = images.detach().requires_grad_(True)
            score = model(x).gather(1, targets[:, None]).sum()
            activation = store["activation"]
            (layer_grad,) = torch.autograd.grad(score, activation, retain_graph=True)
            state["guided"] = True
            (input_grad,) = torch.autograd.grad(score, x)
        activation = activation.detach()
        weights = layer_grad.mean(dim=(2, 3), keepdim=True)  # Grad-CAM eq. 1
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))  # Grad-CAM eq. 2
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return channel_max_abs(input_grad * cam)


@hookimpl
def register_explainers(register):
    register(GuidedBackprop)
    register(GuidedGradCAM)
