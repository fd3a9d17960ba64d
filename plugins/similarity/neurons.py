"""Guided backprop of single neurons (channels) of a layer, many per backward pass, and the
layers whose neurons are analysed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xbench import ClassifierHandle, UserError
# One guided-backprop rule for the whole project (Springenberg et al. 2015): at every call of every
# ReLU-family module, R_in = d(x) * 1[R_out > 0] * R_out, by hooks that fire on every call (a
# module object reused several times per forward is guided at each use; modules never swapped).
from xbench_plugins.guided_backprop import RELU_FAMILY, guided_gradients, guided_relus


class _StopForward(Exception):
    """Raised by a forward hook to end the forward pass once the wanted layer has run."""


def truncated_forward(model: ClassifierHandle, images: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Run ``model`` on pixel-space ``images`` only up to ``module``; return its output.

    The forward pass stops by raising a private exception from a forward hook on ``module`` at
    its first call (layers called several times per forward are refused by :func:`probe_layers`).
    """
    store: dict[str, torch.Tensor] = {}

    def stop(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        store["activation"] = output
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "activation" not in store:
        raise RuntimeError("the layer was not called during the forward pass")
    return store["activation"]


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose channels are the analysed neurons."""

    name: str
    channels: int


def _grey_forward(model: ClassifierHandle, hooks: dict[nn.Module, object]) -> None:
    """One inference forward of a mid-grey image with temporary forward hooks {module: hook}."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.inference_mode():
            model(torch.full((1, 3, model.input_size, model.input_size), 0.5, device=model.device))
    finally:
        for handle in handles:
            handle.remove()


def probe_layers(model: ClassifierHandle, names: Sequence[str] | None = None) -> list[LayerInfo]:
    """Check the chosen layers (default: :func:`default_layers`) with one forward of a grey image.

    Returns them in call order with their channel count. A layer must be a module called exactly
    once per forward whose output is a tensor (N, C, ...); otherwise a UserError says why.
    """
    if names is None:
        names = default_layers(model)
    modules = {name: model.layer(name) for name in names}
    calls: dict[str, list[torch.Size]] = {name: [] for name in names}
    order: list[str] = []

    def record(name: str):
        def hook(_module, _inputs, output):
            if name not in order:
                order.append(name)
            calls[name].append(output.shape if isinstance(output, torch.Tensor) else None)
        return hook

    _grey_forward(model, {modules[name]: record(name) for name in names})
    infos = []
    for name in order + [n for n in names if n not in order]:
        shapes = calls[name]
        if len(shapes) != 1:
            raise UserError(f"--layers {name}: the module is called {len(shapes)} times per "
                            "forward pass; pick a module called exactly once (for a shared "
                            "activation module, pick the conv or norm layer before it)")
        if shapes[0] is None or len(shapes[0]) < 2:
            raise UserError(f"--layers {name}: its output is not a tensor (N, C, ...)")
        infos.append(LayerInfo(name, int(shapes[0][1])))
    return infos


def default_layers(model: ClassifierHandle) -> list[str]:
    """The neurons of every convolution, in call order: for each Conv2d called once per forward,
    the ReLU-family module called right after it (after any BatchNorm2d) when that unit is called
    once per forward, else the last of the conv and its BatchNorms (a shared activation module,
    as in EfficientNet-Lite or torchvision ResNets, cannot be cut at one of its uses)."""
    # leaves, plus convolutions with children (e.g. a padding submodule): a forward hook fires
    # when its module returns, so the recorded order is the order in which outputs are produced
    kinds = (nn.Conv2d, nn.BatchNorm2d, *RELU_FAMILY)
    leaves = {m: n for n, m in model.net.named_modules()
              if n and (not list(m.children()) or isinstance(m, kinds))}
    sequence: list[str] = []
    _grey_forward(model, {m: (lambda mod, i, o, n=n: sequence.append(n)) for m, n in leaves.items()})
    modules = dict(model.net.named_modules())
    counts = {n: sequence.count(n) for n in set(sequence)}

    def once(position: int, kind) -> bool:
        return (position < len(sequence) and isinstance(modules[sequence[position]], kind)
                and counts[sequence[position]] == 1)

    layers = []
    for position in range(len(sequence)):
        if not once(position, nn.Conv2d):
            continue
        while once(position + 1, nn.BatchNorm2d):
            position += 1
        layers.append(sequence[position + 1] if once(position + 1, RELU_FAMILY) else sequence[position])
    if not layers:
        raise UserError("the model has no convolution called once per forward; pass --layers")
    return layers


def channel_guided_backprop(model: ClassifierHandle, image: torch.Tensor, layer: str,
                            channels: Sequence[int] | torch.Tensor | None = None,
                            channel_batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """GBP(I, j, k) = d/dI sum_xy A^j_k(I) under guided ReLUs, for every k in ``channels``.

    ``image`` (3, H, W) in pixel space. Each chunk of ``channel_batch`` channels costs one
    truncated forward of the replicated image (stopped at the layer) and one backward pass in
    which copy b back-propagates only channel chunk[b]; the copies are independent (eval mode),
    so the gradient of the summed objective splits into one gradient per copy.
    Returns (gbp (K, 3, H, W), activation of all channels of the layer on I (C, ...)).
    """
    if channel_batch < 1:
        raise ValueError(f"channel_batch must be >= 1, got {channel_batch}")
    module = model.layer(layer)
    image = image.detach().to(model.device)
    gradients, activation = [], None
    with torch.enable_grad(), guided_relus(model.net):
        if channels is None:
            with torch.no_grad():
                channels = range(truncated_forward(model, image[None], module).shape[1])
        channels = torch.as_tensor(list(channels) if not torch.is_tensor(channels) else channels,
                                   dtype=torch.long, device=model.device)
        for chunk in channels.split(channel_batch):
            copies = image[None].repeat(len(chunk), 1, 1, 1).requires_grad_(True)
            output = truncated_forward(model, copies, module)
            if activation is None:
                activation = output[0].detach().clone()
            objective = output[torch.arange(len(chunk), device=output.device), chunk].sum()
            (gradient,) = torch.autograd.grad(objective, copies)
            gradients.append(gradient)
    return torch.cat(gradients), activation


def class_guided_backprop(model: ClassifierHandle, image: torch.Tensor, cls: int) -> torch.Tensor:
    """phi_i = GBP(I, output layer, class i): guided gradient of the class logit, (3, H, W)."""
    target = torch.tensor([cls], device=model.device)
    return guided_gradients(model, image.detach().to(model.device)[None], target)[0]


def cosine_similarity(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """cos(map_k, reference) for each map (K, ...) against one reference of the same shape,
    over all elements, in float64; NaN where a map or the reference is all zero."""
    flat = maps.detach().reshape(len(maps), -1).double()
    ref = reference.detach().reshape(-1).double()
    norms = flat.norm(dim=1) * ref.norm()
    dots = flat @ ref
    return torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), float("nan"))
