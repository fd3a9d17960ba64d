"""Mean insertion/deletion curves of a run and their figure, shared by ``xbench plot curves``
and the HTML report (a view never imports a CLI module)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbench.errors import UserError
from xbench.records import ResultRow

CURVE_METRICS = ("insertion", "deletion")


@dataclass(frozen=True)
class MeanCurve:
    """The mean over images of one explainer's curve for one metric variant."""

    metric: str
    variant: str
    label: str
    curve: np.ndarray  # (n + 1,) p_c after 0..n steps
    auc: float  # mean of the rows' values (the matrix cell)
    images: int


def mean_curves(rows: Iterable[ResultRow], variant: str | None = None) -> list[MeanCurve]:
    """Mean curve per (metric, explainer, layer) over the scored rows that carry one.

    Explainers are labelled by name, with ``@layer`` when an explainer ran at several layers.
    Raises UserError when the run has no curves or, without ``variant``, several variants.
    """
    groups: dict[tuple[str, str, str, str], list[ResultRow]] = defaultdict(list)
    for row in rows:
        if row.metric in CURVE_METRICS and row.status == "ok" and row.curve is not None:
            groups[(row.metric, row.variant, row.explainer, row.layer)].append(row)
    variants = sorted({key[1] for key in groups})
    if not variants:
        raise UserError("the run has no insertion or deletion curves; run it with "
                        "--metrics insertion,deletion (or all)")
    if variant is None:
        if len(variants) > 1:
            raise UserError(f"the run has curves for several variants ({', '.join(variants)}); "
                            "choose one with --variant")
        variant = variants[0]
    elif variant not in variants:
        raise UserError(f"--variant {variant!r}: the run's curves are for {', '.join(variants)}")
    layers = defaultdict(set)
    for _, _, explainer, layer in groups:
        layers[explainer].add(layer)
    out = []
    for (metric, var, explainer, layer), members in sorted(groups.items()):
        if var != variant:
            continue
        lengths = {len(row.curve) for row in members}
        if len(lengths) != 1:
            raise UserError(f"{metric} curves of {explainer!r} have different lengths "
                            f"{sorted(lengths)} within variant {variant!r}; the records are mixed")
        label = f"{explainer}@{layer}" if len(layers[explainer]) > 1 else explainer
        curves = np.array([row.curve for row in members], dtype=float)
        out.append(MeanCurve(metric, var, label, curves.mean(axis=0),
                             float(np.mean([row.value for row in members])), len(members)))
    return out


def draw_curves(curves: list[MeanCurve], title: str, output: Path) -> None:
    """Insertion (left) and deletion (right) panels, one line per explainer, legend with AUC."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display needed

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, metric, better in zip(axes, CURVE_METRICS, ("higher", "lower")):
        for curve in (c for c in curves if c.metric == metric):
            x = np.linspace(0.0, 1.0, len(curve.curve))  # equal steps, as the AUC weights them
            ax.plot(x, curve.curve, label=f"{curve.label} (AUC {curve.auc:.3f})")
        ax.set_title(f"{metric} ({better} AUC is better)")
        ax.set_xlabel("fraction of pixels " + ("inserted" if metric == "insertion" else "deleted"))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].set_ylabel("p(target class), mean over images")
    figure.suptitle(title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
