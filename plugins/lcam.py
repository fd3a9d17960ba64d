"""L-CAM-Fm and L-CAM-Img (Gkartzonika, Gkalelis & Mezaris, "Learning visual explanations for
DCNN-based image classifiers using an attention mechanism", ECCV Workshops 2022, arXiv 2209.11189).

A trainable attention mechanism (AM) on the last convolutional feature maps F (K, h, w) of a
*frozen* classifier produces one class activation map per class: a 1x1 convolution K -> C
(weights W, bias b) followed by a sigmoid, A = sigmoid(W * F + b); the AM has no other layer.
During training only the map of the ground-truth class c is used:
- L-CAM-Fm: A_c is multiplied into F and the rest of the frozen classifier ("tail") runs on it;
- L-CAM-Img: A_c is upsampled to the input size and multiplied into the pixel-space image, which
  the whole frozen classifier classifies.
Loss: L = l1 CE + l2 mean((A_c + eps) ** l4) + l3 TV(A_c), with l1..l4 = 1.5, 2, 0.01, 0.3 and
TV = squared neighbour differences plus a 0.3-weighted border term, divided by 2 * batch (the
``get_loss`` of the authors' release, bmezaris/L-CAM models/*_L_CAM_*.py; all configurable
through :class:`LossWeights`). One difference: the release indexes the maps with the label
vector (``maps[:, labels]``), so every image's loss terms also see the maps of the *other*
images' labels; here each image contributes only the map of its own label, as the paper
describes.

Inference (:class:`LCAMFm`, :class:`LCAMImg`) is ONE forward pass through the ClassifierHandle:
a forward hook captures F during ``model(images)`` and the map of the target class,
sigmoid(W_c . F + b_c), is computed from the captured features. (The authors' evaluation code
runs the backbone twice: once for F, once more for the masked input.)

Checkpoints are plain dicts of tensors, strings and numbers (``torch.load(weights_only=True)``)
recording the model name, layer, variant, class count, channel count and the training command.
Shipped heads live in ``plugins/assets/lcam-<variant>_<model>.pt`` (fp16 weights).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import xbench
from xbench import ClassifierHandle, Explainer, UserError, capture_activations, hookimpl

VARIANTS = ("fm", "img")
CHECKPOINT_FORMAT = "xbench-lcam/1"
ASSETS = Path(__file__).resolve().parent / "assets"


# --------------------------------------------------------------------------------------------
# The attention mechanism
# --------------------------------------------------------------------------------------------

class AttentionHead(nn.Module):
    """1x1 convolution K -> C over the feature maps: one (pre-sigmoid) map per class.

    ``forward(F)`` returns all C maps (B, C, h, w); :meth:`class_maps` returns only the map of
    one class per image (B, h, w) and costs 1/C of it: W_c . F + b_c with W_c the c-th filter.
    """

    def __init__(self, in_channels: int, num_classes: int, init: str = "pytorch") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True)
        if init == "zero":
            # A = sigmoid(0) = 0.5 everywhere at the start. PyTorch's default (uniform, bound
            # 1/sqrt(K)) saturates the sigmoid on features with a large common mode (EfficientNet
            # _bn1: mean -4.9, std 3.8; ReLU6(_bn1) is mostly 0), which freezes training at
            # spatially constant masks.
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        elif init != "pytorch":
            raise ValueError(f"head init must be 'zero' or 'pytorch', got {init!r}")

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def num_classes(self) -> int:
        return self.conv.out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)

    def class_maps(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid map of class ``classes[i]`` for image i: (B, K, h, w), (B,) -> (B, h, w)."""
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"attention head expects features (B, {self.in_channels}, h, w), "
                             f"got {tuple(features.shape)}")
        classes = classes.to(device=features.device, dtype=torch.long)
        if classes.shape != (features.shape[0],):
            raise ValueError(f"need one class per image: {features.shape[0]} images, "
                             f"classes of shape {tuple(classes.shape)}")
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"class indices must be in [0, {self.num_classes}), "
                             f"got {classes.tolist()}")
        weight = self.conv.weight[classes, :, 0, 0].to(features.dtype)  # (B, K)
        bias = self.conv.bias[classes].to(features.dtype)  # (B,)
        return torch.einsum("bk,bkhw->bhw", weight, features) + bias[:, None, None]


# --------------------------------------------------------------------------------------------
# The rest of the frozen classifier after the feature layer ("tail"), per architecture family
# --------------------------------------------------------------------------------------------

def classifier_tail(net: nn.Module, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Function mapping the output of ``layer`` to the logits, exactly as ``net.forward`` does.

    Supported (L-CAM-Fm needs one; L-CAM-Img works on any classifier):
    - EfficientNet-Lite (``efficientnet_lite_pytorch``), layer ``_swish._bn1`` (the head's
      ReLU6, the default): ``_avg_pooling`` -> flatten -> ``_dropout`` -> ``_fc``; layer
      ``_bn1``: the head's ReLU6 first;
    - torchvision ResNet/ResNeXt/Wide-ResNet, layer ``layer4``: avgpool -> flatten -> fc;
    - torchvision VGG, layer ``features.N``: ``features[N+1:]`` -> avgpool -> flatten ->
      classifier.
    Raises :class:`UserError` for anything else.
    """
    import torchvision

    if (type(net).__module__.startswith("efficientnet_lite_pytorch")
            and layer in ("_swish._bn1", "_bn1")):
        if getattr(net._global_params, "local_pooling", False):
            raise UserError("L-CAM-Fm: EfficientNet-Lite with local_pooling is not supported")
        return functools.partial(_efficientnet_lite_tail, net, layer == "_bn1")
    if isinstance(net, torchvision.models.ResNet) and layer == "layer4":
        return functools.partial(_resnet_tail, net)
    if isinstance(net, torchvision.models.VGG) and layer.startswith("features."):
        index = layer.split(".", 1)[1]
        if index.isdigit() and int(index) < len(net.features):
            return functools.partial(_vgg_tail, net, int(index))
    raise UserError(
        f"L-CAM-Fm cannot run the rest of {type(net).__name__} after layer {layer!r}: supported "
        "are EfficientNet-Lite at '_swish._bn1' or '_bn1', torchvision ResNet at 'layer4' and torchvision VGG at "
        "'features.N'. Use L-CAM-Img (--variant img), which needs no tail, or add a tail for "
        "this architecture to xbench_plugins.lcam.classifier_tail."
    )


def _efficientnet_lite_tail(net: nn.Module, activate: bool, features: torch.Tensor) -> torch.Tensor:
    # mirrors EfficientNet.extract_features' last line and EfficientNet.forward after it; the
    # head's own ReLU6 (its call site once the shared _swish is split, see xbench.layers)
    head_activation = getattr(net._swish, "_bn1", net._swish)
    x = head_activation(features) if activate else features
    x = net._avg_pooling(x).flatten(1)
    return net._fc(net._dropout(x))


def _resnet_tail(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return net.fc(torch.flatten(net.avgpool(features), 1))


def _vgg_tail(net: nn.Module, index: int, features: torch.Tensor) -> torch.Tensor:
    x = net.features[index + 1:](features)
    return net.classifier(torch.flatten(net.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """Weights of the L-CAM loss; defaults are those of the authors' release (see module doc).

    ``ce`` lambda_1, ``area`` lambda_2, ``tv`` lambda_3, ``area_power`` lambda_4;
    ``area_eps`` keeps the gradient of x**0.3 finite at 0; ``tv_power`` and ``tv_border`` shape
    the total-variation term (:func:`total_variation`).
    """

    ce: float = 1.5
    area: float = 2.0
    tv: float = 0.01
    area_power: float = 0.3
    area_eps: float = 0.0005
    tv_power: float = 2.0
    tv_border: float = 0.3


def area_term(masks: torch.Tensor, power: float = 0.3, eps: float = 0.0005) -> torch.Tensor:
    """Average-mask term: mean over all elements of (A + eps) ** power (A in [0, 1])."""
    if power != 1:
        masks = (masks + eps) ** power
    return masks.mean()


def total_variation(masks: torch.Tensor, power: float = 2.0, border: float = 0.3) -> torch.Tensor:
    """TV(A) for masks (B, h, w): (sum |vertical diffs|^p + sum |horizontal diffs|^p
    + border * sum over the four edge lines of A^p) / (p * B).

    The border term pushes the mask towards 0 at the image edges; dividing by the batch size
    makes the term a per-image average.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, h, w), got {tuple(masks.shape)}")
    vertical = (masks[:, 1:, :] - masks[:, :-1, :]).abs().pow(power).sum()
    horizontal = (masks[:, :, 1:] - masks[:, :, :-1]).abs().pow(power).sum()
    edges = (masks[:, 0, :].pow(power).sum() + masks[:, -1, :].pow(power).sum()
             + masks[:, :, 0].pow(power).sum() + masks[:, :, -1].pow(power).sum())
    return (vertical + horizontal + border * edges) / (power * masks.shape[0])


def lcam_loss(logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
              weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """L = l1 CE(logits, labels) + l2 mean(A^l4) + l3 TV(A); returns every weighted term.

    ``masks`` are the sigmoid maps A_c (B, h, w) of the labelled classes at feature resolution.
    """
    terms = {
        "ce": weights.ce * F.cross_entropy(logits, labels),
        "area": weights.area * area_term(masks, weights.area_power, weights.area_eps),
        "tv": weights.tv * total_variation(masks, weights.tv_power, weights.tv_border),
    }
    terms["loss"] = terms["ce"] + terms["area"] + terms["tv"]
    return terms


# --------------------------------------------------------------------------------------------
# The two training-time models (frozen classifier + trainable head)
# --------------------------------------------------------------------------------------------

def masked_logits_fm(tail: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                     masks: torch.Tensor) -> torch.Tensor:
    """L-CAM-Fm: logits of the tail on F * A_c (masks (B, h, w) broadcast over channels)."""
    return tail(features * masks[:, None])


def masked_logits_img(model: ClassifierHandle, images: torch.Tensor,
                      masks: torch.Tensor) -> torch.Tensor:
    """L-CAM-Img: logits of the whole classifier on x * upsample(A_c) (bilinear, to input)."""
    upsampled = F.interpolate(masks[:, None], size=images.shape[-2:], mode="bilinear",
                              align_corners=False)
    return model(images * upsampled)


def layer_features(model: ClassifierHandle, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` on ``images`` (one forward pass, no autograd)."""
    with torch.no_grad(), capture_activations(model.layer(layer), keep_grad=False) as store:
        model(images)
    if "activation" not in store:
        raise RuntimeError(f"layer {layer!r} was not called during the forward pass")
    return store["activation"].detach()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

@dataclass
class HeadInfo:
    """What a checkpoint says about its head: where it applies and how it was made."""

    model: str
    layer: str
    variant: str
    num_classes: int
    in_channels: int
    command: str = ""
    seed: int = 0
    epochs_done: int = 0
    data: str = ""
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: str = ""


def save_checkpoint(path: str | Path, head: AttentionHead, info: HeadInfo,
                    training: dict[str, Any] | None = None, half: bool = False) -> None:
    """Write head + info (+ optional training state: optimizer, epoch, RNG) atomically."""
    path = Path(path)
    state = {k: (v.half() if half else v).detach().cpu().clone() for k, v in head.state_dict().items()}
    payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "info": dataclasses.asdict(info),
                               "state_dict": state}
    if training is not None:
        payload["training"] = training
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[AttentionHead, HeadInfo, dict[str, Any] | None]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights_only=True); fp32 head."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"L-CAM checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many kinds
        raise UserError(f"L-CAM checkpoint {path}: cannot be read with weights_only=True "
                        f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"L-CAM checkpoint {path}: not an xbench L-CAM checkpoint (expected "
                        f"format {CHECKPOINT_FORMAT!r}); train one with `xbench train lcam`")
    info = HeadInfo(**payload["info"])
    head = AttentionHead(info.in_channels, info.num_classes)
    head.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return head.eval(), info, payload.get("training")


def check_compatible(info: HeadInfo, model: ClassifierHandle, source: str,
                     variant: str | None = None) -> None:
    """Refuse a head made for another model, class count, channel count or variant."""
    train_hint = (f"train one with: xbench train lcam --model {model.name or 'NAME'} "
                  f"--variant {variant or info.variant} --data FOLDER --epochs E --out FILE.pt")
    if model.name and info.model != model.name:
        raise UserError(f"L-CAM checkpoint {source} was trained for model {info.model!r} "
                        f"(layer {info.layer!r}), not for {model.name!r}; {train_hint}")
    if info.num_classes != model.num_classes:
        raise UserError(f"L-CAM checkpoint {source} has {info.num_classes} classes but the "
                        f"model has {model.num_classes}; {train_hint}")
    if variant is not None and info.variant != variant:
        raise UserError(f"L-CAM checkpoint {source} holds an L-CAM-{info.variant.capitalize()} "
                        f"head; use explainer 'lcam-{info.variant}' for it or {train_hint}")


def default_checkpoint(variant: str, model_name: str) -> Path:
    return ASSETS / f"lcam-{variant}_{model_name}.pt"


@functools.lru_cache(maxsize=8)
def _cached_checkpoint(path: str, mtime: float) -> tuple[AttentionHead, HeadInfo]:
    head, info, _ = load_checkpoint(path)
    return head, info


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Explainers
# --------------------------------------------------------------------------------------------

class _LCAM(Explainer):
    """Map = sigmoid(W_c . F + b_c) at feature resolution, F captured in one forward pass."""

    lcam_variant: str
    needs_gradients = False
    uses_layer = True

    class Options(xbench.Options):
        checkpoint: str | None = xbench.option(
            None, "trained head (xbench train lcam; default: the shipped head of the model)")

    def format_variant(self, changed):
        # a file is recorded by name and content digest, so a retrained head is a new variant
        checkpoint = self.options.checkpoint
        if checkpoint is None:
            return "checkpoint=shipped"
        return f"checkpoint={Path(checkpoint).name}@{file_digest(checkpoint)}"

    def resolve_checkpoint(self, model: ClassifierHandle) -> Path:
        if self.options.checkpoint is not None:
            return Path(self.options.checkpoint)
        path = default_checkpoint(self.lcam_variant, model.name)
        if not path.is_file():
            shipped = sorted(p.stem.split("_", 1)[1] for p in ASSETS.glob(f"lcam-{self.lcam_variant}_*.pt"))
            raise UserError(
                f"explainer {self.name!r}: no shipped L-CAM-{self.lcam_variant.capitalize()} head "
                f"for model {model.name or '(unnamed)'!r} (shipped for: {', '.join(shipped) or 'none'}). "
                f"Train one with: xbench train lcam --model {model.name or 'NAME'} --variant "
                f"{self.lcam_variant} --data FOLDER --epochs E --out head.pt, then pass option "
                f"checkpoint=head.pt"
            )
        return path

    def head_for(self, model: ClassifierHandle) -> tuple[AttentionHead, HeadInfo]:
        path = self.resolve_checkpoint(model)
        if not path.is_file():
            raise UserError(f"explainer {self.name!r}: checkpoint {path}: no such file")
        head, info = _cached_checkpoint(str(path.resolve()), path.stat().st_mtime)
        check_compatible(info, model, str(path), variant=self.lcam_variant)
        if self.layer is not None and self.layer != info.layer:
            raise UserError(f"explainer {self.name!r}: checkpoint {path} was trained on layer "
                            f"{info.layer!r}, but --layer {self.layer!r} was asked for; drop "
                            "--layer or train a head for that layer")
        return head.to(model.device), info

    def explain(self, model, images, targets):
        head, info = self.head_for(model)
        with torch.no_grad():
            features = layer_features(model, info.layer, images)  # the one forward pass
            if features.shape[1] != head.in_channels:
                raise UserError(f"explainer {self.name!r}: layer {info.layer!r} has "
                                f"{features.shape[1]} channels, the head expects {head.in_channels}")
            return torch.sigmoid(head.class_maps(features.float(), targets))


class LCAMFm(_LCAM):
    name = "lcam-fm"
    lcam_variant = "fm"
    summary = "L-CAM-Fm: learned attention map (trained on feature maps), 1 forward pass"


class LCAMImg(_LCAM):
    name = "lcam-img"
    lcam_variant = "img"
    summary = "L-CAM-Img: learned attention map (trained on the masked image), 1 forward pass"


@hookimpl
def register_explainers(register):
    register(LCAMFm)
    register(LCAMImg)


# --------------------------------------------------------------------------------------------
# Training (library functions; `xbench train lcam` is the command-line front end)
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    variant: str
    epochs: int
    seed: int = 0
    lr: float = 1e-4
    optimizer: str = "adam"
    head_init: str = "zero"
    weight_decay: float = 0.0
    batch_size: int = 64
    views: int = 1
    loss: LossWeights = LossWeights()

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.views < 1:
            raise UserError("--epochs, --batch-size and --views must be positive")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"--optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


def make_optimizer(head: AttentionHead, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (default here), or the authors' SGD (Nesterov momentum 0.9, bias learning rate x2;
    they use lr 1e-4 and weight decay 5e-4 for ~20k steps per epoch on ImageNet; with 16-32
    steps per epoch on a 1000-image set Adam converges in a CPU-affordable number of epochs)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD([{"params": [head.conv.weight], "lr": config.lr},
                                {"params": [head.conv.bias], "lr": 2 * config.lr}],
                               momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def augmented_view(square: torch.Tensor, crop: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random ``crop`` x ``crop`` window and random horizontal flip of images (B, 3, S, S);
    the center crop when ``generator`` is None (view 0)."""
    size = square.shape[-1]
    if generator is None:
        top = left = (size - crop) // 2
        return square[..., top:top + crop, left:left + crop]
    out = []
    for image in square:
        top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=generator))
        view = image[:, top:top + crop, left:left + crop]
        if bool(torch.rand((), generator=generator) < 0.5):
            view = view.flip(-1)
        out.append(view)
    return torch.stack(out)


@dataclass
class StepStats:
    loss: float
    ce: float
    area: float
    tv: float
    correct: int
    count: int


def train_step(head: AttentionHead, optimizer: torch.optim.Optimizer, config: TrainConfig,
               labels: torch.Tensor, features: torch.Tensor,
               tail: Callable[[torch.Tensor], torch.Tensor] | None = None,
               model: ClassifierHandle | None = None,
               images: torch.Tensor | None = None) -> StepStats:
    """One optimisation step on a batch; the backbone stays frozen (only ``head`` is stepped).

    fm: needs ``tail``; img: needs ``model`` and the ``images`` the features came from.
    """
    head.train()
    masks = torch.sigmoid(head.class_maps(features, labels))  # A_c of the labelled class
    if config.variant == "fm":
        logits = masked_logits_fm(tail, features, masks)
    else:
        logits = masked_logits_img(model, images, masks)
    terms = lcam_loss(logits, labels, masks, config.loss)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    correct = int((logits.argmax(1) == labels).sum())
    return StepStats(*(float(terms[k].detach()) for k in ("loss", "ce", "area", "tv")), correct,
                     int(labels.numel()))


def freeze(model: ClassifierHandle) -> None:
    """Eval mode (frozen BN statistics, no dropout) and no parameter gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    yield from order.split(batch_size)


def evaluate_masked_accuracy(head: AttentionHead, features: torch.Tensor, labels: torch.Tensor,
                             tail: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Top-1 of the tail on F * A_c over cached features (fm sanity check)."""
    head.eval()
    correct = 0
    with torch.no_grad():
        for idx in torch.arange(len(labels)).split(256):
            masks = torch.sigmoid(head.class_maps(features[idx], labels[idx]))
            correct += int((masked_logits_fm(tail, features[idx], masks).argmax(1) == labels[idx]).sum())
    return correct / max(1, len(labels))


def mean_stats(stats: Sequence[StepStats]) -> dict[str, float]:
    total = sum(s.count for s in stats) or 1
    out = {k: sum(getattr(s, k) * s.count for s in stats) / total for k in ("loss", "ce", "area", "tv")}
    out["acc"] = sum(s.correct for s in stats) / total
    return out


@hookimpl
def register_commands(register):
    register("train lcam", help="train an L-CAM attention head on a frozen classifier",
             configure="xbench.cli.train_lcam:add_arguments", run="xbench.cli.train_lcam:run")
