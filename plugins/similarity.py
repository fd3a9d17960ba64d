"""Neuron similarity value (Wang Xinyuan, "Research on interpretability method of deep neural
network based on average image", master's thesis, Central South University, 2022).

docs/protocol.md "Neuron similarity value". For every class i, chosen layer j and neuron (channel) k:

- I_i: a class average image (:func:`simple_average`, :func:`confidence_averages`; the
  gradient-ascent :func:`network_driven_average` is a reference picture only, as in the thesis);
- GBP(I_i, j, k): guided backprop (Springenberg et al. 2015) of the spatial sum of channel k of
  layer j, computed for many channels per backward pass (:func:`channel_guided_backprop`);
- s_ijk = cos(GBP(I_i, j, k), I_i) (method 1) or cos(GBP(I_i, j, k), phi_i) with
  phi_i = GBP(I_i, output, class i) (method 2); a neuron whose visualisation is all zero has no
  similarity (NaN), and ``activated`` says whether its activation on I_i was ever positive;
- per-layer mean/std curves, and the pruning check: zero the ``ratio`` highest- and, separately,
  lowest-similarity neurons of one layer (no fine-tuning) and compare test accuracy (Table 5-1).

The model-scope Metric ``similarity-value`` (:class:`SimilarityValue`) is the per-image form
of the same quantity, for the regular run matrix: with the explained image x in place of the
class average image I_i and its target class in place of i, it scores the mean over the chosen
neurons of s_jk (method 1: cos(GBP(x, j, k), x); method 2: against GBP(x, output, target)).
It reads no explainer's map, so the runner computes it once per image (``kind = "model"``) and
only when asked for (``--metrics similarity-value``). The thesis's analysis proper (class
averages, curves, pruning) is the ``xbench similarity`` command; the embedded digits model is
registered as the Model ``digits-vgg``.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import xbench
from xbench import ClassifierHandle, LoadedModel, Metric, MetricBatch, Model, UserError, hookimpl
# One guided-backprop rule for the whole project (Springenberg et al. 2015): at every call of every
# ReLU-family module, R_in = d(x) * 1[R_out > 0] * R_out, by hooks that fire on every call (a
# module object reused several times per forward is guided at each use; modules never swapped).
from xbench_plugins.guided_backprop import RELU_FAMILY, guided_gradients, guided_relus

METHODS = (1, 2)
AVERAGE_KINDS = ("simple", "confident", "unconfident", "network")

# --------------------------------------------------------------------------------------------
# Embedded default: scikit-learn handwritten digits and a small VGG-like CNN
# --------------------------------------------------------------------------------------------

DIGITS_SIZE = 32
DIGITS_SEED = 0
#: identifies the architecture inside checkpoints; bump it whenever build_digits_vgg changes
DIGITS_ARCH = "digits-vgg/v1: 3x32x32 c16 c16 p c32 c32 p c64 p fc128 fc10"
DIGITS_LAYERS = ("features.relu1", "features.relu2", "features.relu3", "features.relu4",
                 "features.relu5")


def cache_dir() -> Path:
    """``$XBENCH_CACHE`` when set, else ``~/.cache/xbench``."""
    root = os.environ.get("XBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "xbench"


def digits_checkpoint_path() -> Path:
    return cache_dir() / "digits-vgg.pt"


#: digits-vgg trained once by :func:`train_digits_vgg` (seed 0) and shipped: CPU training is not
#: bit-reproducible across hosts (two 2-core hosts of this project ended at different networks,
#: 95.8% and 97.3% test top-1, with different pruning tables), so every host analyses this one
SHIPPED_DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits-vgg.pt"


def default_digits_weights() -> Path:
    """The shipped checkpoint; the user cache (trained on first use) where a package lacks it."""
    return SHIPPED_DIGITS_WEIGHTS if SHIPPED_DIGITS_WEIGHTS.exists() else digits_checkpoint_path()


def build_digits_vgg() -> nn.Module:
    """VGG-like CNN for 3x32x32 input: five 3x3 conv+ReLU layers in three blocks, two FC layers.

    Every ReLU is its own module (the neurons the analysis looks at are their outputs).
    """
    def conv(c_in: int, c_out: int) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)

    features = nn.Sequential(OrderedDict([
        ("conv1", conv(3, 16)), ("relu1", nn.ReLU()),
        ("conv2", conv(16, 16)), ("relu2", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv3", conv(16, 32)), ("relu3", nn.ReLU()),
        ("conv4", conv(32, 32)), ("relu4", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv5", conv(32, 64)), ("relu5", nn.ReLU()), ("pool3", nn.MaxPool2d(2)),
    ]))
    classifier = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 4 * 4, 128)), ("relu", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]))
    return nn.Sequential(OrderedDict([("features", features), ("classifier", classifier)]))


@dataclass(frozen=True)
class ImageSplit:
    """Pixel-space images (N, 3, H, W) in [0, 1] with integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def digits_data(size: int = DIGITS_SIZE, seed: int = DIGITS_SEED) -> tuple[ImageSplit, ImageSplit]:
    """(train, test): scikit-learn's 1797 8x8 digits, 0..16 -> [0, 1], bilinearly upsampled to
    ``size`` and repeated to 3 channels; a stratified 75/25 split with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=seed,
                                   stratify=digits.target)
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return ImageSplit(images[train], labels[train]), ImageSplit(images[test], labels[test])


def train_digits_vgg(seed: int = DIGITS_SEED, epochs: int = 10, batch_size: int = 128,
                     lr: float = 3e-3) -> tuple[nn.Module, float]:
    """Train :func:`build_digits_vgg` on the digits train split (Adam, cross-entropy, inputs
    normalised as (x - 0.5) / 0.5); returns (network in eval mode, test accuracy in %)."""
    train, test = digits_data(seed=seed)
    torch.manual_seed(seed)
    net = build_digits_vgg()
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    inputs = (train.images - 0.5) / 0.5
    net.train()
    for _ in range(epochs):
        for index in torch.randperm(len(inputs), generator=order).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[index]), train.labels[index]).backward()
            optimizer.step()
    net.eval()
    with torch.inference_mode():
        predicted = net((test.images - 0.5) / 0.5).argmax(dim=1)
    return net, 100.0 * (predicted == test.labels).float().mean().item()


def save_digits_checkpoint(net: nn.Module, test_accuracy: float, path: Path) -> None:
    """Atomically write {arch, state_dict, test_accuracy, seed} (loadable with weights_only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": DIGITS_ARCH, "state_dict": net.state_dict(),
               "test_accuracy": float(test_accuracy), "seed": DIGITS_SEED}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_digits_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Load a digits-vgg checkpoint with ``weights_only=True``; refuse other architectures."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model 'digits-vgg': weights file {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(f"model 'digits-vgg': cannot read {path} as a checkpoint "
                        f"({type(exc).__name__}: {exc}); delete it to retrain") from exc
    arch = payload.get("arch") if isinstance(payload, dict) else None
    if arch != DIGITS_ARCH:
        raise UserError(f"model 'digits-vgg': checkpoint {path} belongs to architecture {arch!r}, "
                        f"not {DIGITS_ARCH!r}; delete it (it is retrained on first use) or pass "
                        "--weights to a digits-vgg checkpoint")
    net = build_digits_vgg()
    net.load_state_dict(payload["state_dict"])
    return net.eval(), {k: v for k, v in payload.items() if k != "state_dict"}


class DigitsVGG(Model):
    name = "digits-vgg"
    summary = ("small VGG-like CNN on scikit-learn digits (32 px, 10 classes), trained once with "
               "a fixed seed and shipped (plugins/assets/digits-vgg.pt)")

    def load(self) -> LoadedModel:
        path = Path(self.weights) if self.weights else default_digits_weights()
        if self.weights is None and not path.exists():
            net, accuracy = train_digits_vgg()
            save_digits_checkpoint(net, accuracy, path)
        net, meta = load_digits_checkpoint(path)
        return LoadedModel(module=net, input_size=DIGITS_SIZE, resize_size=DIGITS_SIZE,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           class_names=tuple(str(d) for d in range(10)),
                           default_layer=DIGITS_LAYERS[-1], weights=str(path),
                           extra={"test_accuracy": meta.get("test_accuracy")})


# --------------------------------------------------------------------------------------------
# Class average images
# --------------------------------------------------------------------------------------------


def simple_average(images: torch.Tensor) -> torch.Tensor:
    """Per-class mean image, each channel stretched onto the class data's range.

    With X the class images (N, C, H, W), M = mean_n X_n and, per channel c,
    lo_d = min X[:, c], hi_d = max X[:, c] (over images and pixels), lo_m = min M_c, hi_m = max M_c:

        I_c = lo_d + (M_c - lo_m) * (hi_d - lo_d) / (hi_m - lo_m)

    i.e. M_c is rescaled by the ratio of the data's extreme-value spread to the mean image's, so
    the average is not washed out. Where lo_d = lo_m (e.g. a background that is 0 in every
    image, as for the digits) this is the plain ratio I_c = M_c * hi_d / hi_m. A constant mean
    channel (hi_m = lo_m) is returned unchanged.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"simple_average needs images (N>0, C, H, W), got {tuple(images.shape)}")
    images = images.double()
    mean = images.mean(dim=0)
    lo_d, hi_d = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    lo_m, hi_m = mean.amin(dim=(1, 2)), mean.amax(dim=(1, 2))
    span_m = hi_m - lo_m
    flat = span_m <= 0
    scale = torch.where(flat, torch.ones_like(span_m), (hi_d - lo_d) / torch.where(flat, 1, span_m))
    offset_from, offset_to = torch.where(flat, 0, lo_m), torch.where(flat, 0, lo_d)
    out = offset_to[:, None, None] + (mean - offset_from[:, None, None]) * scale[:, None, None]
    return out.float()


def confidence_averages(images: torch.Tensor, confidence: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-driven averages: (mean of the k most confident images, mean of the k least).

    ``confidence`` (N,) is the model's probability of the class on each of the class's images;
    ranking is a stable descending sort (ties keep dataset order); k is capped at N.
    """
    if k < 1:
        raise ValueError(f"top-K for data-driven averages must be >= 1, got {k}")
    if len(images) != len(confidence) or len(images) == 0:
        raise ValueError("confidence_averages needs as many confidences as images (N > 0)")
    order = torch.sort(confidence, descending=True, stable=True).indices
    k = min(k, len(order))
    return images[order[:k]].mean(dim=0), images[order[-k:]].mean(dim=0)


def network_driven_average(model: ClassifierHandle, start: torch.Tensor, cls: int,
                           steps: int = 100, lr: float = 0.02, weight_decay: float = 1e-3) -> torch.Tensor:
    """Activation maximisation from the simple average (reference picture only, as the thesis).

    Maximises y_cls(x) - weight_decay * ||x - start||^2 over pixel-space x with Adam, clamping x
    to [0, 1] after every step.
    """
    x = start.detach().clone()[None].requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -model(x)[0, cls] + weight_decay * (x - start).pow(2).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
    return x.detach()[0]


# --------------------------------------------------------------------------------------------
# Guided backprop of single neurons
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


@dataclass
class NeuronVisuals:
    """The visualisations of the ``show`` highest- and lowest-similarity neurons of one
    (class, layer, method): neuron indices, similarities and GBP maps (n, 3, H, W)."""

    top: list[int]
    top_values: list[float]
    top_maps: torch.Tensor
    bottom: list[int]
    bottom_values: list[float]
    bottom_maps: torch.Tensor


def neuron_similarities(model: ClassifierHandle, averages: dict[int, torch.Tensor],
                        layers: Sequence[str], methods: Sequence[int] = METHODS,
                        channel_batch: int = 64, show: int = 4, progress=None,
                        ) -> tuple[pd.DataFrame, dict[tuple[int, str, int], NeuronVisuals]]:
    """s_ijk for every class average image I_i (``averages``: {class: (3, H, W)}), layer j and
    neuron k of that layer, by each method (1: against I_i, 2: against phi_i).

    Returns the tidy table (class, layer, neuron, method, similarity, activated, activation)
    where ``activated`` = the neuron's activation map on I_i has a positive value and
    ``activation`` is its spatial sum, and the top/bottom ``show`` visualisations per
    (class, layer, method). ``progress(done, total)`` is called after each (class, layer).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--method: expected 1, 2 or both, got {list(methods)}")
    rows: list[pd.DataFrame] = []
    visuals: dict[tuple[int, str, int], NeuronVisuals] = {}
    total, done = len(averages) * len(layers), 0
    for cls, image in averages.items():
        references = {1: image.to(model.device)}
        if 2 in methods:
            references[2] = class_guided_backprop(model, image, cls)
        for layer in layers:
            gbp, activation = channel_guided_backprop(model, image, layer, channel_batch=channel_batch)
            act = activation.reshape(activation.shape[0], -1)
            for method in methods:
                values = cosine_similarity(gbp, references[method])
                rows.append(pd.DataFrame({
                    "class": cls, "layer": layer, "neuron": np.arange(len(values)),
                    "method": method, "similarity": values.cpu().numpy(),
                    "activated": (act.amax(dim=1) > 0).cpu().numpy(),
                    "activation": act.sum(dim=1).double().cpu().numpy()}))
                visuals[(cls, layer, method)] = _extremes(values, gbp, show)
            done += 1
            if progress is not None:
                progress(done, total)
    table = pd.concat(rows, ignore_index=True)
    table["layer"] = pd.Categorical(table["layer"], categories=list(layers), ordered=True)
    return table, visuals


def _extremes(values: torch.Tensor, gbp: torch.Tensor, show: int) -> NeuronVisuals:
    finite = torch.nonzero(torch.isfinite(values)).flatten()
    order = finite[torch.sort(values[finite], descending=True, stable=True).indices]
    top, bottom = order[:show], order.flip(0)[:show]
    return NeuronVisuals(top.tolist(), values[top].tolist(), gbp[top].cpu(),
                         bottom.tolist(), values[bottom].tolist(), gbp[bottom].cpu())


def layer_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per (method, layer, class): mean and std (ddof=1) of the similarities of the layer's
    neurons, NaN (never-visualised) neurons left out and counted in ``n_nan``; plus class "all":
    the average over classes of the per-class mean and of the per-class std."""
    grouped = table.groupby(["method", "layer", "class"], observed=True)["similarity"]
    per_class = grouped.agg(mean="mean", std="std", n="count", neurons="size").reset_index()
    per_class["n_nan"] = per_class["neurons"] - per_class["n"]
    averaged = (per_class.groupby(["method", "layer"], observed=True)
                .agg(mean=("mean", "mean"), std=("std", "mean"), n=("n", "sum"),
                     neurons=("neurons", "sum"), n_nan=("n_nan", "sum")).reset_index())
    averaged["class"] = "all"
    per_class["class"] = per_class["class"].astype(str)
    curves = pd.concat([per_class, averaged], ignore_index=True)
    return curves.sort_values(["method", "class", "layer"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Pruning check
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def zero_channels(model: ClassifierHandle, plan: dict[str, Sequence[int]]) -> Iterator[None]:
    """Zero the given channels of the given layers' outputs during the block (forward hooks that
    return a copy with those channels set to 0; removed on exit, the weights are untouched)."""
    handles = []
    try:
        for name, channels in plan.items():
            index = torch.as_tensor(list(channels), dtype=torch.long, device=model.device)

            def hook(_module, _inputs, output, index=index):
                return output.index_fill(1, index, 0.0)

            handles.append(model.layer(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def accuracy(model: ClassifierHandle, data: ImageSplit, batch_size: int = 128) -> float:
    """Top-1 accuracy in % of ``model`` on ``data`` (images stored as float or uint8)."""
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data.labels), batch_size):
            images = data.images[start:start + batch_size].to(model.device)
            if images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            predicted = model(images).argmax(dim=1).cpu()
            correct += int((predicted == data.labels[start:start + batch_size]).sum())
    return 100.0 * correct / max(len(data.labels), 1)


def rank_neurons(table: pd.DataFrame, method: int, layer: str) -> pd.Series:
    """Mean similarity over classes of each neuron of ``layer`` (NaN ignored), ascending; neurons
    with no similarity for any class (never visualised) are left out."""
    rows = table[(table["method"] == method) & (table["layer"] == layer)]
    scores = rows.groupby("neuron")["similarity"].mean().dropna()
    return scores.sort_values(kind="stable")


def pruning_table(model: ClassifierHandle, table: pd.DataFrame, layers: Sequence[LayerInfo],
                  test: ImageSplit, ratio: float = 0.4, random_draws: int = 5,
                  seed: int = 0) -> pd.DataFrame:
    """Thesis Table 5-1: per method and layer, accuracy after zeroing the round(ratio * C)
    neurons of highest and, separately, lowest mean similarity (no fine-tuning).

    ``difference`` = acc_prune_bottom - acc_prune_top (positive: the high-similarity neurons
    matter more). ``pruned`` is capped at the number of ranked (ever visualised) neurons.
    ``acc_prune_random`` (not in the thesis; a reference for both) is the mean accuracy over
    ``random_draws`` seeded draws of as many neurons from the same ranked pool (NaN when 0).
    """
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    baseline = accuracy(model, test)
    random_cache: dict[tuple, float] = {}
    rows = []
    for method in sorted(table["method"].unique()):
        for info in layers:
            ranked = rank_neurons(table, int(method), info.name)
            n = min(int(round(ratio * info.channels)), len(ranked))
            top, bottom = ranked.index[len(ranked) - n:].tolist(), ranked.index[:n].tolist()
            with zero_channels(model, {info.name: top}):
                acc_top = accuracy(model, test)
            with zero_channels(model, {info.name: bottom}):
                acc_bottom = accuracy(model, test)
            pool = tuple(sorted(ranked.index.tolist()))
            key = (info.name, pool, n)
            if key not in random_cache:
                random_cache[key] = _random_pruning_accuracy(model, test, info.name, pool, n,
                                                             random_draws, seed)
            rows.append({"method": int(method), "layer": info.name, "neurons": info.channels,
                         "never_visualised": info.channels - len(ranked), "ratio": ratio,
                         "pruned": n, "acc_baseline": baseline, "acc_prune_top": acc_top,
                         "acc_prune_bottom": acc_bottom, "difference": acc_bottom - acc_top,
                         "acc_prune_random": random_cache[key]})
    return pd.DataFrame(rows)


def _random_pruning_accuracy(model: ClassifierHandle, test: ImageSplit, layer: str,
                             pool: Sequence[int], n: int, draws: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n].tolist()]
        with zero_channels(model, {layer: chosen}):
            values.append(accuracy(model, test))
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no global backend state, works headless)
# --------------------------------------------------------------------------------------------


def _as_picture(image: torch.Tensor) -> np.ndarray:
    return image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def gbp_picture(gradient: torch.Tensor) -> np.ndarray:
    """A signed gradient (3, H, W) as an RGB picture: 0 is mid-grey, +-max|g| white/black."""
    peak = gradient.abs().max()
    scaled = gradient / (2 * peak) + 0.5 if peak > 0 else torch.full_like(gradient, 0.5)
    return _as_picture(scaled)


def plot_averages(averages: dict[str, dict[int, torch.Tensor]], class_names: Sequence[str],
                  path: Path) -> None:
    """Grid: one row per kind of class average image, one column per class."""
    from matplotlib.figure import Figure

    kinds = [k for k in averages if averages[k]]
    classes = list(averages[kinds[0]])
    fig = Figure(figsize=(1.2 * len(classes) + 1, 1.3 * len(kinds) + 0.3))
    axes = fig.subplots(len(kinds), len(classes), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, cls in enumerate(classes):
            ax = axes[r][c]
            ax.imshow(_as_picture(averages[kind][cls]))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(class_names[cls][:14], fontsize=8)
            if c == 0:
                ax.set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Mean similarity per layer (+-std band for the class average), one panel per method."""
    from matplotlib.figure import Figure

    methods = sorted(curves["method"].unique())
    fig = Figure(figsize=(6 * len(methods), 4))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        part = curves[curves["method"] == method]
        layers = list(dict.fromkeys(part["layer"].astype(str)))
        x = np.arange(len(layers))
        for cls, rows in part.groupby("class", sort=False):
            if cls == "all":
                continue
            ax.plot(x, rows["mean"].to_numpy(), lw=0.8, alpha=0.5, label=f"class {cls}")
        mean_rows = part[part["class"] == "all"]
        mean, std = mean_rows["mean"].to_numpy(), mean_rows["std"].to_numpy()
        ax.plot(x, mean, color="black", lw=2.5, marker="o", label="average")
        ax.fill_between(x, mean - std, mean + std, color="grey", alpha=0.25, label="average +- std")
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("similarity value (cosine)")
        ax.set_title(f"method {method}: GBP(I, j, k) vs {'I' if method == 1 else 'phi = GBP(I, out, i)'}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_neurons(visuals: dict[tuple[int, str, int], NeuronVisuals], image: torch.Tensor,
                 cls: int, method: int, layers: Sequence[str], path: Path, title: str) -> None:
    """Grid for one class and method: per layer the class average, the top and bottom neurons'
    GBP visualisations, each titled with its neuron index and similarity."""
    from matplotlib.figure import Figure

    show = max(max(len(visuals[(cls, l, method)].top), len(visuals[(cls, l, method)].bottom))
               for l in layers)
    cols = 1 + 2 * max(show, 1)
    fig = Figure(figsize=(1.3 * cols, 1.45 * len(layers) + 0.4))
    axes = fig.subplots(len(layers), cols, squeeze=False)
    for r, layer in enumerate(layers):
        v = visuals[(cls, layer, method)]
        cells = [(_as_picture(image), "I" if r == 0 else "")]
        cells += [(gbp_picture(m), f"top #{k}\n{s:.3f}") for k, s, m in zip(v.top, v.top_values, v.top_maps)]
        cells += [(None, "")] * (show - len(v.top))
        cells += [(gbp_picture(m), f"bottom #{k}\n{s:.3f}")
                  for k, s, m in zip(v.bottom, v.bottom_values, v.bottom_maps)]
        cells += [(None, "")] * (cols - len(cells))
        for c, (picture, label) in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if picture is not None:
                ax.imshow(picture)
            ax.set_title(label, fontsize=6)
            if c == 0:
                ax.set_ylabel(layer, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# The per-image, model-scope metric
# --------------------------------------------------------------------------------------------


def spread_channels(count: int, wanted: int | None) -> torch.Tensor:
    """``wanted`` channel indices evenly spread over 0..count-1 (all of them when None or more)."""
    if wanted is None or wanted >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, wanted).round().long().unique()


class SimilarityValue(Metric):
    """Mean neuron similarity value of one layer on each image (higher: the layer's neurons
    respond to more of what the image or the class evidence shows).

    Per image x with target c, layer j (default: the model's CAM layer) and each chosen neuron
    k: s_jk = cos(GBP(x, j, k), R) with R = x (method 1) or R = GBP(x, output, c) (method 2);
    the score is the mean of s_jk over the neurons whose visualisation is not all zero (a
    never-activated neuron has no similarity, as in the thesis). ``neurons`` (default 64,
    None = all) evenly spaced channels bound the cost: ceil(neurons / channel_batch) truncated
    forwards and backwards of ``channel_batch`` copies, plus one forward and backward for
    method 2, per image.
    """

    name = "similarity-value"
    direction = "higher"
    kind = "model"
    summary = ("neuron similarity value (Wang 2022) per image: mean cosine of the layer's "
               "per-neuron guided backprop with the image / the class evidence (model-scope)")

    class Options(xbench.Options):
        layer: str | None = xbench.option(None, "layer whose neurons are scored (default: the "
                                                "model's CAM layer)")
        methods: tuple[int, ...] = xbench.option(
            METHODS, "1: cos(GBP, image); 2: cos(GBP, GBP of the class logit)", choices=METHODS)
        neurons: int | None = xbench.option(64, "evenly spaced channels scored (none: all)",
                                            minimum=1)
        channel_batch: int = xbench.option(64, "channel copies per truncated forward", minimum=1,
                                           in_variant=False)

    def format_variant(self, changed):
        # the score keys already name the method, layer and neuron count
        return ""

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        model = batch.model
        layer = self.options.layer or model.default_layer
        module = model.layer(layer)
        with torch.no_grad():
            count = truncated_forward(model, batch.images[:1], module).shape[1]
        channels = spread_channels(count, self.options.neurons)
        values = {method: torch.full((len(batch.images),), float("nan"), dtype=torch.float64)
                  for method in self.options.methods}
        for i, (image, target) in enumerate(zip(batch.images, batch.targets.tolist())):
            gbp, _ = channel_guided_backprop(model, image, layer, channels, self.options.channel_batch)
            references = {1: image}
            if 2 in self.options.methods:
                references[2] = class_guided_backprop(model, image, target)
            for method in self.options.methods:
                similarity = cosine_similarity(gbp, references[method])
                if bool(torch.isfinite(similarity).any()):
                    values[method][i] = similarity.nanmean()
        neurons = "all" if self.options.neurons is None else len(channels)
        return {f"method={method},layer={layer},neurons={neurons}": values[method]
                for method in self.options.methods}


@hookimpl
def register_models(register):
    register(DigitsVGG)


@hookimpl
def register_metrics(register):
    register(SimilarityValue)


@hookimpl
def register_commands(register):
    register("similarity", help="neuron similarity values from class average images (Wang 2022)",
             configure="xbench.cli.similarity:add_arguments", run="xbench.cli.similarity:run")
