"""Students: small 32x32 networks (the digits demo) and EfficientNet-Lite (ImageNet scale),
with the outputs of their transfer layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xbench import UserError
from xbench_plugins.mutual_transfer.losses import attention_map


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
        from xbench import build_registry

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
