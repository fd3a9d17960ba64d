"""The model wrapper every explainer and metric goes through: normalisation and pass counting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from xbench.base import LoadedModel
from xbench.engine import InferenceEngine, build_engine
from xbench.errors import UserError, did_you_mean
from xbench.layers import LayerCensus, split_shared_modules, take_census


class ClassifierHandle(nn.Module):
    """Pixel-space classifier: ``forward(x in [0,1]) -> logits``, counting passes.

    Normalisation happens here (docs/protocol.md "Inputs"), so explainers and metrics mask, blur and
    substitute in pixel space. ``forward_count`` grows by the batch size of every forward call
    (a batch of 64 masked inputs is 64 passes); ``backward_count`` by the batch size of every
    backward pass that reaches the logits.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device | str = "cpu",
                 channels_last: bool = False, name: str = "") -> None:
        super().__init__()
        self.name = name  # the Model plugin's registry name (explainers may key assets on it)
        self.loaded = loaded
        self.net = loaded.module.eval()
        self.register_buffer("mean", torch.tensor(loaded.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(loaded.std).view(1, 3, 1, 1), persistent=False)
        self.to(device)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        #: {shared module: its call sites}, split so that every call site is hookable once
        self.call_sites = split_shared_modules(self.net, loaded.input_size, self.device)
        self.census: LayerCensus = take_census(self.net, loaded.input_size, self.device)
        self.forward_count = 0
        self.backward_count = 0
        self._engine: InferenceEngine | None = None  # set by :meth:`use_engine`

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def input_size(self) -> int:
        return self.loaded.input_size

    @property
    def num_classes(self) -> int:
        return len(self.loaded.class_names)

    @property
    def default_layer(self) -> str:
        return self.loaded.default_layer

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.forward_count += images.shape[0]
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        if logits.requires_grad:
            batch = images.shape[0]
            logits.register_hook(lambda grad: self._count_backward(batch))
        return logits

    def _count_backward(self, batch: int) -> None:
        self.backward_count += batch

    def use_engine(self, name: str, batch_size: int,
                   autocast: contextlib.AbstractContextManager | None = None) -> InferenceEngine | None:
        """Run :meth:`predict` through the engine ``name`` of :mod:`xbench.engine` ('eager',
        'onnxruntime', 'compiled'), built for batches of ``batch_size``; returns it (None for
        eager). Raises UserError when the engine cannot run this model."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        size = self.input_size
        self._engine = build_engine(name, self.net, batch_size, (3, size, size), self.device,
                                    fmt, autocast)
        return self._engine

    @property
    def engine(self) -> str:
        """The name of the engine :meth:`predict` runs: 'eager', 'onnxruntime' or 'compiled'."""
        return "eager" if self._engine is None else self._engine.name

    @property
    def engine_batch_size(self) -> int | None:
        """The most images per call of the engine :meth:`predict` runs (None for eager): callers
        that fill whole batches make the fewest calls and, with the compiled engine, which pads
        a short chunk, compute no padding."""
        return None if self._engine is None else self._engine.batch_size

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``images`` in [0, 1], counted as passes like ``forward``, for black-box
        forwards only: no autograd and no hooks on inner layers (the engines run neither).
        Batches of any size; an engine splits them into its own."""
        if self._engine is None:
            with torch.inference_mode():
                return self(images)
        self.forward_count += images.shape[0]
        with torch.inference_mode():
            # normalise straight into the engine's memory format: no separate layout copy
            normalized = torch.empty_like(images, memory_format=self._engine.memory_format)
            torch.sub(images, self.mean, out=normalized).div_(self.std)
            return self._engine(normalized)

    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Softmax probabilities (N, classes) without autograd, in chunks of ``batch_size``
        (with an engine: in chunks of its batch size, see :meth:`predict`)."""
        if self._engine is not None:
            batch_size = self._engine.batch_size
        with torch.inference_mode():
            return torch.cat([self.predict(chunk).softmax(dim=1)
                              for chunk in images.split(batch_size)])

    def cam_layers(self) -> list[str]:
        """Layers a CAM can be computed on, in forward order: a (B, K, h, w) output, called
        exactly once per forward (see :mod:`xbench.layers`)."""
        return self.census.cam_layers()

    def layer_kind(self, name: str | None) -> str:
        """'post-activation' or 'pre-activation': whether the layer's output is an activation's."""
        return self.census.layers[name or self.default_layer].kind

    def layer(self, name: str | None) -> nn.Module:
        """The submodule called ``name`` (default layer when None), refused with a clear error
        when it does not exist, runs more than once per forward (a hook would see several
        tensors) or has no spatial map (nothing for a CAM to weight)."""
        name = name or self.default_layer
        modules = dict(self.net.named_modules())
        info = self.census.layers.get(name)
        if name in modules and name != "" and info is not None and info.calls == 1 \
                and info.spatial:
            return modules[name]
        # the hint is built only for a refusal: this method runs on every explained batch
        usable = self.cam_layers()
        hint = (f"Layers a CAM can use (forward order): {_abridged(usable)}; the default is "
                f"{self.default_layer!r}.")
        if name not in modules or name == "":
            raise UserError(f"model {self.name or 'model'!r} has no layer {name!r}."
                            f"{did_you_mean(name, usable or list(modules))} {hint}")
        if info is None:
            raise UserError(f"layer {name!r} of model {self.name or 'model'!r} does not run in "
                            f"a forward pass, so there is nothing to explain there. {hint}")
        if info.calls != 1:
            raise UserError(
                f"layer {name!r} of model {self.name or 'model'!r} runs {info.calls} times per "
                f"forward (one module object called from several places), so a hook on it sees "
                f"{info.calls} different tensors. {hint}")
        raise UserError(
            f"layer {name!r} of model {self.name or 'model'!r} has no spatial map (its output "
            f"has shape {info.shape}); a CAM needs a (B, K, h, w) activation. {hint}")

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        """Measure passes inside a block: yields a dict filled with 'forward'/'backward' on exit."""
        start_f, start_b = self.forward_count, self.backward_count
        counts: dict[str, int] = {}
        try:
            yield counts
        finally:
            counts["forward"] = self.forward_count - start_f
            counts["backward"] = self.backward_count - start_b


@contextlib.contextmanager
def capture_activations(module: nn.Module, keep_grad: bool = True,
                        name: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of ``module`` (and its gradient when ``keep_grad``) during a block.

    Removes its hook on exit, whatever happens. Resolve ``module`` with
    :meth:`ClassifierHandle.layer`, which refuses modules that run more than once per forward.
    Reading ``store["activation"]`` when the forward never called the module raises a
    RuntimeError naming the layer (``name``), not a bare KeyError.
    """
    store = _ActivationStore(name if name is not None else type(module).__name__)

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        store["activation"] = output
        if keep_grad and output.requires_grad:
            output.register_hook(lambda grad: store.__setitem__("gradient", grad))

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class _ActivationStore(dict):
    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def __missing__(self, key: str) -> torch.Tensor:
        if key == "activation":
            raise RuntimeError(f"layer {self.layer!r} was not called during the forward pass")
        raise KeyError(key)


def block_layers(handle: ClassifierHandle) -> list[str]:
    """The layers ``--layers all`` sweeps: one post-activation point per block, in forward order.

    The model's own list when it declares one. Otherwise: the blocks are the elements of
    sequence containers (Sequential/ModuleList) not nested in another block; for each block,
    its output when that is post-activation (a ResNet block ends in its ReLU), else the last
    activation call site inside it (an MBConv block's output is a linear bottleneck, so its
    depthwise activation is taken), else, for a block without any activation, its output,
    whose kind is then recorded as pre-activation. Activation call sites outside every block
    (the stem's and the head's) and the default layer are included. Only layers a CAM can use
    (:meth:`ClassifierHandle.cam_layers`).
    """
    if handle.loaded.block_layers:
        return list(handle.loaded.block_layers)
    census = handle.census
    usable = set(handle.cam_layers())
    containers = (nn.Sequential, nn.ModuleList)
    blocks = {f"{parent}.{child}" if parent else child
              for parent, module in handle.net.named_modules()
              if isinstance(module, containers) for child, _ in module.named_children()}
    # blocks nested inside another block (a ResNet block's downsample) are not block outputs
    blocks = {name for name in blocks
              if not any(name.startswith(other + ".") for other in blocks)}
    chosen: set[str] = {handle.default_layer}
    for block in blocks & usable:
        if census.layers[block].post_activation:
            chosen.add(block)
            continue
        inside = [name for name in usable if name.startswith(block + ".")
                  and census.layers[name].is_activation]
        chosen.add(max(inside, key=lambda name: census.layers[name].order) if inside else block)
    chosen.update(name for name in usable if census.layers[name].is_activation
                  and not any(name == b or name.startswith(b + ".") for b in blocks))
    outermost: dict[int, str] = {}  # a block and its last module share one output tensor
    for name in sorted(chosen & usable, key=lambda name: census.layers[name].order):
        outermost[census.layers[name].tensor] = name
    return sorted(outermost.values(), key=lambda name: census.layers[name].order)


def masked_batch_size(device: torch.device) -> int:
    """Default masked copies per forward for explainers that push many copies of one image
    (Score-CAM, RISE): 16 on CPU, where bigger batches overflow the caches and cost more per
    image (EfficientNet-Lite0 on 2 cores: 81 images in 0.65 s at 16, 1.39 s at 64, see
    benchmarks/bench_explainers.py), 64 on accelerators."""
    return 16 if torch.device(device).type == "cpu" else 64


def _abridged(names: list[str], keep: int = 8) -> str:
    """The first and last few of a long list of layer names."""
    if len(names) <= keep:
        return ", ".join(names)
    half = keep // 2
    return f"{', '.join(names[:half])}, ... ({len(names) - keep} more), {', '.join(names[-half:])}"
