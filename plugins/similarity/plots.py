"""Figures (matplotlib's object API: no global backend state, works headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xbench_plugins.similarity.analysis import NeuronVisuals


def _as_picture(image: torch.Tensor) -> np.ndarray:
    return image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def gbp_picture(gradient: torch.Tensor) -> np.ndarray:
    """A signed gradient (3, H, W) as an RGB picture: 0 is mid-grey, +-max|g| white/black."""
    peak = gradient.abs().max()
    scaled = gradient / (2 * peak) + 0.5 if peak > 0 else torch.full_like(gradient, 0.5)
    return _as_picture(scaled)


def plot_averages(averages: dict[str, dict[int, torch.Tensor]], class_names: Sequence[str],
                  path: Path) -> None:
    """Grid: one row per kind of class average image, one column per class."""
    from matplotlib.figure import Figure

    kinds = [k for k in averages if averages[k]]
    classes = list(averages[kinds[0]])
    fig = Figure(figsize=(1.2 * len(classes) + 1, 1.3 * len(kinds) + 0.3))
    axes = fig.subplots(len(kinds), len(classes), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, cls in enumerate(classes):
            ax = axes[r][c]
            ax.imshow(_as_picture(averages[kind][cls]))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(class_names[cls][:14], fontsize=8)
            if c == 0:
                ax.set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Mean similarity per layer (+-std band for the class average), one panel per method."""
    from matplotlib.figure import Figure

    methods = sorted(curves["method"].unique())
    fig = Figure(figsize=(6 * len(methods), 4))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        part = curves[curves["method"] == method]
        layers = list(dict.fromkeys(part["layer"].astype(str)))
        x = np.arange(len(layers))
        for cls, rows in part.groupby("class", sort=False):
            if cls == "all":
                continue
            ax.plot(x, rows["mean"].to_numpy(), lw=0.8, alpha=0.5, label=f"class {cls}")
        mean_rows = part[part["class"] == "all"]
        mean, std = mean_rows["mean"].to_numpy(), mean_rows["std"].to_numpy()
        ax.plot(x, mean, color="black", lw=2.5, marker="o", label="average")
        ax.fill_between(x, mean - std, mean + std, color="grey", alpha=0.25, label="average +- std")
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("similarity value (cosine)")
        ax.set_title(f"method {method}: GBP(I, j, k) vs {'I' if method == 1 else 'phi = GBP(I, out, i)'}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_neurons(visuals: dict[tuple[int, str, int], NeuronVisuals], image: torch.Tensor,
                 cls: int, method: int, layers: Sequence[str], path: Path, title: str) -> None:
    """Grid for one class and method: per layer the class average, the top and bottom neurons'
    GBP visualisations, each titled with its neuron index and similarity."""
    from matplotlib.figure import Figure

    show = max(max(len(visuals[(cls, l, method)].top), len(visuals[(cls, l, method)].bottom))
               for l in layers)
    cols = 1 + 2 * max(show, 1)
    fig = Figure(figsize=(1.3 * cols, 1.45 * len(layers) + 0.4))
    axes = fig.subplots(len(layers), cols, squeeze=False)
    for r, layer in enumerate(layers):
        v = visuals[(cls, layer, method)]
        cells = [(_as_picture(image), "I" if r == 0 else "")]
        cells += [(gbp_picture(m), f"top #{k}\n{s:.3f}") for k, s, m in zip(v.top, v.top_values, v.top_maps)]
        cells += [(None, "")] * (show - len(v.top))
        cells += [(gbp_picture(m), f"bottom #{k}\n{s:.3f}")
                  for k, s, m in zip(v.bottom, v.bottom_values, v.bottom_maps)]
        cells += [(None, "")] * (cols - len(cells))
        for c, (picture, label) in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if picture is not None:
                ax.imshow(picture)
            ax.set_title(label, fontsize=6)
            if c == 0:
                ax.set_ylabel(layer, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
