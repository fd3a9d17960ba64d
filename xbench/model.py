"""The model wrapper every explainer and metric goes through: normalisation and pass counting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from xbench.base import LoadedModel
from xbench.engine import InferenceEngine, build_engine
from xbench.errors import UserError, did_you_mean


class ClassifierHandle(nn.Module):
    """Pixel-space classifier: ``forward(x in [0,1]) -> logits``, counting passes.

    Normalisation happens here (PROTOCOL.md "Inputs"), so explainers and metrics mask, blur and
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

    def layer(self, name: str | None) -> nn.Module:
        """The submodule called ``name`` (default layer when None), with a helpful error; a
        layer whose output has no spatial map (not (B, K, h, w)) is refused too."""
        name = name or self.default_layer
        modules = dict(self.net.named_modules())
        shapes = self.layer_output_shapes()
        spatial = [n for n, shape in shapes.items() if len(shape) == 4]
        if name not in modules or name == "":
            raise UserError(
                f"model has no layer {name!r}.{did_you_mean(name, spatial)} "
                f"Layers are module names as in model.named_modules(); those with a spatial "
                f"map (a CAM can use them) end with {', '.join(spatial[-3:])}; the default "
                f"is {self.default_layer!r}.")
        if name in shapes and len(shapes[name]) != 4:
            raise UserError(
                f"layer {name!r} has no spatial map (its output is {tuple(shapes[name])}, not "
                f"(B, K, h, w)), so a CAM cannot use it. Layers that can carry a CAM: "
                f"{', '.join(spatial)}; the default is {self.default_layer!r}.")
        return modules[name]

    def layer_output_shapes(self) -> dict[str, tuple[int, ...]]:
        """{module name: output shape (1, ...) of its first call} from one probe forward of a
        zero image, cached (tensor outputs only, forward order)."""
        if getattr(self, "_layer_shapes", None) is None:
            import copy

            # on a copy without the caller's hooks: the probe must not fire them
            net = copy.deepcopy(self.net)
            shapes: dict[str, tuple[int, ...]] = {}
            for n, module in net.named_modules():
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
                if n:
                    def record(_m, _i, out, n=n) -> None:  # first call: a reused module's
                        if isinstance(out, torch.Tensor) and n not in shapes:  # own check
                            shapes[n] = tuple(out.shape)
                    module.register_forward_hook(record)
            with torch.inference_mode():
                size = self.input_size
                net(torch.zeros(1, 3, size, size, device=self.device))
            self._layer_shapes = shapes
        return self._layer_shapes

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
def capture_activations(module: nn.Module, keep_grad: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of ``module`` (and its gradient when ``keep_grad``) during a block.

    Removes its hook on exit, whatever happens. Holds the *last* call's output: for a module
    called several times per forward (EfficientNet-Lite's shared ``_swish``) pick another layer.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        store["activation"] = output
        if keep_grad and output.requires_grad:
            output.register_hook(lambda grad: store.__setitem__("gradient", grad))

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def block_layers(handle: ClassifierHandle) -> list[str]:
    """Every block output a CAM can be computed on, in forward order (``--layers all``).

    The model's own list when it declares one; otherwise found by one probe forward: modules
    that are elements of a sequence container (Sequential/ModuleList, i.e. blocks) and not
    inside another such block, return a
    (B, K, h, w) map and run once per forward, plus the default layer. When a block returns
    the very tensor of its last child (a container and its last block, or an in-place ReLU
    and its conv), the outermost name is kept.
    """
    if handle.loaded.block_layers:
        return list(handle.loaded.block_layers)
    containers = (nn.Sequential, nn.ModuleList)
    in_sequence = {f"{parent}.{child}" if parent else child
                   for parent, module in handle.net.named_modules()
                   if isinstance(module, containers) for child, _ in module.named_children()}
    # blocks nested inside another block (a ResNet block's downsample) are not block outputs
    in_sequence = {name for name in in_sequence
                   if not any(name.startswith(other + ".") for other in in_sequence)}
    in_sequence.add(handle.default_layer)
    calls: list[tuple[str, torch.Tensor]] = []
    counts: dict[str, int] = {}
    hooks = []
    for name, module in handle.net.named_modules():
        if name in in_sequence:
            def hook(_m, _i, output, name=name):
                counts[name] = counts.get(name, 0) + 1
                if isinstance(output, torch.Tensor) and output.dim() == 4:
                    calls.append((name, output))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            size = handle.input_size
            handle.net(torch.zeros(1, 3, size, size, device=handle.device))
    finally:
        for h in hooks:
            h.remove()
    order: list[str] = []
    last_ptr: dict[int, int] = {}
    for name, output in calls:
        if counts[name] != 1:
            continue  # a module reused within one forward has no single output to explain
        pointer = output.data_ptr()
        if pointer in last_ptr:  # same tensor as an inner block: keep the outer name
            order[last_ptr[pointer]] = name
            continue
        last_ptr[pointer] = len(order)
        order.append(name)
    return order


def masked_batch_size(device: torch.device) -> int:
    """Default masked copies per forward for explainers that push many copies of one image
    (Score-CAM, RISE): 16 on CPU, where bigger batches overflow the caches and cost more per
    image (EfficientNet-Lite0 on 2 cores: 81 images in 0.65 s at 16, 1.39 s at 64, see
    benchmarks/bench_explainers.py), 64 on accelerators."""
    return 16 if torch.device(device).type == "cpu" else 64
