"""Sanity checks (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018): does the map
depend on what the model learned? Each compares the explainer's map of the trained model on the
target (``MetricBatch.saliency``) with a map it should NOT resemble, by two similarities of the
two harness-normalised maps (lower is better: the map changed):

- Spearman rank correlation of the H*W pixel values (Pearson correlation of their ranks, ties
  given their average rank, as scipy.stats.spearmanr);
- SSIM (Wang et al. 2004) as skimage.metrics.structural_similarity with its defaults, which is
  what Quantus calls: 7x7 uniform windows over the valid region, K1 = 0.01, K2 = 0.03, sample
  covariances (N / (N - 1)), data range = max - min over both maps.

A constant map (degenerate, all zeros here) has no ranks: its Spearman correlation with any
non-constant map is 0 and 1 with another constant map (they are equal); its SSIM is computed
as for any map, and two constant maps (data range 0) score 1.

- ``model-randomisation``: cascading model parameter randomisation. The parameterised modules
  (every module with ``reset_parameters``, in ``named_modules`` order, as Quantus's
  ``get_random_layer_generator``) are re-initialised from the top (the logits layer) down, each
  by its own ``reset_parameters()`` right after ``torch.manual_seed(seed)`` (the global RNG is
  restored afterwards). ``stages`` are fractions f of those L modules: stage f randomises the
  top max(1, ceil(f * L)) (0 = the logits layer alone, 1 = every layer). A copy of the network
  is randomised, so the trained model is never modified (test: every parameter and buffer is
  bit-identical afterwards); the copy runs eagerly (no inference engine, which would hold the
  trained weights). One row per stage and similarity: variant ``stage=F,similarity=S``.
- ``random-logit``: the map for another class, drawn uniformly from the C - 1 classes other
  than the target by a generator seeded with ``seed`` (one draw per image, in batch order of
  a per-image generator seeded with seed + the target, so an image's class never depends on
  its batch), against the target's map. Variant ``similarity=S``.

Both re-explain through ``MetricBatch.explain``: opt-in (``--metrics sanity`` or by name),
1 + len(stages) or 1 more explanations per image.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

import xbench
from xbench import ClassifierHandle, Metric, MetricBatch, UserError, hookimpl

SIMILARITIES = ("spearman", "ssim")


# -- similarities (batched over images) ---------------------------------------------------

def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(B, n) 1-based ranks along dim 1, ties given the mean of their ranks (scipy's 'average')."""
    b, n = values.shape
    order = torch.sort(values, dim=1, stable=True)
    sorted_values = order.values
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # (B, n) group id within the row
    flat_group = (group + torch.arange(b, device=values.device)[:, None] * n).flatten()
    position = torch.arange(1, n + 1, device=values.device, dtype=torch.float64).expand(b, n)
    first = torch.full((b * n,), float(n + 1), dtype=torch.float64, device=values.device)
    last = torch.zeros(b * n, dtype=torch.float64, device=values.device)
    first = first.scatter_reduce(0, flat_group, position.flatten(), "amin")
    last = last.scatter_reduce(0, flat_group, position.flatten(), "amax")
    mean_rank = ((first + last) / 2)[flat_group].view(b, n)
    return torch.empty_like(mean_rank).scatter_(1, order.indices, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman rank correlation of (B, ...) maps; see the module docstring for constants."""
    ra, rb = average_ranks(a.flatten(1).double()), average_ranks(b.flatten(1).double())
    ca, cb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    na, nb = ca.norm(dim=1), cb.norm(dim=1)
    rho = (ca * cb).sum(dim=1) / (na * nb).clamp(min=1e-300)
    const_a, const_b = na == 0, nb == 0
    rho = torch.where(const_a | const_b, torch.zeros_like(rho), rho)
    return torch.where(const_a & const_b, torch.ones_like(rho), rho)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """(B,) mean SSIM of (B, H, W) maps as skimage.metrics.structural_similarity's defaults."""
    x, y = a.double()[:, None], b.double()[:, None]
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs maps of at least {window}x{window}, got {tuple(a.shape)}")
    data_range = (torch.maximum(x.amax(dim=(1, 2, 3)), y.amax(dim=(1, 2, 3)))
                  - torch.minimum(x.amin(dim=(1, 2, 3)), y.amin(dim=(1, 2, 3))))
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731 - the valid region
    ux, uy = pool(x), pool(y)
    cov_norm = window * window / (window * window - 1)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1 = ((k1 * data_range) ** 2)[:, None, None, None]
    c2 = ((k2 * data_range) ** 2)[:, None, None, None]
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    value = s.mean(dim=(1, 2, 3))
    return torch.where(data_range > 0, value, torch.ones_like(value))


def similarities(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"spearman": spearman(a, b), "ssim": ssim(a, b)}


# -- model randomisation ------------------------------------------------------------------

def parameterised_modules(net: torch.nn.Module) -> list[str]:
    """Names of the modules a cascade re-initialises, bottom-up (``named_modules`` order)."""
    return [name for name, module in net.named_modules() if hasattr(module, "reset_parameters")]


def stage_counts(stages: tuple[float, ...], layers: int) -> list[int]:
    """How many top modules each stage randomises: max(1, ceil(f * L))."""
    return [max(1, math.ceil(f * layers)) for f in stages]


def randomise_top(net: torch.nn.Module, names: list[str], seed: int) -> None:
    """Re-initialise ``names`` (top first) in place, each right after torch.manual_seed(seed);
    the global RNG state is restored."""
    modules = dict(net.named_modules())
    with torch.random.fork_rng(devices=[]):
        for name in names:
            torch.manual_seed(seed)
            modules[name].reset_parameters()


def eager_copy(model: ClassifierHandle) -> ClassifierHandle:
    """A copy of the handle's network in its own eager handle (same preprocessing, layers)."""
    net = copy.deepcopy(model.net)
    loaded = dataclasses.replace(model.loaded, module=net)
    return ClassifierHandle(loaded, model.device, channels_last=model.channels_last,
                            name=model.name)


def _need_explain(batch: MetricBatch, name: str) -> None:
    if batch.explain is None:
        raise UserError(f"metric {name!r} re-explains the images and needs MetricBatch.explain "
                        "(set by xbench run for every explainer)")


class _Sanity(Metric):
    family = "sanity"
    direction = "lower"
    unit = "similarity"
    opt_in = True


class ModelRandomisation(_Sanity):
    name = "model-randomisation"
    summary = "sanity (Adebayo 2018): map similarity after cascading weight randomisation"

    class Options(xbench.Options):
        stages: tuple[float, ...] = xbench.option(
            (0.0, 0.25, 0.5, 1.0), "fractions of the parameterised layers randomised from the "
                                   "top (0 = the logits layer alone)")
        seed: int = xbench.option(0, "torch.manual_seed before each layer's reset_parameters")

    profiles = {"quick": {"stages": (0.0, 1.0)}}

    def format_variant(self, changed):
        changed = {k: v for k, v in changed.items() if k != "stages"}  # in the score keys
        return super().format_variant(changed)

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        _need_explain(batch, self.name)
        stages = self.options.stages
        if not stages or any(not 0 <= f <= 1 for f in stages):
            raise UserError(f"metric {self.name!r}: stages must be fractions in [0, 1], got "
                            f"{stages}")
        copied = eager_copy(batch.model)
        top_down = parameterised_modules(copied.net)[::-1]
        done = 0
        out: dict[str, torch.Tensor] = {}
        for fraction, count in sorted(zip(stages, stage_counts(stages, len(top_down))),
                                      key=lambda pair: pair[1]):
            randomise_top(copied.net, top_down[done:count], self.options.seed)
            done = max(done, count)
            maps = batch.explain(batch.images, batch.targets, model=copied)
            for sim, values in similarities(batch.saliency, maps).items():
                out[f"stage={fraction:g},similarity={sim}"] = values.float()
        return out


class RandomLogit(_Sanity):
    name = "random-logit"
    summary = "sanity (Adebayo 2018; Sixt 2020): map of a random other class vs the target's"

    class Options(xbench.Options):
        seed: int = xbench.option(0, "seed of the other class drawn per image")

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        _need_explain(batch, self.name)
        others = other_classes(batch.targets, batch.model.num_classes, self.options.seed)
        maps = batch.explain(batch.images, others.to(batch.targets.device))
        return {f"similarity={k}": v.float()
                for k, v in similarities(batch.saliency, maps).items()}


def other_classes(targets: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """(B,) a class != target per image, uniform over the other C - 1, from a generator
    seeded with seed * C + target (per image: independent of the batch it sits in)."""
    if classes < 2:
        raise UserError(f"random-logit needs a model with at least 2 classes, got {classes}")
    draws = []
    for target in targets.tolist():  # one scalar draw per image, not a pixel loop
        generator = torch.Generator().manual_seed(seed * classes + int(target))
        draw = int(torch.randint(0, classes - 1, (1,), generator=generator))
        draws.append(draw + (draw >= target))
    return torch.tensor(draws, dtype=torch.long)


@hookimpl
def register_metrics(register):
    register(ModelRandomisation)
    register(RandomLogit)
