"""Training: optimiser, seeded batches and flips, the mutual step, ST1's pre-training, evaluation
and the resumable :class:`MutualTrainer`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xbench_plugins.mutual_transfer.data import ImageSet
from xbench_plugins.mutual_transfer.losses import mutual_transfer_losses
from xbench_plugins.mutual_transfer.students import Student, student_forward


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
