"""Complexity: how concentrated is the map? Read on the harness's map (upsampled to the input
size and min-max normalised to [0, 1], so its smallest pixel is 0), over all H*W pixels.

- Sparseness (Chalasani et al., "Concise explanations of neural networks using adversarial
  training", ICML 2020; the Gini index of Hurley & Rickard 2009): with the n values sorted
  ascending, a_(1) <= ... <= a_(n),
  G = sum_k (2k - n - 1) a_(k) / (n sum_k a_(k)); 0 for a uniform map, (n - 1)/n for a single
  pixel. Higher is better (sparser).
- Complexity (Bhatt et al., "Evaluating and aggregating feature-based model explanations",
  IJCAI 2020): the entropy of the map as a distribution, p = a / sum a,
  H = -sum p ln p (0 ln 0 = 0), in nats; 0 for a single pixel, ln n for a uniform map. Lower
  is better.

A degenerate map (constant or non-finite, all zeros here) has no distribution: it scores as a
uniform map does (sparseness 0, complexity ln n), the least concentrated explanation. Batched
over images: one sort (sparseness) or one reduction (complexity) per batch.
"""

from __future__ import annotations

import torch

from xbench import Metric, hookimpl
from xbench import Passes


def gini(maps: torch.Tensor) -> torch.Tensor:
    """(B,) Gini index of (B, ...) non-negative maps; 0 where a map sums to 0."""
    flat = maps.flatten(1).double()
    n = flat.shape[1]
    ascending = torch.sort(flat, dim=1).values
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64, device=flat.device) - n - 1
    total = flat.sum(dim=1)
    value = (ascending * weights).sum(dim=1) / (n * total.clamp(min=1e-300))
    return torch.where(total > 0, value, torch.zeros_like(value))


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of (B, ...) non-negative maps as distributions; ln n where a map
    sums to 0."""
    flat = maps.flatten(1).double()
    total = flat.sum(dim=1, keepdim=True)
    p = flat / total.clamp(min=1e-300)
    value = -torch.special.xlogy(p, p).sum(dim=1)
    uniform = torch.full_like(value, float(torch.log(torch.tensor(float(flat.shape[1])))))
    return torch.where(total[:, 0] > 0, value, uniform)


class Sparseness(Metric):
    name = "sparseness"
    direction = "higher"
    family = "complexity"
    passes = Passes(0)  # reads the map only
    unit = "Gini"
    summary = "sparseness (Chalasani 2020): Gini index of the map"

    def score(self, batch):
        return {"": gini(batch.saliency)}


class Complexity(Metric):
    name = "entropy-complexity"
    direction = "lower"
    family = "complexity"
    passes = Passes(0)  # reads the map only
    unit = "nats"
    summary = "complexity (Bhatt 2020): entropy of the map as a distribution"

    def score(self, batch):
        return {"": entropy(batch.saliency)}


@hookimpl
def register_metrics(register):
    register(Sparseness)
    register(Complexity)
