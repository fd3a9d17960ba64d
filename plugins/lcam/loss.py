"""The L-CAM loss: weighted cross-entropy, average-mask and total-variation terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the L-CAM loss; defaults are those of the authors' release (see module doc).

    ``ce`` lambda_1, ``area`` lambda_2, ``tv`` lambda_3, ``area_power`` lambda_4;
    ``area_eps`` keeps the gradient of x**0.3 finite at 0; ``tv_power`` and ``tv_border`` shape
    the total-variation term (:func:`total_variation`).
    """

    ce: float = 1.5
    area: float = 2.0
    tv: float = 0.01
    area_power: float = 0.3
    area_eps: float = 0.0005
    tv_power: float = 2.0
    tv_border: float = 0.3


def area_term(masks: torch.Tensor, power: float = 0.3, eps: float = 0.0005) -> torch.Tensor:
    """Average-mask term: mean over all elements of (A + eps) ** power (A in [0, 1])."""
    if power != 1:
        masks = (masks + eps) ** power
    return masks.mean()


def total_variation(masks: torch.Tensor, power: float = 2.0, border: float = 0.3) -> torch.Tensor:
    """TV(A) for masks (B, h, w): (sum |vertical diffs|^p + sum |horizontal diffs|^p
    + border * sum over the four edge lines of A^p) / (p * B).

    The border term pushes the mask towards 0 at the image edges; dividing by the batch size
    makes the term a per-image average.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, h, w), got {tuple(masks.shape)}")
    vertical = (masks[:, 1:, :] - masks[:, :-1, :]).abs().pow(power).sum()
    horizontal = (masks[:, :, 1:] - masks[:, :, :-1]).abs().pow(power).sum()
    edges = (masks[:, 0, :].pow(power).sum() + masks[:, -1, :].pow(power).sum()
             + masks[:, :, 0].pow(power).sum() + masks[:, :, -1].pow(power).sum())
    return (vertical + horizontal + border * edges) / (power * masks.shape[0])


def lcam_loss(logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
              weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """L = l1 CE(logits, labels) + l2 mean(A^l4) + l3 TV(A); returns every weighted term.

    ``masks`` are the sigmoid maps A_c (B, h, w) of the labelled classes at feature resolution.
    """
    terms = {
        "ce": weights.ce * F.cross_entropy(logits, labels),
        "area": weights.area * area_term(masks, weights.area_power, weights.area_eps),
        "tv": weights.tv * total_variation(masks, weights.tv_power, weights.tv_border),
    }
    terms["loss"] = terms["ce"] + terms["area"] + terms["tv"]
    return terms
