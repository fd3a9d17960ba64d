"""The L-CAM-Fm and L-CAM-Img explainers: one forward pass through the ClassifierHandle."""

from __future__ import annotations

from pathlib import Path

import torch

import xbench
from xbench import ClassifierHandle, Explainer, UserError
from xbench_plugins.lcam.checkpoint import (ASSETS, HeadInfo, _cached_checkpoint, check_compatible,
                                            default_checkpoint, file_digest)
from xbench_plugins.lcam.head import AttentionHead, layer_features


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
                f"{self.lcam_variant} --data FOLDER --epochs E --output head.pt, then pass option "
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
