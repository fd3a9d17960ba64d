"""The pruning check (thesis Table 5-1): zero the highest- vs lowest-similarity neurons of a layer,
no fine-tuning, and compare test accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from xbench import ClassifierHandle, UserError
from xbench_plugins.similarity.digits import ImageSplit
from xbench_plugins.similarity.neurons import LayerInfo


@contextlib.contextmanager
def zero_channels(model: ClassifierHandle, plan: dict[str, Sequence[int]]) -> Iterator[None]:
    """Zero the given channels of the given layers' outputs during the block (forward hooks that
    return a copy with those channels set to 0; removed on exit, the weights are untouched)."""
    handles = []
    try:
        for name, channels in plan.items():
            index = torch.as_tensor(list(channels), dtype=torch.long, device=model.device)

            def hook(_module, _inputs, output, index=index):
                return output.index_fill(1, index, 0.0)

            handles.append(model.layer(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def accuracy(model: ClassifierHandle, data: ImageSplit, batch_size: int = 128) -> float:
    """Top-1 accuracy in % of ``model`` on ``data`` (images stored as float or uint8)."""
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data.labels), batch_size):
            images = data.images[start:start + batch_size].to(model.device)
            if images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            predicted = model(images).argmax(dim=1).cpu()
            correct += int((predicted == data.labels[start:start + batch_size]).sum())
    return 100.0 * correct / max(len(data.labels), 1)


def rank_neurons(table: pd.DataFrame, method: int, layer: str) -> pd.Series:
    """Mean similarity over classes of each neuron of ``layer`` (NaN ignored), ascending; neurons
    with no similarity for any class (never visualised) are left out."""
    rows = table[(table["method"] == method) & (table["layer"] == layer)]
    scores = rows.groupby("neuron")["similarity"].mean().dropna()
    return scores.sort_values(kind="stable")


def pruning_table(model: ClassifierHandle, table: pd.DataFrame, layers: Sequence[LayerInfo],
                  test: ImageSplit, ratio: float = 0.4, random_draws: int = 5,
                  seed: int = 0) -> pd.DataFrame:
    """Thesis Table 5-1: per method and layer, accuracy after zeroing the round(ratio * C)
    neurons of highest and, separately, lowest mean similarity (no fine-tuning).

    ``difference`` = acc_prune_bottom - acc_prune_top (positive: the high-similarity neurons
    matter more). ``pruned`` is capped at the number of ranked (ever visualised) neurons.
    ``acc_prune_random`` (not in the thesis; a reference for both) is the mean accuracy over
    ``random_draws`` seeded draws of as many neurons from the same ranked pool (NaN when 0).
    """
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    baseline = accuracy(model, test)
    random_cache: dict[tuple, float] = {}
    rows = []
    for method in sorted(table["method"].unique()):
        for info in layers:
            ranked = rank_neurons(table, int(method), info.name)
            n = min(int(round(ratio * info.channels)), len(ranked))
            top, bottom = ranked.index[len(ranked) - n:].tolist(), ranked.index[:n].tolist()
            with zero_channels(model, {info.name: top}):
                acc_top = accuracy(model, test)
            with zero_channels(model, {info.name: bottom}):
                acc_bottom = accuracy(model, test)
            pool = tuple(sorted(ranked.index.tolist()))
            key = (info.name, pool, n)
            if key not in random_cache:
                random_cache[key] = _random_pruning_accuracy(model, test, info.name, pool, n,
                                                             random_draws, seed)
            rows.append({"method": int(method), "layer": info.name, "neurons": info.channels,
                         "never_visualised": info.channels - len(ranked), "ratio": ratio,
                         "pruned": n, "acc_baseline": baseline, "acc_prune_top": acc_top,
                         "acc_prune_bottom": acc_bottom, "difference": acc_bottom - acc_top,
                         "acc_prune_random": random_cache[key]})
    return pd.DataFrame(rows)


def _random_pruning_accuracy(model: ClassifierHandle, test: ImageSplit, layer: str,
                             pool: Sequence[int], n: int, draws: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n].tolist()]
        with zero_channels(model, {layer: chosen}):
            values.append(accuracy(model, test))
    return float(np.mean(values)) if values else float("nan")
