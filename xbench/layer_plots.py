"""Overall score per target layer for each explainer (``xbench plot layers RUN_DIR``).

The comparison of layer-wise CAM papers (Cheng Yan et al. 2025, LayerCAM): the overall score
AUC(insertion) - AUC(deletion) (docs/protocol.md "Insertion and deletion", metric
``insertion-deletion``) of the map produced at every layer, layers in the model's forward
order, one line per explainer with its mean over images and a 95% bootstrap band
(:func:`xbench.stats.bootstrap_ci`, seeded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xbench.errors import UserError
from xbench.records import ResultRow
from xbench.stats import bootstrap_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OVERALL_METRIC = "insertion-deletion"
#: the layer recorded for explainers that read none (``uses_layer = False``)
NO_LAYER = "-"


@dataclass(frozen=True)
class LayerScore:
    """One point of a line: an explainer's overall score at one layer."""

    explainer: str
    layer: str
    mean: float
    ci_low: float
    ci_high: float
    images: int


def layer_scores(rows: Iterable[ResultRow], variant: str | None = None,
                 seed: int = 0) -> tuple[list[str], list[LayerScore]]:
    """(layers in forward order, one LayerScore per (explainer, layer) that has scores).

    Layers keep the order in which they first appear in the rows, which is the run's forward
    order (the runner explains a batch layer by layer in the order of ``--layers``). Explainers
    that read no layer (RISE, guided backprop) have layer ``NO_LAYER``: they get a point but
    no place among the layers. Only rows
    with status "ok" count. Raises UserError when the run has no ``insertion-deletion`` rows
    or, without ``variant``, several variants of it.
    """
    scored = [r for r in rows if r.metric == OVERALL_METRIC and r.explainer
              and r.status == "ok" and r.value is not None]
    variants = sorted({r.variant for r in scored})
    if not variants:
        raise UserError(f"the run has no {OVERALL_METRIC!r} scores; run it with --metrics "
                        f"{OVERALL_METRIC} and --layers all (or NAME,NAME)")
    if variant is None:
        if len(variants) > 1:
            raise UserError(f"the run has {OVERALL_METRIC} scores for several variants "
                            f"({', '.join(variants)}); choose one with --variant")
        variant = variants[0]
    elif variant not in variants:
        raise UserError(f"--variant {variant!r}: the run's {OVERALL_METRIC} variants are "
                        f"{', '.join(variants)}")
    values: dict[tuple[str, str], list[float]] = {}
    for row in scored:
        if row.variant == variant:
            values.setdefault((row.explainer, row.layer), []).append(float(row.value))
    order = list(dict.fromkeys(layer for _, layer in values))
    points = []
    for (explainer, layer), per_image in sorted(values.items(),
                                                key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        array = np.asarray(per_image)
        low, high = bootstrap_ci(array, seed=seed)
        points.append(LayerScore(explainer, layer, float(array.mean()), low, high, array.size))
    return [layer for layer in order if layer != NO_LAYER], points


def draw_layer_scores(layers: list[str], points: list[LayerScore], title: str,
                      output: Path) -> Figure:
    """One line (mean) with a shaded 95% band per explainer over the layers; PNG via Agg.

    An explainer that reads no layer is one dashed horizontal line with its band. Returns the
    figure (its axes hold one labelled line per explainer)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display needed

    figure = Figure(figsize=(max(6.0, 0.55 * len(layers) + 2.5), 4.8), layout="constrained")
    ax = figure.subplots()
    position = {layer: i for i, layer in enumerate(layers)}
    for explainer in dict.fromkeys(p.explainer for p in points):
        line = [p for p in points if p.explainer == explainer]
        if line[0].layer == NO_LAYER:
            drawn = ax.axhline(line[0].mean, linestyle="--", label=f"{explainer} (no layer)")
            ax.axhspan(line[0].ci_low, line[0].ci_high, color=drawn.get_color(), alpha=0.1,
                       linewidth=0)
            continue
        x = np.array([position[p.layer] for p in line])
        (drawn,) = ax.plot(x, [p.mean for p in line], marker="o", markersize=3, label=explainer)
        ax.fill_between(x, [p.ci_low for p in line], [p.ci_high for p in line],
                        color=drawn.get_color(), alpha=0.2, linewidth=0)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize="small")
    ax.set_xlabel("target layer (forward order)")
    ax.set_ylabel("AUC(insertion) - AUC(deletion)\nmean over images, 95% bootstrap band")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
    return figure


def plot_layers(rows: Iterable[ResultRow], output: Path, title: str = "",
                variant: str | None = None, seed: int = 0) -> list[LayerScore]:
    """Compute the per-layer overall scores of ``rows`` and draw them to ``output``."""
    layers, points = layer_scores(rows, variant=variant, seed=seed)
    images = max(p.images for p in points)
    heading = f"{title}: " if title else ""
    draw_layer_scores(layers, points, f"{heading}overall score per layer ({images} images)",
                      Path(output))
    return points
