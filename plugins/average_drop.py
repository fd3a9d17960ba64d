"""Average Drop and Average Increase (Chattopadhyay et al., Grad-CAM++, WACV 2018, sec. 5.1).

Y = p_c(x), O = p_c(x * S') with S' the saliency map kept at retention r (docs/protocol.md):
AD = 100/N sum max(0, Y - O)/Y (lower is better), AI = 100/N sum [O > Y] (higher is better).
Both metrics read the same masked forward passes, memoised in ``MetricBatch.cache``.
"""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch, hookimpl, retention_masks

DEFAULT_RETENTIONS = (1.0, 0.5, 0.15)
MASKINGS = ("continuous", "binary")


def _variant(retention: float, masking: str) -> str:
    label = f"r={retention * 100:g}%"
    return label if masking == "continuous" else f"{label},{masking}"


def masked_probabilities(batch: MetricBatch, retentions: tuple[float, ...], masking: str,
                         chunk: int = 64) -> dict[float, torch.Tensor]:
    """{r: O (B,)}: p_c of the images masked by their maps kept at each retention, memoised."""
    key = ("average-drop/masked", retentions, masking)
    if key not in batch.cache:
        masks = torch.cat(retention_masks(batch.saliency, retentions, binary=masking == "binary"))
        # An all-ones mask (binary r = 100%) leaves the image unchanged: O is Y exactly. A new
        # forward would only add float noise that flips O > Y at random, so none is made.
        unchanged = (masks == 1).flatten(1).all(dim=1)
        clean = batch.clean_probs.repeat(len(retentions))
        target_probs = clean.clone()
        if not bool(unchanged.all()):
            changed = (~unchanged).nonzero()[:, 0]
            images = batch.images.repeat(len(retentions), 1, 1, 1)[changed]
            probs = batch.model.probabilities(images * masks[changed][:, None], batch_size=chunk)
            targets = batch.targets.repeat(len(retentions))[changed]
            target_probs[changed] = probs.gather(1, targets[:, None])[:, 0].to(clean.dtype)
        batch.cache[key] = dict(zip(retentions, target_probs.view(len(retentions), -1)))
    return batch.cache[key]


class _RetentionMetric(Metric):
    unit = "%"

    class Options(xbench.Options):
        retentions: tuple[float, ...] = xbench.option(
            DEFAULT_RETENTIONS, "fractions of the map kept, one column each", above=0.0,
            maximum=1.0)
        masking: str = xbench.option(
            "continuous", "multiply by the map (continuous) or keep its top pixels (binary)",
            choices=MASKINGS)

    def format_variant(self, changed):
        # the score keys already name the retention and a non-default masking (see _variant)
        return ""

    @classmethod
    def expected_passes(cls, options, facts):
        """One forward per retention level, shared by Average Drop and Increase; none for a
        binary r = 100% (the image is unchanged, see :func:`masked_probabilities`)."""
        levels = [r for r in options.retentions if not (options.masking == "binary" and r == 1)]
        return xbench.Passes(len(levels), shared=f"average-drop/masked:{options.retentions}:"
                                                 f"{options.masking}")

    def score(self, batch):
        masked = masked_probabilities(batch, self.options.retentions, self.options.masking)
        return {_variant(r, self.options.masking): self.per_image(batch.clean_probs, masked[r])
                for r in self.options.retentions}

    @staticmethod
    def per_image(clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AverageDrop(_RetentionMetric):
    name = "average-drop"
    direction = "lower"
    summary = "Average Drop %: relative loss of target confidence on the map-masked image"

    @staticmethod
    def per_image(clean, masked):
        return 100.0 * torch.clamp(clean - masked, min=0) / clean


class AverageIncrease(_RetentionMetric):
    name = "average-increase"
    direction = "higher"
    summary = "Average Increase %: share of images whose confidence rises on the masked image"

    @staticmethod
    def per_image(clean, masked):
        return 100.0 * (masked > clean).to(clean.dtype)


@hookimpl
def register_metrics(register):
    register(AverageDrop)
    register(AverageIncrease)
