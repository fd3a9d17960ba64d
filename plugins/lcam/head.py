"""The L-CAM attention head, the rest of the frozen classifier after its feature layer
("tail"), and the masked logits the two variants train on."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xbench import ClassifierHandle, UserError, capture_activations


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
        "this architecture to xbench_plugins.lcam.head.classifier_tail."
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
    with torch.no_grad(), capture_activations(model.layer(layer), keep_grad=False,
                                              name=layer) as store:
        model(images)
    return store["activation"].detach()
