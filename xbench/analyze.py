"""Rank stability of a run: do the explainers' ranks survive resampling, and do metrics agree?

For every scored column (cost columns aside, :data:`xbench.gates.UNGATED_METRICS`) the
explainers are ranked by their mean over the images every one of them scored (1 = best, ties
share the average rank), with a 95% percentile bootstrap interval of each rank: the images are
resampled with replacement (seeded) and the ranks recomputed per resample. Two columns' rankings
are compared with Kendall's tau-b over the explainers both hold (Kendall, "The treatment of ties
in ranking problems", Biometrika 1945): +1 the same order, -1 reversed. Columns of one metric
that differ only by a protocol variant (deletion substrate, retention rule, step size) are
compared pair by pair and every pair of explainers whose order flips is listed, starred when
the two differ significantly (paired bootstrap, 95%) in both columns: a ranking that flips with
a convention is a finding (docs/protocol.md "Rank stability").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xbench.gates import UNGATED_METRICS
from xbench.stats import BOOTSTRAP_RESAMPLES, CONFIDENCE, significantly_different

#: resamples whose counts are drawn at once (memory: chunk x images counts)
CHUNK = 100


@dataclass
class ColumnRanks:
    """The explainers' ranks on one column."""

    column: str
    metric: str
    variant: str
    direction: str
    explainers: list[str]
    means: np.ndarray
    ranks: np.ndarray
    low: np.ndarray
    high: np.ndarray
    images: int
    #: per-image values (explainers x images), the images every explainer scored
    values: np.ndarray | None = None


@dataclass
class VariantFlip:
    """Two variants of one metric: their tau and the explainer pairs whose order flips."""

    metric: str
    first: str
    second: str
    tau: float
    flips: list[tuple[str, str]] = field(default_factory=list)
    #: the flips significant in both columns (paired bootstrap over their common images, 95%)
    significant: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Analysis:
    columns: list[ColumnRanks]
    tau: pd.DataFrame
    variants: list[VariantFlip]
    seed: int
    resamples: int


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = highest score, ties sharing their average rank:
    rank_i = 1 + #{j: s_j > s_i} + #{j != i: s_j == s_i} / 2."""
    s = np.asarray(scores, dtype=np.float64)
    greater = (s[..., None, :] > s[..., :, None]).sum(axis=-1)
    equal = (s[..., None, :] == s[..., :, None]).sum(axis=-1) - 1
    return 1.0 + greater + equal / 2.0


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two paired samples: (P - Q) / sqrt((P + Q + Tx) (P + Q + Ty)), P and
    Q the concordant and discordant pairs, Tx (Ty) the pairs tied in x only (y only); NaN when
    either sample is constant or has fewer than 2 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return float("nan")
    i, j = np.triu_indices(x.size, k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    both = dx * dy
    concordant, discordant = int((both > 0).sum()), int((both < 0).sum())
    tied_x, tied_y = int(((dx == 0) & (dy != 0)).sum()), int(((dy == 0) & (dx != 0)).sum())
    denominator = np.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return float((concordant - discordant) / denominator) if denominator else float("nan")


def bootstrap_ranks(values: np.ndarray, direction: str, seed: int = 0,
                    resamples: int = BOOTSTRAP_RESAMPLES,
                    confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranks, low, high) of the rows of ``values`` (explainers x images) by their mean: the
    ranks on all images and the percentile interval of the ranks over ``resamples`` bootstrap
    resamples of the images (multinomial counts, the same law as drawing indices)."""
    values = np.asarray(values, dtype=np.float64)
    sign = 1.0 if direction == "higher" else -1.0
    ranks = average_ranks(sign * values.mean(axis=1))
    n = values.shape[1]
    if n < 2:
        return ranks, ranks.copy(), ranks.copy()
    rng = np.random.default_rng(seed)
    resampled = []
    for start in range(0, resamples, CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(CHUNK, resamples - start))
        resampled.append(average_ranks(sign * (counts @ values.T) / n))
    all_ranks = np.concatenate(resampled)  # resamples x explainers
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(all_ranks, [tail, 1.0 - tail], axis=0)
    return ranks, low, high


def _label(explainer: str, layer: str) -> str:
    return explainer if layer in ("", "-") else f"{explainer} @{layer}"


def column_ranks(frame: pd.DataFrame, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 include_cost: bool = False) -> list[ColumnRanks]:
    """Ranks of every scored column of a rows frame (``xbench.leaderboard.rows_frame``), in the
    order the metrics produced them; images are those every explainer of the column scored."""
    scored = frame[(frame.explainer != "") & (frame.status == "ok") & frame.value.notna()
                   & frame.direction.isin(["higher", "lower"])]
    if not include_cost:
        scored = scored[~scored.metric.isin(UNGATED_METRICS)]
    out = []
    for column in dict.fromkeys(scored.column):
        cell = scored[scored.column == column]
        labels = [_label(e, l) for e, l in zip(cell.explainer, cell.layer)]
        wide = cell.assign(who=labels).pivot_table(index="who", columns="image", values="value",
                                                    aggfunc="mean").dropna(axis=1)
        wide = wide.sort_index()
        if wide.shape[0] < 2 or wide.shape[1] < 1:
            continue
        direction = cell.direction.iloc[0]
        values = wide.to_numpy()
        ranks, low, high = bootstrap_ranks(values, direction, seed, resamples)
        out.append(ColumnRanks(column, cell.metric.iloc[0], cell.variant.iloc[0], direction,
                               list(wide.index), values.mean(axis=1), ranks, low, high,
                               values.shape[1], wide))
    return out


def tau_matrix(columns: list[ColumnRanks]) -> pd.DataFrame:
    """Kendall's tau-b between the rankings of every pair of columns (explainers in common)."""
    names = [c.column for c in columns]
    tau = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b in itertools.combinations(columns, 2):
        common = sorted(set(a.explainers) & set(b.explainers))
        x = [a.ranks[a.explainers.index(e)] for e in common]
        y = [b.ranks[b.explainers.index(e)] for e in common]
        tau.loc[a.column, b.column] = tau.loc[b.column, a.column] = kendall_tau(x, y)
    return tau


def _significant(column: ColumnRanks, first: str, second: str, seed: int) -> bool:
    values = column.values
    return significantly_different(values.loc[first].to_numpy(), values.loc[second].to_numpy(),
                                   seed=seed)


def variant_flips(columns: list[ColumnRanks], tau: pd.DataFrame,
                  seed: int = 0) -> list[VariantFlip]:
    """Every pair of columns of one metric (different variants) with the explainer pairs
    whose order flips between them (strictly better in one, strictly worse in the other), and
    those of the flips whose difference is significant in both columns (paired bootstrap)."""
    out = []
    by_metric: dict[str, list[ColumnRanks]] = {}
    for column in columns:
        by_metric.setdefault(column.metric, []).append(column)
    for metric, group in by_metric.items():
        for a, b in itertools.combinations(group, 2):
            common = sorted(set(a.explainers) & set(b.explainers))
            rank_a = {e: a.ranks[a.explainers.index(e)] for e in common}
            rank_b = {e: b.ranks[b.explainers.index(e)] for e in common}
            flips = [(e, f) for e, f in itertools.combinations(common, 2)
                     if (rank_a[e] - rank_a[f]) * (rank_b[e] - rank_b[f]) < 0]
            significant = [(e, f) for e, f in flips
                           if _significant(a, e, f, seed) and _significant(b, e, f, seed)]
            out.append(VariantFlip(metric, a.column, b.column,
                                   float(tau.loc[a.column, b.column]), flips, significant))
    return out


def analyze(frame: pd.DataFrame, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
            include_cost: bool = False) -> Analysis:
    columns = column_ranks(frame, seed, resamples, include_cost)
    tau = tau_matrix(columns)
    return Analysis(columns, tau, variant_flips(columns, tau, seed), seed, resamples)


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


def format_text(analysis: Analysis) -> str:
    """The analysis as plain text (markdown tables)."""
    lines = [f"Ranks per column (1 = best; [95% bootstrap interval over images, "
             f"{analysis.resamples} resamples, seed {analysis.seed}])", ""]
    explainers = sorted({e for c in analysis.columns for e in c.explainers})
    lines.append("| explainer | " + " | ".join(c.column for c in analysis.columns) + " |")
    lines.append("|" + "---|" * (len(analysis.columns) + 1))
    for explainer in explainers:
        cells = []
        for c in analysis.columns:
            if explainer not in c.explainers:
                cells.append("")
                continue
            i = c.explainers.index(explainer)
            cells.append(f"{_number(c.ranks[i])} [{_number(c.low[i])}–{_number(c.high[i])}]")
        lines.append(f"| {explainer} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("images per column: " + ", ".join(f"{c.column} {c.images}"
                                                   for c in analysis.columns))
    lines += ["", "Kendall's tau-b between the columns' rankings (+1 same order, -1 reversed)", ""]
    names = list(analysis.tau.index)
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|" + "---|" * (len(names) + 1))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            "–" if np.isnan(v) else f"{v:.2f}" for v in analysis.tau.loc[name]) + " |")
    if analysis.variants:
        lines += ["", "Protocol variants of one metric: tau and the explainer pairs that flip", ""]
        for v in analysis.variants:
            pairs = ", ".join(f"{a} / {b}{' *' if (a, b) in v.significant else ''}"
                              for a, b in v.flips)
            flag = f"FLIPS ({len(v.flips)}, {len(v.significant)} significant in both *): " \
                f"{pairs}" if v.flips else "same order"
            lines.append(f"- {v.first} vs {v.second}: tau {v.tau:.2f}; {flag}")
    return "\n".join(lines) + "\n"


def draw_tau_heatmap(tau: pd.DataFrame, output: Path, title: str) -> Path:
    """A PNG heatmap of the tau matrix (diverging colours, -1 to +1, values written in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tau)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(tau.to_numpy(dtype=float), cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(n), tau.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), tau.index, fontsize=8)
    for i in range(n):
        for j in range(n):
            value = tau.iat[i, j]
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="Kendall's tau-b")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def controls_text(folder, seed: int | None = None) -> str:
    """``xbench analyze RUN --controls``: :func:`xbench.gates.format_controls` of a run folder
    (:class:`xbench.records.RunFolder`), its columns in the leaderboard's family order, cost and
    diagnostic columns ungated; ``seed`` defaults to the run's."""
    from xbench.gates import UNGATED_FAMILIES, control_outcomes, format_controls
    from xbench.leaderboard import run_frame
    from xbench.view import family_rank, metric_families

    header = folder.header()
    if seed is None:
        seed = header.config.get("seed", 0)
    frame = run_frame(folder)
    kinds = dict(zip(frame.metric, frame.kind)) if "kind" in frame else None
    family = frame.metric.map(metric_families(frame.metric.unique(), header, kinds))
    ungated = frozenset(frame.column[family.isin(UNGATED_FAMILIES)])
    first = dict(zip(frame.column[::-1], family[::-1]))  # column -> its family
    order = sorted(dict.fromkeys(frame.column), key=lambda c: family_rank(first[c]))
    return format_controls(control_outcomes(frame, seed, ungated=ungated), order)

