"""Faithfulness correlation (Bhatt et al., "Evaluating and aggregating feature-based model
explanations", IJCAI 2020, Eq. 2): over R random subsets S of ``subset_size`` pixels, the
Pearson correlation between the map's sum over S and the drop of the target's softmax
probability when S is set to the baseline (black, 0 in pixel space, all three channels):

    corr_S( sum_{i in S} Phi(x)_i ,  p_c(x) - p_c(x_[S = baseline]) ).

Higher is better. The R subsets are drawn by a generator seeded with ``seed`` and shared by
every image (an image's score never depends on its batch); a map with no variance over the
subsets (a degenerate map is all zeros) or a model whose output never moves has no
correlation and scores 0 (Quantus returns NaN there). The map is the harness's (min-max
normalised), read per pixel, where Quantus (``FaithfulnessCorrelation``) draws channel
entries of a map broadcast to the input's shape: with the same pixel subsets both agree
(tested). Opt-in (``--metrics faithfulness-correlation``): R forwards per image and map.
"""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch, hookimpl


def random_subsets(runs: int, pixels: int, size: int, seed: int) -> torch.Tensor:
    """(R, size) pixel indices, each row ``size`` distinct pixels, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((runs, pixels), generator=generator).argsort(dim=1)[:, :size]


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation along dim 1 of (B, R) tensors; 0 where either is constant."""
    a, b = a.double(), b.double()
    ca, cb = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    den = ca.norm(dim=1) * cb.norm(dim=1)
    value = (ca * cb).sum(dim=1) / den.clamp(min=1e-300)
    return torch.where(den > 0, value, torch.zeros_like(value))


def correlation_terms(batch: MetricBatch, subsets: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """(B, R) map sums over each subset and (B, R) probability drops."""
    images, targets = batch.images, batch.targets
    b, _, h, w = images.shape
    device = images.device
    subsets = subsets.to(device)
    sums = batch.saliency.flatten(1).double()[:, subsets].sum(dim=2)  # (B, R)
    drops = []
    for subset in subsets:  # one batched forward per subset
        keep = torch.ones(h * w, device=device)
        keep[subset] = 0
        perturbed = images * keep.view(1, 1, h, w)
        probs = batch.model.predict(perturbed).float().softmax(dim=1)
        drops.append(batch.clean_probs.double() - probs.gather(1, targets[:, None])[:, 0].double())
    return sums, torch.stack(drops, dim=1)


class FaithfulnessCorrelation(Metric):
    name = "faithfulness-correlation"
    direction = "higher"
    family = "faithfulness"
    unit = "r"
    opt_in = True
    summary = "faithfulness correlation (Bhatt 2020): map mass vs output drop on random subsets"

    class Options(xbench.Options):
        subset_size: int = xbench.option(224, "pixels set to black per subset", minimum=1)
        runs: int = xbench.option(100, "random subsets (forwards) per image", minimum=2)
        seed: int = xbench.option(0, "seed of the subsets")

    profiles = {"quick": {"runs": 20}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.runs)

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        o = self.options
        pixels = batch.saliency[0].numel()
        if o.subset_size > pixels:
            raise xbench.UserError(f"metric {self.name!r}: subset_size {o.subset_size} exceeds "
                                   f"the {pixels} pixels of the map")
        sums, drops = correlation_terms(batch, random_subsets(o.runs, pixels, o.subset_size,
                                                              o.seed))
        return {"": pearson(sums, drops).float()}


@hookimpl
def register_metrics(register):
    register(FaithfulnessCorrelation)
