"""Mutual transfer of local attention maps (Cheng, Wang, Cui, Zhan, Computer Science 49(5):64-70, 2022).

Two students are trained at the same time: ST1 "with prior knowledge" (pretrained) and ST2.
After chosen blocks of each student the activation-based attention map F(A) = sum_c |A_c|^2
(eq. 1) is taken, the two maps of a paired layer are brought to a common size, split into k
local regions (a grid), and for every region the Pearson correlation of the two students'
maps (eq. 4) decides whether that region transfers (r > lambda) or is dropped so that it cannot
cause negative transfer. Each student's loss is

    L_i = CE(y, p_i) + beta/2 * sum_{layers j} sum_{kept regions r} || Q_i/||Q_i||_2 - Q_o/||Q_o||_2 ||_2

(eq. 5) where Q_o is the *other* student's local map. Global transfer (the paper's ablation,
every region kept) is the same code with lambda = -1.

No public implementation exists; this module is the reference one. Choices the paper text
available to us does not pin (only the abstract could be consulted), each one a named option:

- The other student's map in L_i is a constant target (``detach``), as in deep mutual learning
  and attention transfer, so L_i's gradient reaches student i only; both students step on
  L_1 + L_2 each batch (one backward pass, one optimizer).
- Paired maps of different sizes are brought to the smaller size by adaptive average pooling
  (area resampling; exact for integer ratios, e.g. EfficientNet-Lite1's 8x8 -> Lite0's 7x7).
- The k regions are a ``rows x cols`` grid (``--grid``, default 2x2) with near-equal integer
  boundaries (i*H//rows); the paper derives the region size from the layer's kernel size,
  which we leave to the user to express as a grid.
- Q/||Q||_2 is taken per region (the region is the "local attention map"), per image; the loss
  is the batch mean of the per-image sums. The mask is per image and per region.
- Pearson r of a constant region is undefined; we score it 0 (no evidence of agreement).
  lambda <= -1 keeps every region, including the measure-zero r = -1 case, so that lambda = -1
  is exactly global transfer.
- Transfer points: the three group outputs of the WRN-like ST1 and the three stage outputs of
  the MobileNet-like ST2 (32, 16 and 8 px on 32x32 inputs); for EfficientNet-Lite the last block
  of each of the three deepest resolutions (Lite0 ``_blocks.4/10/15``, Lite1 ``_blocks.6/14/20``).
  Paired in order, so resolutions agree up to Lite0/Lite1's 224 vs 240 px inputs.
- "Prior knowledge" of ST1: ImageNet weights for EfficientNet-Lite; a from-scratch small ST1
  first gets ``pretrain_epochs`` (default 2) of plain cross-entropy on the training data.
- Each student gets its own input size: images are read once at the larger student's
  resize/crop (same 0.875 crop ratio) and resized (bilinear, antialiased) for the other.
- Optimisation (not given in the abstract): SGD, Nesterov momentum 0.9, weight decay 5e-4,
  cosine-annealed per step; BatchNorm statistics optionally frozen for pretrained students.

Reproduce (``xbench train mutual-transfer --help``):
- digits Table-1 demo: ``xbench train mutual-transfer --data digits --compare --out DIR``
  (small-wrn + small-mobilenet; independent, global and local at lambda 0.5, 0.9, 0.99, 0.998
  (``--lambdas``), beta 1, grid 2x2, 3 epochs, batch 32, seed 0; held-out 540 digits,
  stratified split with fixed seed 0); ``python -m xbench_plugins.mutual_transfer_report
  DIR/table1.json PLOT.png`` draws kept fraction and top-1 against lambda;
- ImageNet scale: ``--st1 efficientnet-lite0 --st2 efficientnet-lite1 --data
  ../shared/data/imagenet_sample_1000 --val-data ../shared/data/ilsvrc2012_val_1000 --lr 0.001
  --batch-size 16 --freeze-bn --compare`` (with ``--limit`` / ``--val-limit`` on a shared CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import xbench
from xbench import LoadedModel, Model, UserError, hookimpl

CHECKPOINT_FORMAT = "xbench-mutual-transfer"
CHECKPOINT_VERSION = 1
MEMBERS = ("st1", "st2")


# ---------------------------------------------------------------------------------------------
# The method: attention maps, regions, Pearson correlation, mask, loss
# ---------------------------------------------------------------------------------------------

def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """F(A) = sum_c |A_c|^2 over the channels of a (B, C, H, W) activation -> (B, H, W) (eq. 1)."""
    if activation.dim() != 4:
        raise ValueError(f"attention_map needs a (B, C, H, W) activation, got {tuple(activation.shape)}")
    return activation.pow(2).sum(dim=1)


def match_size(map1: torch.Tensor, map2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B, H, W) maps to the smaller common size by adaptive average pooling."""
    height = min(map1.shape[-2], map2.shape[-2])
    width = min(map1.shape[-1], map2.shape[-1])

    def resize(m: torch.Tensor) -> torch.Tensor:
        if tuple(m.shape[-2:]) == (height, width):
            return m
        return F.adaptive_avg_pool2d(m[:, None], (height, width))[:, 0]

    return resize(map1), resize(map2)


def parse_grid(spec: str | Sequence[int]) -> tuple[int, int]:
    """'2x3' or (2, 3) -> (rows, cols); a single number n means n x n."""
    if isinstance(spec, str):
        parts = spec.lower().replace("×", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--grid {spec!r}: expected ROWSxCOLS such as 2x2 or 4x4") from None
    else:
        values = [int(v) for v in spec]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise UserError(f"--grid {spec!r}: expected two positive integers ROWSxCOLS such as 2x2")
    return values[0], values[1]


def region_slices(height: int, width: int, grid: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The k = rows*cols grid cells of an H x W map, raster order, near-equal integer bounds."""
    rows, cols = grid
    if rows > height or cols > width:
        raise UserError(f"--grid {rows}x{cols} has more cells than the {height}x{width} attention "
                        "map of a paired layer; use a coarser grid")
    row_edges = [i * height // rows for i in range(rows + 1)]
    col_edges = [j * width // cols for j in range(cols + 1)]
    return [(slice(row_edges[i], row_edges[i + 1]), slice(col_edges[j], col_edges[j + 1]))
            for i in range(rows) for j in range(cols)]


def split_regions(maps: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Split (B, H, W) maps into k local maps, each flattened to (B, n_r)."""
    return [maps[:, rs, cs].flatten(1) for rs, cs in region_slices(maps.shape[-2], maps.shape[-1], grid)]


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of each row of x and y, (B, n) -> (B,) (eq. 4).

    r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2);
    a row with zero variance in either input gives 0. Clamped to [-1, 1]: rounding can put a
    proportional pair at 1 + 1e-7, which a threshold lambda = 1 must still drop.
    """
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    cov = (xc * yc).sum(dim=1)
    scale = xc.pow(2).sum(dim=1).sqrt() * yc.pow(2).sum(dim=1).sqrt()
    r = torch.where(scale > eps, cov / scale.clamp_min(eps), torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)


def region_correlations(regions1: list[torch.Tensor], regions2: list[torch.Tensor]) -> torch.Tensor:
    """Pearson r of every region pair: (B, k)."""
    return torch.stack([pearson(a, b) for a, b in zip(regions1, regions2)], dim=1)


def region_mask(correlations: torch.Tensor, lam: float) -> torch.Tensor:
    """Regions that transfer: r > lambda; lambda <= -1 keeps all (global transfer)."""
    if lam <= -1:
        return torch.ones_like(correlations, dtype=torch.bool)
    return correlations > lam


def normalized_distance(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """|| q1/||q1||_2 - q2/||q2||_2 ||_2 per row, (B, n) -> (B,) (the summand of eq. 5)."""
    return (F.normalize(q1, dim=1) - F.normalize(q2, dim=1)).norm(dim=1)


@dataclass
class TransferTerms:
    """Per-image attention-transfer sums for each student and what the mask kept."""

    student1: torch.Tensor  # (B,) sum over layers and kept regions, gradient to student 1 only
    student2: torch.Tensor  # (B,) same, gradient to student 2 only
    kept: int = 0
    total: int = 0
    correlations: list[torch.Tensor] = field(default_factory=list)  # per layer (B, k)
    layer_kept: list[int] = field(default_factory=list)  # kept regions per layer pair
    layer_total: list[int] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def layer_kept_fractions(self) -> list[float]:
        return [k / t if t else 0.0 for k, t in zip(self.layer_kept, self.layer_total)]


def transfer_terms(maps1: Sequence[torch.Tensor], maps2: Sequence[torch.Tensor],
                   grid: tuple[int, int], lam: float, detach_target: bool = True) -> TransferTerms:
    """Local attention-map transfer in both directions over paired layers (eqs. 4-5).

    ``maps1[j]`` and ``maps2[j]`` are the (B, H, W) attention maps of paired layer j. Each
    student's term compares its own local maps with the other's; with ``detach_target`` the
    other's map is a constant, so each term's gradient reaches one student only. The mask
    comes from detached maps (a selection, not something to learn through).
    """
    if len(maps1) != len(maps2):
        raise ValueError(f"students have {len(maps1)} and {len(maps2)} transfer layers; pair them")
    batch = maps1[0].shape[0]
    sum1 = maps1[0].new_zeros(batch)
    sum2 = maps1[0].new_zeros(batch)
    terms = TransferTerms(sum1, sum2)
    for m1, m2 in zip(maps1, maps2):
        m1, m2 = match_size(m1, m2)
        regions1, regions2 = split_regions(m1, grid), split_regions(m2, grid)
        with torch.no_grad():
            r = region_correlations([q.detach() for q in regions1], [q.detach() for q in regions2])
        keep = region_mask(r, lam).to(m1.dtype)
        terms.correlations.append(r)
        terms.layer_kept.append(int(keep.sum()))
        terms.layer_total.append(keep.numel())
        terms.kept += terms.layer_kept[-1]
        terms.total += terms.layer_total[-1]
        for k, (q1, q2) in enumerate(zip(regions1, regions2)):
            target2 = q2.detach() if detach_target else q2
            target1 = q1.detach() if detach_target else q1
            sum1 = sum1 + keep[:, k] * normalized_distance(q1, target2)
            sum2 = sum2 + keep[:, k] * normalized_distance(q2, target1)
    terms.student1, terms.student2 = sum1, sum2
    return terms


def mutual_transfer_losses(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor,
                           maps1: Sequence[torch.Tensor], maps2: Sequence[torch.Tensor],
                           grid: tuple[int, int], lam: float, beta: float,
                           detach_target: bool = True) -> tuple[torch.Tensor, torch.Tensor, TransferTerms]:
    """(L_1, L_2, terms): L_i = CE_i + beta/2 * batch mean of student i's transfer sum (eq. 5)."""
    terms = transfer_terms(maps1, maps2, grid, lam, detach_target)
    loss1 = F.cross_entropy(logits1, labels) + beta / 2 * terms.student1.mean()
    loss2 = F.cross_entropy(logits2, labels) + beta / 2 * terms.student2.mean()
    return loss1, loss2, terms


@contextlib.contextmanager
def capture_outputs(net: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during a block (hooks removed on exit)."""
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"transfer layer(s) {missing} not found in the network")
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda _m, _i, out, _n=name: store.__setitem__(_n, out)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Students: small 32x32 networks (the digits demo) and EfficientNet-Lite (ImageNet scale)
# ---------------------------------------------------------------------------------------------

class _WideBasic(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + skip


class SmallWideResNet(nn.Module):
    """WRN-like ST1 for 32x32 inputs: stem, three groups (32, 16, 8 px), BN-ReLU, pool, fc.

    WRN-8-2 shape (one block per group, widen factor 2 on base widths 8/16/32); the group
    outputs ``group1..3`` are the transfer points (as in attention transfer on WRNs) and the
    final ``relu`` (called once) is the default CAM layer.
    """

    def __init__(self, num_classes: int, widen: int = 2) -> None:
        super().__init__()
        widths = [8 * widen, 16 * widen, 32 * widen]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.group1 = _WideBasic(16, widths[0], 1)
        self.group2 = _WideBasic(widths[0], widths[1], 2)
        self.group3 = _WideBasic(widths[1], widths[2], 2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet depthwise-separable unit: dw3x3-BN-ReLU6, pw1x1-BN-ReLU6."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class SmallMobileNet(nn.Module):
    """MobileNet-like ST2 for 32x32 inputs: stem and three stages of separable units (32/16/8 px).

    The stage outputs ``stage1..3`` are the transfer points; ``stage3`` is the CAM layer.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.stage1 = _separable(16, 24, 1)
        self.stage2 = nn.Sequential(_separable(24, 48, 2), _separable(48, 48, 1))
        self.stage3 = nn.Sequential(_separable(48, 96, 2), _separable(96, 96, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


SMALL_ARCHS = {
    "small-wrn": (SmallWideResNet, ("group1", "group2", "group3"), "relu"),
    "small-mobilenet": (SmallMobileNet, ("stage1", "stage2", "stage3"), "stage3"),
}
EFFICIENTNET_ARCHS = {"efficientnet-lite0": 0, "efficientnet-lite1": 1, "efficientnet-lite2": 2}
ARCHS = tuple(SMALL_ARCHS) + tuple(EFFICIENTNET_ARCHS)
SMALL_INPUT = 32
SMALL_MEAN = (0.5, 0.5, 0.5)
SMALL_STD = (0.5, 0.5, 0.5)


@dataclass
class Student:
    """A network with what training and the Model plugin need to feed and read it."""

    arch: str
    net: nn.Module
    num_classes: int
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    transfer_layers: tuple[str, ...]
    default_layer: str
    pretrained: bool
    #: channels-last memory format (about 1.5-2x faster depthwise convolutions on CPU); numerics
    #: are those of the same convolutions, only the memory layout differs
    channels_last: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel-space [0,1] images of any square size -> this student's normalised input."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        images = (images - mean) / std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def spec(self) -> dict[str, Any]:
        """What the checkpoint stores to rebuild this student (besides its state dict)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "input_size": self.input_size,
                "resize_size": self.resize_size, "mean": list(self.mean), "std": list(self.std),
                "transfer_layers": list(self.transfer_layers), "default_layer": self.default_layer,
                "pretrained": self.pretrained}


def efficientnet_stage_ends(net: nn.Module, input_size: int, count: int = 3) -> tuple[str, ...]:
    """Names of the last block of each of the ``count`` deepest resolutions (a dry forward)."""
    sizes: list[tuple[int, int]] = []
    handles = [b.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
               for b in net._blocks]
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    ends = [i for i in range(len(sizes)) if i + 1 == len(sizes) or sizes[i + 1] != sizes[i]]
    return tuple(f"_blocks.{i}" for i in ends[-count:])


def build_student(arch: str, num_classes: int, pretrained: bool, seed: int | None = None) -> Student:
    """Build ``arch`` for ``num_classes`` classes.

    Small nets are initialised from ``seed``; EfficientNet-Lite loads its ImageNet weights when
    ``pretrained`` (through the efficientnet-lite Model plugin) and gets a fresh, seeded
    classifier when ``num_classes`` is not 1000.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if arch in SMALL_ARCHS:
        cls, layers, cam = SMALL_ARCHS[arch]
        return Student(arch, cls(num_classes), num_classes, SMALL_INPUT, SMALL_INPUT, SMALL_MEAN,
                       SMALL_STD, layers, cam, pretrained=False)
    if arch not in EFFICIENTNET_ARCHS:
        raise UserError(f"unknown student architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    from efficientnet_lite_pytorch import EfficientNet

    from xbench_plugins.efficientnet_lite import _WEIGHT_PACKAGES, INPUT_MEAN, INPUT_STD

    variant = EFFICIENTNET_ARCHS[arch]
    size = _WEIGHT_PACKAGES[variant][2]
    if pretrained:
        from xbench.plugins import build_registry

        net = build_registry().model(arch)().load().module
    else:
        net = EfficientNet.from_name(arch)
    if num_classes != net._fc.out_features:
        net._fc = nn.Linear(net._fc.in_features, num_classes)
    layers = efficientnet_stage_ends(net, size)
    net = net.to(memory_format=torch.channels_last)
    # the protocol-2 input scaling of the efficientnet-lite plugin, (x_uint8 - 127) / 128
    return Student(arch, net, num_classes, size, int(round(size / 0.875)), INPUT_MEAN, INPUT_STD,
                   layers, "_swish._bn1", pretrained, channels_last=True)


def student_forward(student: Student, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the attention maps (eq. 1) at the student's transfer layers."""
    with capture_outputs(student.net, student.transfer_layers) as store:
        logits = student.net(student.prepare(images))
    return logits, [attention_map(store[name]) for name in student.transfer_layers]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images held in memory as uint8 (N, 3, S, S) pixel-space tensors, with labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str
    #: whether a horizontal flip keeps the label (natural images yes, digits no)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError("ImageSet.images must be a uint8 tensor (N, 3, S, S)")
        if len(self.images) != len(self.labels):
            raise ValueError("ImageSet needs one label per image")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]


@dataclass
class TrainConfig:
    """Everything that defines a mutual-transfer run (stored in the checkpoint, checked on resume)."""

    st1: str
    st2: str
    data: str  # "digits", "cifar10", "cifar100" or a folder
    lam: float
    beta: float
    epochs: int
    grid: tuple[int, int] = (2, 2)
    seed: int = 0
    lr: float = 0.05
    batch_size: int = 64
    pretrain_epochs: int = 0
    freeze_bn: bool = False
    detach_target: bool = True
    momentum: float = 0.9
    weight_decay: float = 5e-4
    limit: int | None = None  # seeded subset of the training data (--limit)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["grid"] = list(self.grid)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["grid"] = tuple(values["grid"])
        return cls(**values)


def set_train_mode(student: Student, freeze_bn: bool) -> None:
    """Train mode; with ``freeze_bn`` BatchNorm keeps its running statistics (small batches of a
    pretrained net would otherwise overwrite ImageNet statistics)."""
    student.net.train()
    if freeze_bn:
        for module in student.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def epoch_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """A seeded shuffle of range(n) cut into batches; a trailing batch of 1 is dropped (BatchNorm)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def _augment(images: torch.Tensor, flip: bool, seed: int) -> torch.Tensor:
    if not flip:
        return images
    chosen = torch.rand(len(images), generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(chosen[:, None, None, None], images.flip(-1), images)


def mutual_step(st1: Student, st2: Student, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, config: TrainConfig,
                correlations: list[list[torch.Tensor]] | None = None) -> dict[str, float]:
    """One step: both forwards, L_1 and L_2 (eq. 5), one backward of L_1 + L_2, one update.

    With the other student's map detached, d(L_1 + L_2)/d(theta_1) = dL_1/d(theta_1) and likewise
    for student 2, so one backward pass updates each student on its own loss. The row has the
    kept fraction overall (``kept``) and per layer pair (``kept_l1``, ``kept_l2``, ...); when
    ``correlations`` is a list, this step's per-layer (B, k) Pearson r are appended to it.
    """
    logits1, maps1 = student_forward(st1, images)
    logits2, maps2 = student_forward(st2, images)
    loss1, loss2, terms = mutual_transfer_losses(logits1, logits2, labels, maps1, maps2,
                                                 config.grid, config.lam, config.beta,
                                                 config.detach_target)
    optimizer.zero_grad(set_to_none=True)
    (loss1 + loss2).backward()
    optimizer.step()
    if correlations is not None:
        correlations.append([r.detach() for r in terms.correlations])
    return {"loss_st1": float(loss1.detach()), "loss_st2": float(loss2.detach()),
            "transfer_st1": float(terms.student1.detach().mean()),
            "transfer_st2": float(terms.student2.detach().mean()),
            "kept": float(terms.kept_fraction),
            **{f"kept_l{j + 1}": f for j, f in enumerate(terms.layer_kept_fractions)},
            "acc_st1": float((logits1.argmax(1) == labels).float().mean()),
            "acc_st2": float((logits2.argmax(1) == labels).float().mean())}


#: quantile levels of the Pearson r the gate saw in an epoch (history key ``r_quantiles``)
R_QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def correlation_summary(steps: list[list[torch.Tensor]],
                        levels: Sequence[float] = R_QUANTILE_LEVELS) -> dict[str, Any]:
    """Quantiles of every region's r over an epoch, overall and per layer pair.

    ``steps[s][j]`` is step s's (B, k) r at layer pair j. Returns {"levels": [...], "all": [...],
    "layers": [[...] per layer]}: what one needs to pick lambdas that keep a chosen fraction
    (a lambda at the q-quantile keeps about 1 - q of the regions).
    """
    if not steps:
        return {}
    q = torch.tensor(levels, dtype=torch.float64)
    layers = [torch.cat([s[j].flatten() for s in steps]).double() for j in range(len(steps[0]))]

    def quantiles(values: torch.Tensor) -> list[float]:
        return [round(float(v), 6) for v in torch.quantile(values, q)]

    return {"levels": list(levels), "all": quantiles(torch.cat(layers)),
            "layers": [quantiles(v) for v in layers]}


def pretrain_step(student: Student, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, float]:
    """Plain cross-entropy step: gives a from-scratch ST1 its "prior knowledge"."""
    logits = student.net(student.prepare(images))
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss_st1": float(loss.detach()), "acc_st1": float((logits.argmax(1) == labels).float().mean())}


def correct_predictions(student: Student, data: ImageSet, batch_size: int = 100,
                        on_batch: Any = None) -> torch.Tensor:
    """Per image of ``data``, whether ``student``'s top-1 class is the label: (N,) bool
    (eval mode, no autograd); paired tests between regimes compare these image by image."""
    student.net.eval()
    hits = []
    with torch.inference_mode():
        for index in torch.arange(len(data)).split(batch_size):
            images, labels = data.batch(index)
            hits.append(student.net(student.prepare(images)).argmax(1) == labels)
            if on_batch is not None:
                on_batch(len(index))
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def evaluate(student: Student, data: ImageSet, batch_size: int = 100,
             on_batch: Any = None) -> float:
    """Top-1 accuracy of ``student`` on ``data`` (eval mode, no autograd)."""
    return int(correct_predictions(student, data, batch_size, on_batch).sum()) / max(len(data), 1)


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def pretrain(student: Student, data: ImageSet, config: TrainConfig, on_step: Any = None) -> list[dict[str, float]]:
    """``config.pretrain_epochs`` epochs of cross-entropy on ``data`` for ST1 alone."""
    optimizer = make_optimizer(list(student.net.parameters()), config)
    history = []
    for epoch in range(1, config.pretrain_epochs + 1):
        set_train_mode(student, config.freeze_bn)
        torch.manual_seed(config.seed * 1009 + 500 + epoch)
        rows = []
        for step, index in enumerate(epoch_batches(len(data), config.batch_size, config.seed * 1009 - epoch)):
            images, labels = data.batch(index)
            images = _augment(images, data.flip, config.seed * 100003 - epoch * 1009 - step)
            rows.append(pretrain_step(student, optimizer, images, labels))
            if on_step is not None:
                on_step("pretrain", epoch, rows[-1])
        history.append({"phase": "pretrain", "epoch": epoch, **_mean_metrics(rows)})
    return history


class MutualTrainer:
    """Mutual training of two students with optimizer, cosine schedule and resumable state."""

    def __init__(self, st1: Student, st2: Student, config: TrainConfig, steps_per_epoch: int) -> None:
        self.st1, self.st2, self.config = st1, st2, config
        params = list(st1.net.parameters()) + list(st2.net.parameters())
        self.optimizer = make_optimizer(params, config)
        total = max(config.epochs * steps_per_epoch, 1)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def state(self) -> dict[str, Any]:
        return {"config": self.config.as_dict(), "epoch": self.epoch, "history": self.history,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.epoch = int(payload["epoch"])
        self.history = list(payload["history"])

    def train_epoch(self, data: ImageSet, on_step: Any = None) -> dict[str, Any]:
        """One epoch over ``data`` (seeded order, flips and dropout: resuming repeats it exactly).

        Returns the step means (losses, kept fractions overall and per layer pair) and
        ``r_quantiles``, the distribution of the Pearson r the gate saw (correlation_summary).
        """
        self.epoch += 1
        cfg = self.config
        set_train_mode(self.st1, cfg.freeze_bn)
        set_train_mode(self.st2, cfg.freeze_bn)
        torch.manual_seed(cfg.seed * 1009 + self.epoch)
        rows = []
        correlations: list[list[torch.Tensor]] = []
        for step, index in enumerate(epoch_batches(len(data), cfg.batch_size, cfg.seed * 1009 + self.epoch)):
            images, labels = data.batch(index)
            images = _augment(images, data.flip, cfg.seed * 100003 + self.epoch * 1009 + step)
            rows.append(mutual_step(self.st1, self.st2, self.optimizer, images, labels, cfg, correlations))
            self.scheduler.step()
            if on_step is not None:
                on_step("mutual", self.epoch, rows[-1])
        return {**_mean_metrics(rows), "r_quantiles": correlation_summary(correlations)}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, students: dict[str, Student], class_names: Sequence[str],
                    state: dict[str, Any]) -> None:
    """Write a mutual-transfer checkpoint atomically (temp file + rename).

    ``state`` holds the training state (config, epoch, optimizer, history); the members are
    stored as {spec, state_dict} so the Model plugin can rebuild either one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "class_names": list(class_names),
        "members": {name: {"spec": s.spec(), "state_dict": s.net.state_dict()} for name, s in students.items()},
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint (weights_only: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mutual-transfer checkpoint {path}: no such file; train one with "
                        "'xbench train mutual-transfer ... --out CKPT'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path} is not a readable mutual-transfer checkpoint ({type(exc).__name__}: "
                        f"{exc}); train one with 'xbench train mutual-transfer ... --out CKPT'") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a mutual-transfer checkpoint (no format={CHECKPOINT_FORMAT!r} "
                        "marker); train one with 'xbench train mutual-transfer ... --out CKPT'")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: mutual-transfer checkpoint version {payload.get('version')} is not "
                        f"supported (expected {CHECKPOINT_VERSION}); retrain it")
    return payload


def restore_student(member: dict[str, Any]) -> Student:
    """Rebuild a student from its checkpoint entry (no download, weights from the checkpoint)."""
    spec = member["spec"]
    student = build_student(spec["arch"], int(spec["num_classes"]), pretrained=False)
    student.net.load_state_dict(member["state_dict"])
    student.pretrained = bool(spec.get("pretrained", False))
    return student


def load_students(path: str | Path) -> tuple[dict[str, Student], dict[str, Any]]:
    """({'st1': Student, 'st2': Student}, payload) from a checkpoint."""
    payload = read_checkpoint(path)
    students = {name: restore_student(payload["members"][name]) for name in MEMBERS}
    return students, payload


# ---------------------------------------------------------------------------------------------
# The Model plugin
# ---------------------------------------------------------------------------------------------

class MutualTransferModel(Model):
    """One student (``member`` st1 or st2) of a mutual-transfer checkpoint."""

    name = "mutual-transfer"
    summary = "a student trained with local attention map mutual transfer (Cheng et al. 2022)"

    class Options(Model.Options):
        checkpoint: str | None = xbench.option(
            None, "checkpoint of 'xbench train mutual-transfer' (--checkpoint; weights works too)")
        member: str = xbench.option("st1", "which student of the checkpoint (--member)",
                                    choices=MEMBERS)

    @property
    def checkpoint(self) -> str | None:
        return self.options.checkpoint or self.options.weights

    def load(self) -> LoadedModel:
        if not self.checkpoint:
            raise UserError(
                "model 'mutual-transfer' needs a checkpoint (--checkpoint CKPT). Train one, e.g. "
                "'xbench train mutual-transfer --st1 small-wrn --st2 small-mobilenet --data digits "
                "--lambda 0.5 --beta 1 --epochs 4 --out mt.pt' (a few minutes on a CPU)")
        payload = read_checkpoint(self.checkpoint)
        student = restore_student(payload["members"][self.options.member])
        return LoadedModel(
            module=student.net.eval(), input_size=student.input_size, mean=student.mean,
            std=student.std, class_names=tuple(payload["class_names"]),
            default_layer=student.default_layer, resize_size=student.resize_size,
            weights=f"{self.checkpoint}#{self.options.member}",
            extra={"member": self.options.member, "arch": student.arch,
                   "config": dict(payload.get("config", {}))},
        )


@hookimpl
def register_models(register):
    register(MutualTransferModel)


@hookimpl
def register_commands(register):
    register("train mutual-transfer",
             help="train two students with local attention map mutual transfer",
             configure="xbench.cli.train_mutual_transfer:add_arguments",
             run="xbench.cli.train_mutual_transfer:run")
