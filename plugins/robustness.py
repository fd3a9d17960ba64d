"""Robustness: does the map stay put when the input barely moves? All three re-explain the batch
(``MetricBatch.explain``) on N perturbed copies x + d_s, s = 1..N, with d_s drawn uniformly
from the L-inf ball of radius r in pixel space ([0, 1] units, no clipping: the ball of the
definition), and compare the harness-normalised maps Phi(x + d_s) with Phi(x) (the run's map).

- Max-sensitivity (Yeh et al., "On the (in)fidelity and sensitivity of explanations", NeurIPS
  2019, Eq. 4 estimated by sampling): max_s ||Phi(x + d_s) - Phi(x)||_F.
- Average-sensitivity (same paper): mean_s ||Phi(x + d_s) - Phi(x)||_F.
  ``norm=relative`` divides each by ||Phi(x)||_F, as Quantus's MaxSensitivity/AvgSensitivity
  do by default (NaN, a failed row, for a degenerate map); ``absolute`` (default) is the
  paper's, so a constant explainer scores exactly 0.
- Local Lipschitz estimate (Alvarez-Melis & Jaakkola, "On the robustness of interpretability
  methods", 2018): max_s ||Phi(x + d_s) - Phi(x)||_2 / ||d_s||_2, on the same samples.

Lower is better for all three. The N noise tensors (3, H, W) come from one generator seeded
with ``seed`` and are shared by every image of every batch, so an image's score never depends
on the batch it sits in. The three metrics share the N explanations when their options agree
(one cache entry per radius, samples and seed). Opt-in: ``--metrics robustness`` or by name.
"""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch, UserError, hookimpl

NORMS = ("absolute", "relative")


def ball_noise(samples: int, shape: tuple[int, ...], radius: float, seed: int,
               device: torch.device) -> torch.Tensor:
    """(N, *shape) uniform noise in [-radius, radius], seeded."""
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand((samples, *shape), generator=generator, dtype=torch.float64) * 2 - 1)
    return (noise * radius).float().to(device)


def perturbation_distances(batch: MetricBatch, noise: torch.Tensor) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """(N, B) ||Phi(x + d_s) - Phi(x)||_F and (N,) ||d_s||_2 for the given noise (N, 3, H, W)."""
    if batch.explain is None:
        raise UserError("robustness metrics re-explain the images and need MetricBatch.explain "
                        "(set by xbench run for every explainer)")
    clean = batch.saliency.double()
    distances = []
    for d in noise:  # one batched re-explanation per sample
        maps = batch.explain(batch.images + d, batch.targets).double()
        distances.append((maps - clean).flatten(1).norm(dim=1))
    return torch.stack(distances), noise.double().flatten(1).norm(dim=1)


class _Robustness(Metric):
    family = "robustness"
    direction = "lower"
    opt_in = True

    class Options(xbench.Options):
        radius: float = xbench.option(0.02, "L-inf radius of the uniform noise, pixel units",
                                      above=0.0)
        samples: int = xbench.option(10, "noise samples (re-explanations) per image", minimum=1)
        seed: int = xbench.option(0, "seed of the noise samples")

    profiles = {"quick": {"samples": 3}}

    def distances(self, batch: MetricBatch) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        key = ("robustness/distances", o.radius, o.samples, o.seed)
        if key not in batch.cache:
            noise = ball_noise(o.samples, tuple(batch.images.shape[1:]), o.radius, o.seed,
                               batch.images.device)
            batch.cache[key] = perturbation_distances(batch, noise)
        return batch.cache[key]


class _Sensitivity(_Robustness):
    unit = "||.||_F"

    class Options(_Robustness.Options):
        norm: str = xbench.option("absolute", "absolute (Yeh 2019) or relative to ||Phi(x)||_F "
                                              "(Quantus's default)", choices=NORMS)

    def reduce(self, distances: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        distances, _ = self.distances(batch)
        value = self.reduce(distances)
        if self.options.norm == "relative":
            size = batch.saliency.double().flatten(1).norm(dim=1)
            value = torch.where(size > 0, value / size.clamp(min=1e-300),
                                torch.full_like(value, float("nan")))
        return {"": value}


class MaxSensitivity(_Sensitivity):
    name = "max-sensitivity"
    summary = "robustness (Yeh 2019): largest map change under noise in an L-inf ball"

    def reduce(self, distances):
        return distances.max(dim=0).values


class AvgSensitivity(_Sensitivity):
    name = "avg-sensitivity"
    summary = "robustness (Yeh 2019): mean map change under noise in an L-inf ball"

    def reduce(self, distances):
        return distances.mean(dim=0)


class LocalLipschitz(_Robustness):
    name = "local-lipschitz"
    unit = "ratio"
    summary = "robustness (Alvarez-Melis 2018): max ||map change|| / ||input change||"

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        distances, steps = self.distances(batch)
        return {"": (distances / steps[:, None]).max(dim=0).values}


@hookimpl
def register_metrics(register):
    register(MaxSensitivity)
    register(AvgSensitivity)
    register(LocalLipschitz)
