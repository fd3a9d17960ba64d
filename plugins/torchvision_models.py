"""Any torchvision ImageNet classifier by name (resnet50, vgg16, densenet121, ...).

Weights: ``--weights PATH`` (a local state dict, loaded with weights_only=True) or, when the
user is online, torchvision's default ImageNet weights (downloaded once into torch's hub
cache). Offline without a cached file, loading fails with a message saying how to supply them.
"""

from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn

from xbench import LoadedModel, Model, UserError, hookimpl
from xbench import imagenet_class_names as class_names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The usual CAM layers (the peers' documented choices); others are found by a probe forward.
_KNOWN_LAYERS = {"resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4",
                 "regnet": "trunk_output", "densenet": "features", "mobilenet": "features",
                 "efficientnet": "features", "convnext": "features", "mnasnet": "layers",
                 "shufflenet": "conv5", "squeezenet": "features", "googlenet": "inception5b",
                 "inception": "Mixed_7c"}


def last_spatial_layer(net: nn.Module, input_size: int) -> str:
    """Name of the last module to finish (so the outermost block) whose output is a 4-D map
    larger than 1x1."""
    order: list[tuple[str, torch.Size]] = []
    handles = [m.register_forward_hook(
        lambda mod, inp, out, name=name: order.append((name, out.shape))
        if isinstance(out, torch.Tensor) else None)
        for name, m in net.named_modules() if name]
    try:
        with torch.inference_mode():
            net.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    spatial = [name for name, shape in order if len(shape) == 4 and shape[-1] * shape[-2] > 1]
    if not spatial:
        raise UserError("could not find a convolutional layer for CAM methods; pass --layer NAME")
    return spatial[-1]


def default_layer(arch: str, net: nn.Module, input_size: int) -> str:
    if arch.startswith("vgg") or arch == "alexnet":
        # the last ReLU of `features` (the input of the final max-pool)
        relus = [n for n, m in net.named_modules() if n.startswith("features.") and isinstance(m, nn.ReLU)]
        return relus[-1]
    for prefix, layer in _KNOWN_LAYERS.items():
        if arch.startswith(prefix):
            return layer
    return last_spatial_layer(net, input_size)


class TorchvisionModel(Model):
    arch: str
    summary = "torchvision ImageNet classifier"

    def load(self) -> LoadedModel:
        weights_enum = torchvision.models.get_model_weights(self.arch).DEFAULT
        preset = weights_enum.transforms()
        input_size = int(preset.crop_size[0])
        resize_size = int(preset.resize_size[0])
        net = torchvision.models.get_model(self.arch, weights=None)
        if self.weights:
            source = self.weights
            try:
                state = torch.load(self.weights, map_location="cpu", weights_only=True)
            except FileNotFoundError as exc:
                raise UserError(f"model {self.name!r}: weights file {self.weights} not found") from exc
            except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
                raise UserError(f"model {self.name!r}: cannot load weights file {self.weights} as "
                                f"a state dict ({type(exc).__name__}: {exc})") from exc
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
        else:
            source = weights_enum.url
            try:
                state = weights_enum.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # noqa: BLE001 - urllib raises several kinds offline
                raise UserError(
                    f"model {self.name!r}: could not get torchvision's weights ({weights_enum}) "
                    f"from {weights_enum.url}: {type(exc).__name__}: {exc}. If this machine is "
                    f"offline, download that file elsewhere and pass --weights PATH, or copy it "
                    f"into {torch.hub.get_dir()}/checkpoints/."
                ) from exc
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"model {self.name!r}: weights from {source} do not fit the "
                            f"{self.arch} architecture: {str(exc).splitlines()[0]}") from exc
        net.eval()
        return LoadedModel(module=net, input_size=input_size, resize_size=resize_size,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=class_names(),
                           default_layer=default_layer(self.arch, net, input_size),
                           weights=str(source))


@functools.cache
def _classifier_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@hookimpl
def register_models(register):
    for arch in _classifier_names():
        register(type(f"Torchvision_{arch}", (TorchvisionModel,),
                      {"name": arch, "arch": arch, "summary": f"torchvision {arch}"}))
