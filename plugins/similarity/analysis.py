"""The analysis: s_ijk for every class average image, layer and neuron, and per-layer curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from xbench import ClassifierHandle, UserError
from xbench_plugins.similarity.neurons import (channel_guided_backprop, class_guided_backprop,
                                               cosine_similarity)


METHODS = (1, 2)


@dataclass
class NeuronVisuals:
    """The visualisations of the ``show`` highest- and lowest-similarity neurons of one
    (class, layer, method): neuron indices, similarities and GBP maps (n, 3, H, W)."""

    top: list[int]
    top_values: list[float]
    top_maps: torch.Tensor
    bottom: list[int]
    bottom_values: list[float]
    bottom_maps: torch.Tensor


def neuron_similarities(model: ClassifierHandle, averages: dict[int, torch.Tensor],
                        layers: Sequence[str], methods: Sequence[int] = METHODS,
                        channel_batch: int = 64, show: int = 4, progress=None,
                        ) -> tuple[pd.DataFrame, dict[tuple[int, str, int], NeuronVisuals]]:
    """s_ijk for every class average image I_i (``averages``: {class: (3, H, W)}), layer j and
    neuron k of that layer, by each method (1: against I_i, 2: against phi_i).

    Returns the tidy table (class, layer, neuron, method, similarity, activated, activation)
    where ``activated`` = the neuron's activation map on I_i has a positive value and
    ``activation`` is its spatial sum, and the top/bottom ``show`` visualisations per
    (class, layer, method). ``progress(done, total)`` is called after each (class, layer).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--method: expected 1, 2 or both, got {list(methods)}")
    rows: list[pd.DataFrame] = []
    visuals: dict[tuple[int, str, int], NeuronVisuals] = {}
    total, done = len(averages) * len(layers), 0
    for cls, image in averages.items():
        references = {1: image.to(model.device)}
        if 2 in methods:
            references[2] = class_guided_backprop(model, image, cls)
        for layer in layers:
            gbp, activation = channel_guided_backprop(model, image, layer, channel_batch=channel_batch)
            act = activation.reshape(activation.shape[0], -1)
            for method in methods:
                values = cosine_similarity(gbp, references[method])
                rows.append(pd.DataFrame({
                    "class": cls, "layer": layer, "neuron": np.arange(len(values)),
                    "method": method, "similarity": values.cpu().numpy(),
                    "activated": (act.amax(dim=1) > 0).cpu().numpy(),
                    "activation": act.sum(dim=1).double().cpu().numpy()}))
                visuals[(cls, layer, method)] = _extremes(values, gbp, show)
            done += 1
            if progress is not None:
                progress(done, total)
    table = pd.concat(rows, ignore_index=True)
    table["layer"] = pd.Categorical(table["layer"], categories=list(layers), ordered=True)
    return table, visuals


def _extremes(values: torch.Tensor, gbp: torch.Tensor, show: int) -> NeuronVisuals:
    finite = torch.nonzero(torch.isfinite(values)).flatten()
    order = finite[torch.sort(values[finite], descending=True, stable=True).indices]
    top, bottom = order[:show], order.flip(0)[:show]
    return NeuronVisuals(top.tolist(), values[top].tolist(), gbp[top].cpu(),
                         bottom.tolist(), values[bottom].tolist(), gbp[bottom].cpu())


def layer_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per (method, layer, class): mean and std (ddof=1) of the similarities of the layer's
    neurons, NaN (never-visualised) neurons left out and counted in ``n_nan``; plus class "all":
    the average over classes of the per-class mean and of the per-class std."""
    grouped = table.groupby(["method", "layer", "class"], observed=True)["similarity"]
    per_class = grouped.agg(mean="mean", std="std", n="count", neurons="size").reset_index()
    per_class["n_nan"] = per_class["neurons"] - per_class["n"]
    averaged = (per_class.groupby(["method", "layer"], observed=True)
                .agg(mean=("mean", "mean"), std=("std", "mean"), n=("n", "sum"),
                     neurons=("neurons", "sum"), n_nan=("n_nan", "sum")).reset_index())
    averaged["class"] = "all"
    per_class["class"] = per_class["class"].astype(str)
    curves = pd.concat([per_class, averaged], ignore_index=True)
    return curves.sort_values(["method", "class", "layer"], kind="stable").reset_index(drop=True)
