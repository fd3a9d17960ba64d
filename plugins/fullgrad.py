"""FullGrad (Srinivas & Fleuret, NeurIPS 2019, "Full-Gradient Representation for Neural Network
Visualization"), implemented natively.

A ReLU network with biases satisfies f(x) = grad_x f . x + sum_l sum_c (grad_{z_l} f . b_l)_c
(the full-gradient decomposition, the paper's eq. 2): the input-gradient and one bias-gradient
term per biased layer. The saliency map is (eq. 5)

    S(x) = psi(grad_x f (.) x) + sum_l sum_c psi(grad_{z_l} f (.) b_l)_c,

psi = absolute value, bilinear upsampling to the input size, min-max rescaling to [0, 1]. Biased
layers are every ``nn.Conv2d`` with a bias and every ``nn.BatchNorm2d``, whose bias is
b = beta - mu gamma / sqrt(sigma^2 + eps) (the authors' ``tensor_extractor.py``); z_l is the
layer's output (a layer called twice contributes twice). Fully connected layers' biases carry no
spatial map and are left out, as by the authors. f is the target logit y^c. 1 F + 1 B: one
backward gives the input gradient and every z_l's gradient.

Settings that change the map (declared options):
- ``rescale``: ``channel`` (default; the paper's eq. 5 and pytorch-grad-cam 1.5.7's
  ``FullGrad``: each channel's |.| rescaled to [0, 1] by (m - min) / (max + eps) on its own) or
  ``layer`` (the authors' code: one rescaling per layer over all its channels).
- ``align_corners``: bilinear upsampling convention, False (default; half-pixel centres, as
  xbench's own upsampling and pytorch-grad-cam's OpenCV resize) or True (the authors' code).
- ``input_space``: x and grad_x of the first term are those of the ``network`` input (default,
  the normalised tensor: only there is the decomposition complete, since normalisation is an
  affine layer with a bias) or of the ``pixel`` image in [0, 1].
- ``eps``: 1e-7 in the rescaling (pytorch-grad-cam's; the authors' code 1e-6).

Rescaling commutes with nothing, but bilinear upsampling is linear, so each layer's rescaled
channels are summed at the layer's resolution and the sum is upsampled once (the same map as
upsampling every channel, for less memory).

Why native: pytorch-grad-cam's ``FullGrad`` moves every layer's gradient to numpy and resizes
each channel with OpenCV; the formula is a few lines on tensors, runs on any device, needs no
extra dependency and is tested against pytorch-grad-cam (tests/test_fullgrad.py). It reads no
target layer (``--layer`` is ignored): every biased layer takes part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import xbench
from xbench import Explainer, hookimpl


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds to each output channel (BatchNorm: beta - mu gamma / sigma)."""
    if isinstance(module, nn.BatchNorm2d):
        mean = module.running_mean if module.running_mean is not None else 0.0
        var = module.running_var if module.running_var is not None else 1.0
        weight = module.weight if module.weight is not None else 1.0
        bias = module.bias if module.bias is not None else 0.0
        out = bias - mean * weight / torch.sqrt(var + module.eps)
        return torch.as_tensor(out).detach()
    if isinstance(module, nn.Conv2d) and module.bias is not None:
        return module.bias.detach()
    return None


def rescale(maps: torch.Tensor, over: str, eps: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w): |.| rescaled by (m - min) / (max + eps) per channel or per
    layer (all channels at once), then summed over channels."""
    maps = maps.abs()
    dims = (2, 3) if over == "channel" else (1, 2, 3)
    maps = maps - maps.amin(dim=dims, keepdim=True)
    maps = maps / (maps.amax(dim=dims, keepdim=True) + eps)
    return maps.sum(dim=1)


class FullGrad(Explainer):
    """S = psi(grad_x y^c (.) x) + sum_l sum_c psi(grad_{z_l} y^c (.) b_l)_c (Srinivas & Fleuret
    2019); 1 F + 1 B."""

    name = "fullgrad"
    needs_gradients = True
    uses_layer = False
    library = "xbench"
    passes = xbench.Passes(1, 1)
    summary = "FullGrad: input-gradient plus every layer's bias-gradient maps (1 F + 1 B)"

    class Options(xbench.Options):
        rescale: str = xbench.option("channel", "psi's [0, 1] rescaling: per channel (paper eq. 5, "
                                     "pytorch-grad-cam) or per layer (the authors' code)",
                                     choices=("channel", "layer"))
        align_corners: bool = xbench.option(False, "bilinear upsampling with corner-aligned "
                                            "grids (the authors' code) instead of half-pixel "
                                            "centres")
        input_space: str = xbench.option("network", "x of the input-gradient term: the "
                                         "normalised network input or the pixel image",
                                         choices=("network", "pixel"))
        eps: float = xbench.option(1e-7, "added to the maximum in the rescaling", minimum=0.0)

    def explain(self, model, images, targets):
        o = self.options
        biases: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []

        def keep(module, _inputs, output):
            # the clone keeps z_l out of reach of in-place activations (torchvision's ReLU)
            outputs.append(output)
            biases.append(layer_bias(module))
            return output.clone()

        handles = [m.register_forward_hook(keep) for m in model.net.modules()
                   if layer_bias(m) is not None]
        try:
            with torch.enable_grad():
                x = images.detach().requires_grad_(True)
                logits = model(x)
                score = logits.gather(1, targets[:, None]).sum()
                grads = torch.autograd.grad(score, [x, *outputs])
        finally:
            for handle in handles:
                handle.remove()
        size = images.shape[-2:]
        grad_x = grads[0].detach()
        if o.input_space == "network":  # grad_n . x_n with x_n = (x - mean) / std
            mean = torch.as_tensor(model.loaded.mean, device=x.device, dtype=x.dtype)
            first = grad_x * (images - mean[:, None, None])
        else:
            first = grad_x * images
        saliency = rescale(first, o.rescale, o.eps)
        for bias, gradient in zip(biases, grads[1:]):
            term = rescale(gradient.detach() * bias[:, None, None].to(gradient), o.rescale, o.eps)
            saliency = saliency + F.interpolate(term[:, None], size=size, mode="bilinear",
                                                align_corners=o.align_corners)[:, 0]
        return saliency


@hookimpl
def register_explainers(register):
    register(FullGrad)
