"""The per-image, model-scope Metric ``similarity-value``."""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch
from xbench_plugins.similarity.analysis import METHODS
from xbench_plugins.similarity.neurons import (channel_guided_backprop, class_guided_backprop,
                                               cosine_similarity, truncated_forward)


def spread_channels(count: int, wanted: int | None) -> torch.Tensor:
    """``wanted`` channel indices evenly spread over 0..count-1 (all of them when None or more)."""
    if wanted is None or wanted >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, wanted).round().long().unique()


class SimilarityValue(Metric):
    """Mean neuron similarity value of one layer on each image (higher: the layer's neurons
    respond to more of what the image or the class evidence shows).

    Per image x with target c, layer j (default: the model's CAM layer) and each chosen neuron
    k: s_jk = cos(GBP(x, j, k), R) with R = x (method 1) or R = GBP(x, output, c) (method 2);
    the score is the mean of s_jk over the neurons whose visualisation is not all zero (a
    never-activated neuron has no similarity, as in the thesis). ``neurons`` (default 64,
    None = all) evenly spaced channels bound the cost: ceil(neurons / channel_batch) truncated
    forwards and backwards of ``channel_batch`` copies, plus one forward and backward for
    method 2, per image.
    """

    name = "similarity-value"
    direction = "higher"
    kind = "model"
    summary = ("neuron similarity value (Wang 2022) per image: mean cosine of the layer's "
               "per-neuron guided backprop with the image / the class evidence (model-scope)")

    class Options(xbench.Options):
        layer: str | None = xbench.option(None, "layer whose neurons are scored (default: the "
                                                "model's CAM layer)")
        methods: tuple[int, ...] = xbench.option(
            METHODS, "1: cos(GBP, image); 2: cos(GBP, GBP of the class logit)", choices=METHODS)
        neurons: int | None = xbench.option(64, "evenly spaced channels scored (none: all)",
                                            minimum=1)
        channel_batch: int = xbench.option(64, "channel copies per truncated forward", minimum=1,
                                           in_variant=False)

    def format_variant(self, changed):
        # the score keys already name the method, layer and neuron count
        return ""

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        model = batch.model
        layer = self.options.layer or model.default_layer
        module = model.layer(layer)
        with torch.no_grad():
            count = truncated_forward(model, batch.images[:1], module).shape[1]
        channels = spread_channels(count, self.options.neurons)
        values = {method: torch.full((len(batch.images),), float("nan"), dtype=torch.float64)
                  for method in self.options.methods}
        for i, (image, target) in enumerate(zip(batch.images, batch.targets.tolist())):
            gbp, _ = channel_guided_backprop(model, image, layer, channels, self.options.channel_batch)
            references = {1: image}
            if 2 in self.options.methods:
                references[2] = class_guided_backprop(model, image, target)
            for method in self.options.methods:
                similarity = cosine_similarity(gbp, references[method])
                if bool(torch.isfinite(similarity).any()):
                    values[method][i] = similarity.nanmean()
        neurons = "all" if self.options.neurons is None else len(channels)
        return {f"method={method},layer={layer},neurons={neurons}": values[method]
                for method in self.options.methods}
