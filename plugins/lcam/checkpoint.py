"""L-CAM checkpoints: plain dicts of tensors, strings and numbers (``torch.load(weights_only=True)``),
recording the model, layer, variant, class and channel counts and the training command."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xbench import ClassifierHandle, UserError
from xbench_plugins.lcam.head import AttentionHead


CHECKPOINT_FORMAT = "xbench-lcam/1"


ASSETS = Path(__file__).resolve().parent.parent / "assets"


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
                  f"--variant {variant or info.variant} --data FOLDER --epochs E --output FILE.pt")
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
