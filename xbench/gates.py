"""Sanity gates: an explainer that does not beat the controls, or fails model randomisation.

Two gates, both defined in docs/protocol.md "Sanity gates":

- **controls**: on a scored column, explainer E *beats* control C when the 95% paired
  bootstrap interval of the mean per-image difference, oriented so that positive is better
  (E - C when higher is better, C - E when lower is better), lies above 0; the images are
  those both scored (same images, same targets). E passes the gate on the column when it beats
  every control the run holds (``random`` and ``centre-gaussian``, :data:`CONTROLS`); with
  fewer than 2 common images no claim is made. Controls are not gated; cost columns (the
  metrics of the ``cost`` family, or :data:`UNGATED_METRICS` where no family is known) are not
  either: a control costs nothing, and a cost is not a claim about faithfulness.
- **model randomisation** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018):
  on a column of a metric whose name says randomisation (``model-randomisation``...), whose
  values are the similarity of each map to the map of the weight-randomised model (direction
  ``lower``; or a dissimilarity, ``higher``), E *fails* when the 95% bootstrap interval of its
  mean lies wholly on the wrong side of :data:`RANDOMISATION_THRESHOLD`: the map keeps, with 95%
  confidence, more than half of its structure when the model it explains is destroyed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from xbench.stats import bootstrap_ci

CONTROLS = ("random", "centre-gaussian")
#: the families whose columns are never gated (cost: every explainer spends more than a control)
UNGATED_FAMILIES = frozenset({"cost", "diagnostic"})
#: the built-in cost metrics, for rows read without their families
UNGATED_METRICS = frozenset({"forward-passes", "backward-passes", "time"})
#: half of a similarity in [0, 1] (rank correlation, SSIM): see the module docstring
RANDOMISATION_THRESHOLD = 0.5
#: footnote marks of the leaderboard cells
CONTROL_MARK = "†"
RANDOMISATION_MARK = "‡"
LEGEND = (f"{CONTROL_MARK}: does not beat the {' and '.join(CONTROLS)} controls on this column "
          f"(paired bootstrap, 95%); {RANDOMISATION_MARK}: fails the model-randomisation check "
          "(docs/protocol.md \"Sanity gates\").")


@dataclass(frozen=True)
class GateFailure:
    explainer: str
    layer: str
    column: str
    #: the controls it does not beat (empty for a randomisation failure)
    controls: tuple[str, ...] = ()
    randomisation: bool = False

    @property
    def mark(self) -> str:
        return RANDOMISATION_MARK if self.randomisation else CONTROL_MARK


def is_randomisation_metric(metric: str) -> bool:
    return "randomis" in metric or "randomiz" in metric


def beats(values: np.ndarray, control: np.ndarray, direction: str, seed: int = 0) -> bool:
    """Whether ``values`` beat ``control`` (paired per image): the 95% paired bootstrap
    interval of the oriented mean difference lies above 0."""
    difference = np.asarray(values, np.float64) - np.asarray(control, np.float64)
    if direction == "lower":
        difference = -difference
    low, _ = bootstrap_ci(difference, seed=seed)
    return bool(low > 0)


def fails_randomisation(values: np.ndarray, direction: str, seed: int = 0,
                        threshold: float = RANDOMISATION_THRESHOLD) -> bool:
    """Whether the 95% bootstrap interval of the mean lies wholly on the wrong side of
    ``threshold`` (above it for a similarity, below it for a dissimilarity)."""
    low, high = bootstrap_ci(np.asarray(values, np.float64), seed=seed)
    return bool(low > threshold) if direction == "lower" else bool(high < threshold)


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame.explainer != "") & (frame.status == "ok") & frame.value.notna()
                 & frame.direction.isin(["higher", "lower"])]


def control_outcomes(frame: pd.DataFrame, seed: int = 0, controls: tuple[str, ...] = CONTROLS,
                     ungated: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Every gated cell against every control the run holds: one row per (explainer, layer,
    column) with ``metric``, ``direction`` and, per control, True (beats it), False (does not)
    or None (fewer than 2 images in common: no claim). Controls, cost columns, ``ungated``
    columns and randomisation columns are left out."""
    scored = _scored(frame)
    explainers = set(scored.explainer.unique())  # not set(column): millions of rows
    present = [c for c in controls if c in explainers]
    columns = ["explainer", "layer", "column", "metric", "direction", *present]
    if not present:  # nothing to compare with: no per-image means of millions of rows
        return pd.DataFrame(columns=columns)
    per_image = {}
    for control in present:  # a control's map ignores the layer: one value per image
        rows = scored[scored.explainer == control]
        per_image[control] = rows.groupby(["column", "image"]).value.mean()
    records = []
    for (explainer, layer, column), cell in scored.groupby(["explainer", "layer", "column"],
                                                           sort=True):
        metric, direction = cell.metric.iloc[0], cell.direction.iloc[0]
        if (is_randomisation_metric(metric) or explainer in controls
                or metric in UNGATED_METRICS or column in ungated):
            continue
        values = cell.groupby("image").value.mean()
        outcome: dict[str, bool | None] = {}
        for control in present:
            outcome[control] = None
            if column not in per_image[control].index.get_level_values(0):
                continue
            reference = per_image[control].loc[column]
            common = values.index.intersection(reference.index)
            if len(common) >= 2:
                outcome[control] = beats(values.loc[common].to_numpy(),
                                         reference.loc[common].to_numpy(), direction, seed)
        records.append({"explainer": explainer, "layer": layer, "column": column,
                        "metric": metric, "direction": direction, **outcome})
    return pd.DataFrame(records, columns=columns)


def evaluate(frame: pd.DataFrame, seed: int = 0, controls: tuple[str, ...] = CONTROLS,
             threshold: float = RANDOMISATION_THRESHOLD,
             ungated: frozenset[str] = frozenset()) -> list[GateFailure]:
    """The gate failures of a run's rows (``xbench.leaderboard.rows_frame``), sorted by
    explainer, layer and column; ``ungated``: further columns not gated (a cost family's)."""
    out = []
    scored = _scored(frame)
    randomisation = [m for m in scored.metric.unique() if is_randomisation_metric(m)]
    for (explainer, layer, column), cell in scored[scored.metric.isin(randomisation)].groupby(
            ["explainer", "layer", "column"], sort=True):
        if len(cell) >= 2 and fails_randomisation(cell.value.to_numpy(),
                                                  cell.direction.iloc[0], seed, threshold):
            out.append(GateFailure(explainer, layer, column, randomisation=True))
    outcomes = control_outcomes(frame, seed, controls, ungated)
    present = [c for c in controls if c in outcomes.columns]
    for row in outcomes.to_dict("records"):
        lost = tuple(c for c in present if _claim(row[c]) is False)
        if lost:
            out.append(GateFailure(row["explainer"], row["layer"], row["column"], controls=lost))
    return sorted(out, key=lambda f: (f.explainer, f.layer, f.column))


def _claim(value) -> bool | None:
    """An outcome cell as True, False or None (no claim; pandas may hold it as NaN)."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) \
        else bool(value)


def format_controls(outcomes: pd.DataFrame, order: list[str] | None = None) -> str:
    """A markdown table of :func:`control_outcomes`: one row per explainer (and layer), one
    column per metric column; ✓ beats every control, ½ some of them, ✗ none, blank no claim;
    the last column counts the columns where it beats every control. Explainers sorted by that
    count (most first), then by name; ``order``: the columns' order (default: as found)."""
    controls = list(outcomes.columns[5:])
    if outcomes.empty or not controls:
        return (f"no gated column: the run holds no control ({', '.join(CONTROLS)}: add them "
                "to --explainers) or no scored explainer\n")
    found = set(outcomes.column)
    columns = [c for c in order if c in found] if order else list(dict.fromkeys(outcomes.column))
    lines = []
    for (explainer, layer), rows in outcomes.groupby(["explainer", "layer"], sort=True):
        cells, wins = {}, 0
        for row in rows.to_dict("records"):
            claims = [_claim(row[c]) for c in controls if _claim(row[c]) is not None]
            if not claims:
                cells[row["column"]] = ""
                continue
            won = sum(bool(c) for c in claims)
            full = won == len(claims) == len(controls)
            wins += full
            cells[row["column"]] = "✓" if full else ("✗" if won == 0 else "½")
        name = f"{explainer} @{layer}" if layer and layer != "-" else explainer
        lines.append((-wins, name, [cells.get(c, "") for c in columns], wins))
    header = "| explainer | " + " | ".join(columns) + " | beats all controls |"
    rule = "|---|" + "---|" * (len(columns) + 1)
    body = [f"| {name} | " + " | ".join(cells) + f" | {wins} of {len(columns)} |"
            for _, name, cells, wins in sorted(lines)]
    legend = (f"\n✓ beats {' and '.join(controls)} (paired bootstrap, 95%); ½ beats some of "
              "them; ✗ none; blank: fewer than 2 images in common.\n")
    return "\n".join([header, rule, *body]) + "\n" + legend


def mark_matrix(frame: pd.DataFrame, table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``table`` (``xbench.leaderboard.matrix``) with a ``gate`` column: the footnote mark of
    each failing cell, '' elsewhere."""
    ungated = frozenset(table.column[table.family.isin(UNGATED_FAMILIES)]) \
        if "family" in table else frozenset()
    marks = {(f.explainer, f.layer, f.column): f.mark
             for f in evaluate(frame, seed, ungated=ungated)}
    table = table.copy()
    table["gate"] = [marks.get(key, "") for key in zip(table.explainer, table.layer,
                                                       table.column)] if len(table) else []
    return table
