"""Where a CAM can hook: one module per call site, and a census of every layer's output.

A forward hook on a module object fires once per *call*. Networks often call one stateless
module object from several places (EfficientNet-Lite's ``_swish`` ReLU6 runs after the stem,
after the head and twice inside every expanding MBConv block; torchvision's ResNet blocks call
one ``relu`` two or three times), so a hook on it sees several tensors and keeps the last: a
CAM computed there mixes layers. :func:`split_shared_modules` gives every call site its own
copy when a model is loaded, and :class:`LayerCensus` records, from one probe forward, how often
each module runs, the shape of its output and whether that output is post-activation, so that
:meth:`xbench.model.ClassifierHandle.layer` can refuse a layer a CAM cannot use.

How the split works (a forward-call census, not torch.fx): one probe forward with hooks on every
stateless leaf (no parameters, no buffers, no children) counts its calls and, by tensor
identity, which module produced each call's input. A leaf called k > 1 times is replaced in its
parent by :class:`CallSites`, a container of k deep copies named after the layer each call
activates (``_swish`` -> ``_swish._bn0`` and ``_swish._bn1``; ``call<i>`` when the input is not
a module's output, e.g. after a residual addition), which hands the i-th call of a forward to
the i-th copy. The copies compute exactly what the shared module did (stateless, same
arguments), so logits are bit-identical; the model's own ``forward`` code is untouched, which is
why this is preferred over torch.fx: fx inlines every non-leaf module into one graph, so hooks on
blocks (``_blocks.3``, ``layer4``) would no longer fire.

Where it cannot apply: modules with parameters or buffers called more than once (weight
sharing) are left shared, and a hook on them is refused; functional activations
(``F.relu(x)`` in a forward) are not modules and cannot be hooked at all (torchvision DenseNet's
final ReLU): choose the preceding module, whose kind is then recorded as pre-activation; a model
whose call sequence changes with the input would dispatch by position, so the probe must be
representative (every built-in model runs the same modules for every input).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

#: elementwise activation modules: a layer whose output is one of theirs is post-activation
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU)


class CallSites(nn.Module):
    """One stateless module that a network calls from several places, as one copy per call site.

    The i-th call within a forward goes to the i-th child (children in forward order). The
    position restarts at every forward of the root network (:func:`split_shared_modules` puts a
    pre-hook there) and wraps around after the last site, so a forward of the root always
    dispatches right. While the network is being traced or compiled (ONNX export,
    torch.compile), all calls use the first copy: the copies are identical and no hook runs there.
    """

    def __init__(self, original: nn.Module, site_names: list[str]) -> None:
        super().__init__()
        for name in site_names:
            self.add_module(name, copy.deepcopy(original))
        self.position = 0

    def forward(self, *args, **kwargs):
        sites = list(self._modules.values())
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return sites[0](*args, **kwargs)
        site = sites[self.position]
        self.position = (self.position + 1) % len(sites)
        return site(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"one copy per call site: {', '.join(self._modules)}"


def _is_stateless_leaf(module: nn.Module) -> bool:
    return (not isinstance(module, CallSites) and next(module.children(), None) is None
            and next(module.parameters(recurse=False), None) is None
            and next(module.buffers(recurse=False), None) is None)


def _probe(net: nn.Module, input_size: int, device: torch.device) -> None:
    with torch.inference_mode():
        net(torch.zeros(1, 3, input_size, input_size, device=device))


def split_shared_modules(net: nn.Module, input_size: int,
                         device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Give every call site of a shared stateless module its own copy, in place.

    Returns {shared module name: [site names]} of what was split (empty when nothing was
    shared, or when ``net`` was split before). Logits are unchanged bit for bit.
    """
    modules = dict(net.named_modules())
    produced_by: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # ids of tensors stay unique while they are alive
    sites: dict[str, list[str | None]] = {}
    handles = []

    def record_output(name: str):
        def hook(_module, inputs, output):
            if isinstance(output, torch.Tensor):
                produced_by.setdefault(id(output), name)  # innermost module that made it
                keep_alive.append(output)
        return hook

    def record_call(name: str):
        def pre_hook(_module, inputs):
            first = inputs[0] if inputs else None
            producer = produced_by.get(id(first)) if isinstance(first, torch.Tensor) else None
            sites.setdefault(name, []).append(producer)
        return pre_hook

    for name, module in modules.items():
        if not name:
            continue
        handles.append(module.register_forward_hook(record_output(name)))
        if _is_stateless_leaf(module):
            handles.append(module.register_forward_pre_hook(record_call(name)))
    try:
        _probe(net, input_size, torch.device(device))
    finally:
        for handle in handles:
            handle.remove()

    split: dict[str, list[str]] = {}
    for name, producers in sites.items():
        if len(producers) < 2:
            continue
        parent_name, _, leaf = name.rpartition(".")
        prefix = f"{parent_name}." if parent_name else ""
        names: list[str] = []
        for index, producer in enumerate(producers):
            site = f"call{index}"
            if producer is not None:
                relative = producer[len(prefix):] if producer.startswith(prefix) else producer
                site = relative.replace(".", "_")
            if site in names:
                site = f"call{index}"
            names.append(site)
        parent = modules[parent_name] if parent_name else net
        setattr(parent, leaf, CallSites(modules[name], names))
        split[name] = names
    if split and not getattr(net, "_xbench_call_sites_reset", False):
        def reset(_module, _inputs):
            for module in net.modules():
                if isinstance(module, CallSites):
                    module.position = 0
        net.register_forward_pre_hook(reset)
        net._xbench_call_sites_reset = True
    return split


@dataclass(frozen=True)
class LayerInfo:
    """What one probe forward saw of a module: calls, output shape, activation kind."""

    name: str
    calls: int
    shape: tuple[int, ...] | None  # the last call's output shape, None when not a tensor
    post_activation: bool  # its output is the output of an activation module
    order: int  # position of its (first) return in the forward
    is_activation: bool = False  # the module is itself an activation (or one call site of one)
    passthrough: bool = False  # returns its input unchanged (nn.Identity): not a layer of its own
    tensor: int = 0  # identifies its output tensor: equal for a block and its last module

    @property
    def spatial(self) -> bool:
        """A (B, K, h, w) output: a map a CAM can weight (a constant one when h = w = 1)."""
        return self.shape is not None and len(self.shape) == 4

    @property
    def kind(self) -> str:
        return "post-activation" if self.post_activation else "pre-activation"


@dataclass
class LayerCensus:
    """Every named module of a network as one probe forward saw it (:func:`take_census`)."""

    layers: dict[str, LayerInfo] = field(default_factory=dict)

    def cam_layers(self) -> list[str]:
        """Layers worth a CAM, in forward order: a (B, K, h, w) output with h * w > 1 (a 1 x 1
        map is accepted by name but can only give a constant map), exactly one call."""
        usable = [info for info in self.layers.values()
                  if info.spatial and info.shape[2] * info.shape[3] > 1 and info.calls == 1
                  and not info.passthrough]
        return [info.name for info in sorted(usable, key=lambda info: info.order)]


def take_census(net: nn.Module, input_size: int,
                device: torch.device | str = "cpu") -> LayerCensus:
    """One probe forward of a zero image with a hook on every named module."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    activation_outputs: set[int] = set()
    passthrough: set[str] = set()
    keep_alive: list[torch.Tensor] = []
    handles = []

    def hook_for(name: str, is_activation: bool):
        def hook(_module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if inputs and output is inputs[0]:
                passthrough.add(name)
            order.setdefault(name, len(order))
            tensor = output if isinstance(output, torch.Tensor) else None
            shapes[name] = tuple(tensor.shape) if tensor is not None else None
            if tensor is not None:
                outputs[name] = tensor
                keep_alive.append(tensor)
                if is_activation:
                    activation_outputs.add(id(tensor))
        return hook

    activations = {name for name, module in net.named_modules()
                   if isinstance(module, ACTIVATION_TYPES)}
    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook_for(name, name in activations)))
    try:
        _probe(net, input_size, torch.device(device))
    finally:
        for handle in handles:
            handle.remove()
    census = LayerCensus()
    for name in order:
        post = name in outputs and id(outputs[name]) in activation_outputs
        census.layers[name] = LayerInfo(name=name, calls=calls[name], shape=shapes[name],
                                        post_activation=post, order=order[name],
                                        is_activation=name in activations,
                                        passthrough=name in passthrough and name not in activations,
                                        tensor=id(outputs[name]) if name in outputs else 0)
    return census
