"""Cost against faithfulness: each explainer's passes per image against its score on a column,
and the Pareto front (``xbench plot pareto RUN --metric COLUMN``).

Cost is the mean number of forward plus backward passes per image an explainer spent (the
``forward-passes`` and ``backward-passes`` metrics, docs/protocol.md "Cost"): a count, so the
figure does not depend on the host's speed. An explainer is on the front when no other one is
at most as costly and at least as good with one of the two strictly better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xbench.errors import UserError
from xbench.stats import bootstrap_ci

PASS_METRICS = ("forward-passes", "backward-passes")


def pareto_front(costs: np.ndarray, scores: np.ndarray, direction: str) -> np.ndarray:
    """Indices of the points no other point dominates (cost lower or equal and score better or
    equal, one strictly), by increasing cost then better score."""
    costs = np.asarray(costs, np.float64)
    good = np.asarray(scores, np.float64) * (1.0 if direction == "higher" else -1.0)
    no_worse = (costs[None, :] <= costs[:, None]) & (good[None, :] >= good[:, None])
    strictly = (costs[None, :] < costs[:, None]) | (good[None, :] > good[:, None])
    dominated = (no_worse & strictly).any(axis=1)
    front = np.flatnonzero(~dominated)
    return front[np.lexsort((-good[front], costs[front]))]


def _label(explainer: str, layer: str) -> str:
    return explainer if layer in ("", "-") else f"{explainer} @{layer}"


def resolve_column(frame: pd.DataFrame, name: str) -> str:
    """``name`` as a column of the run: a full column (``insertion@step=224``) or a metric with
    one variant; otherwise an error listing the columns."""
    scored = frame[(frame.explainer != "") & frame.direction.isin(["higher", "lower"])
                   & ~frame.metric.isin(PASS_METRICS)]
    columns = list(dict.fromkeys(scored.column))
    if name in columns:
        return name
    matching = [c for c in columns if c.split("@")[0] == name]
    if len(matching) == 1:
        return matching[0]
    hint = f"it has {len(matching)} variants: " if matching else "choose one of: "
    raise UserError(f"--metric {name!r}: {hint}{', '.join(matching or columns)}")


def pareto_points(frame: pd.DataFrame, column: str, seed: int = 0) -> pd.DataFrame:
    """One line per explainer (and layer): passes per image, the column's mean with its 95%
    bootstrap interval, and whether it is on the front."""
    ok = frame[(frame.explainer != "") & (frame.status == "ok") & frame.value.notna()]
    missing = [m for m in PASS_METRICS if m not in set(ok.metric)]
    if missing:
        raise UserError(f"the run has no {' or '.join(missing)} rows: re-run with them in "
                        "--metrics (e.g. --metrics insertion,forward-passes,backward-passes)")
    passes = (ok[ok.metric.isin(PASS_METRICS)].groupby(["explainer", "layer", "metric"])
              .value.mean().unstack("metric").fillna(0.0).sum(axis=1))
    cells = ok[ok.column == column]
    lines = []
    for (explainer, layer), cell in cells.groupby(["explainer", "layer"], sort=True):
        if (explainer, layer) not in passes.index:
            continue
        values = cell.value.to_numpy(dtype=np.float64)
        low, high = bootstrap_ci(values, seed=seed)
        lines.append({"explainer": _label(explainer, layer), "passes": float(passes[(explainer, layer)]),
                      "mean": float(values.mean()), "ci_low": low, "ci_high": high,
                      "images": int(values.size)})
    points = pd.DataFrame(lines, columns=["explainer", "passes", "mean", "ci_low", "ci_high",
                                          "images"])
    direction = cells.direction.iloc[0] if len(cells) else "higher"
    points["front"] = False
    if len(points):
        points.loc[pareto_front(points.passes.to_numpy(), points["mean"].to_numpy(), direction),
                   "front"] = True
    return points


def draw_pareto(points: pd.DataFrame, column: str, direction: str, output: Path,
                title: str) -> Path:
    """The scatter (score with its interval against passes per image, symmetric log scale:
    linear below 1 pass so the controls' 0 shows) with the front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    errors = np.vstack([points["mean"] - points.ci_low, points.ci_high - points["mean"]])
    colours = np.where(points.front, "tab:red", "tab:gray")
    ax.errorbar(points.passes, points["mean"], yerr=np.clip(errors, 0, None), fmt="none",
                ecolor="lightgray", elinewidth=1, zorder=1)
    ax.scatter(points.passes, points["mean"], c=colours, s=28, zorder=2)
    for _, line in points.iterrows():  # the front's names stand out; the rest stay readable
        ax.annotate(line.explainer, (line.passes, line["mean"]), xytext=(4, 3),
                    textcoords="offset points", fontsize=8 if line.front else 6,
                    color="black" if line.front else "dimgray")
    front = points[points.front].sort_values("passes")
    if len(front):
        ax.step(front.passes, front["mean"], where="post", color="tab:red", linewidth=1.2,
                label="Pareto front", zorder=1)
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("forward + backward passes per image (symmetric log scale)")
    arrow = "↑ better" if direction == "higher" else "↓ better"
    ax.set_ylabel(f"{column} ({arrow}), mean [95% CI]")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
