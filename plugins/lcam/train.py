"""Training an L-CAM head on a frozen classifier (``xbench train lcam`` is the front end).

L-CAM-Fm trains on *cached* features: the frozen backbone runs once per training view before
the first epoch and the head and the classifier tail then train on the stored feature maps
(exact, since the backbone is frozen and in eval mode; it just skips recomputing identical
features every epoch). L-CAM-Img needs the whole network forward and backward on every
masked image, so it draws a fresh random view per image per epoch instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xbench import ClassifierHandle, Progress, UserError, load_labelled_images
from xbench_plugins.lcam.checkpoint import load_checkpoint
from xbench_plugins.lcam.head import AttentionHead, layer_features, masked_logits_fm, masked_logits_img
from xbench_plugins.lcam.loss import LossWeights, lcam_loss


VARIANTS = ("fm", "img")


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


def load_squares(model: ClassifierHandle, items, source: str, progress: Progress) -> torch.Tensor:
    """uint8 (N, 3, S, S): resized short side, center S x S square, S = resize size (256)."""
    size = model.loaded.resize_size
    return load_labelled_images(items, size, size, source=source, progress=progress).images


def crop_batch(model: ClassifierHandle, squares: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    return augmented_view(squares.float().div_(255), model.input_size, generator)


def cache_features(model, layer, squares, labels, config, progress: Progress):
    """fm: features of ``config.views`` views per image, computed once (frozen backbone)."""
    view_generator = torch.Generator().manual_seed(config.seed + 1)
    chunks, chunk_labels = [], []
    bar = progress.bar("caching features", total=config.views * len(squares))
    for view in range(config.views):
        for index in torch.arange(len(squares)).split(64):
            images = crop_batch(model, squares[index], None if view == 0 else view_generator)
            chunks.append(layer_features(model, layer, images))
            chunk_labels.append(labels[index])
            bar.advance(len(index))
    return torch.cat(chunks), torch.cat(chunk_labels)


def run_epoch(head, optimizer, config, model, tail, layer, squares, labels, features, generator,
              progress: Progress):
    count = len(features) if features is not None else len(squares)
    # img epochs are long: their batches are logged too; fm batches take milliseconds
    bar = progress.bar("  batches", total=-(-count // config.batch_size), log=features is None)
    stats = []
    for index in batches(count, config.batch_size, generator):
        if features is not None:
            stats.append(train_step(head, optimizer, config, labels[index], features[index], tail=tail))
        else:
            images = crop_batch(model, squares[index], generator)
            feats = layer_features(model, layer, images)
            with torch.enable_grad():
                stats.append(train_step(head, optimizer, config, labels[index], feats,
                                        model=model, images=images))
        bar.advance(status=f"loss {stats[-1].loss:.3f}")
    bar.remove()
    return stats


def restore(out, head, optimizer, generator, model_name, layer, config, console) -> int:
    if not out.is_file():
        raise UserError(f"--resume: {out} does not exist yet; drop --resume to start training")
    loaded, info, training = load_checkpoint(out)
    if (info.model, info.layer, info.variant) != (model_name, layer, config.variant):
        raise UserError(f"--resume: {out} holds a {info.variant} head for {info.model} layer "
                        f"{info.layer!r}, not {config.variant} for {model_name} layer {layer!r}")
    if training is None:
        raise UserError(f"--resume: {out} has no training state (a shipped head?); start afresh")
    head.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(training["optimizer"])
    generator.set_state(training["generator"])
    console.print(f"resuming from {out} after epoch {training['epoch']}")
    return int(training["epoch"])


def warm_start(path: Path, head, model_name: str, layer: str, console) -> None:
    loaded, info, _ = load_checkpoint(path)
    if (info.model, info.layer) != (model_name, layer) or loaded.conv.weight.shape != head.conv.weight.shape:
        raise UserError(f"--init: {path} holds a head for {info.model} layer {info.layer!r}, "
                        f"not for {model_name} layer {layer!r}")
    head.load_state_dict(loaded.state_dict())
    console.print(f"initialised the head from {path} ({info.variant}, {info.epochs_done} epochs)")
