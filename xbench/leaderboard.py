"""Views derived from run records: pandas frames, the matrix, LEADERBOARD.md and its CSV.

Nothing here is stored state: every view is recomputed from ``rows.jsonl`` and ``run.json``,
deterministically (seeded bootstrap, sorted keys), so the committed leaderboard can be checked
byte for byte against the committed records (``xbench leaderboard --check``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xbench import gates, view
from xbench.errors import UserError
from xbench.records import ResultRow, RunFolder, RunHeader, find_runs
from xbench.stats import (EXACT_MAX_IMAGES, bootstrap_cis, excludes_zero, percentile_interval,
                          resampled_means)
from xbench.view import OTHER_FAMILY, family_rank, metric_families

LEADERBOARD_MD = "LEADERBOARD.md"
LEADERBOARD_CSV = "leaderboard.csv"
ARROWS = {"lower": "↓", "higher": "↑"}


#: the columns of a run's rows the leaderboard reads (the view reads no others)
LEADERBOARD_COLUMNS = ("image", "label", "predicted", "explainer", "layer", "metric", "variant",
                       "direction", "value", "status", "degenerate", "error", "column", "kind")
MATRIX_COLUMNS = ["explainer", "layer", "column", "family", "metric", "variant", "direction",
                  "mean", "ci_low", "ci_high", "median", "q1", "q3", "images", "degenerate",
                  "order", "layer_order"]


def rows_frame(rows: list[ResultRow]) -> pd.DataFrame:
    """One line per ResultRow (curves left out), with the matrix column name and the row's
    kind (:func:`xbench.records.row_kind`) added."""
    return view.records_frame(rows)


def run_frame(folder: RunFolder) -> pd.DataFrame:
    """:func:`rows_frame` of a run's finished rows, through its shared view (xbench/view.py)."""
    return view.load(folder).frame()


def top1_accuracy(frame: pd.DataFrame) -> tuple[float, int]:
    """(accuracy, images) of the model's top-1 prediction over images that have a label."""
    images = frame[(frame.explainer == "") & (frame.metric == "confidence")
                   & (frame.status == "ok") & frame.label.notna()]
    if images.empty:
        return float("nan"), 0
    correct = (images.label.astype(int) == images.predicted.astype(int)).to_numpy()
    return float(correct.mean()), int(correct.size)


def model_scores(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Model-scope metrics (no explainer): one line per column, mean with a seeded 95%
    bootstrap interval over images."""
    scored = frame[(frame.explainer == "") & (frame.metric != "confidence")
                   & (frame.status == "ok") & frame.value.notna()]
    columns = np.asarray(scored.column, dtype=object)
    values = scored.value.to_numpy(dtype=np.float64)
    directions = np.asarray(scored.direction, dtype=object)
    order = list(dict.fromkeys(columns.tolist()))
    cells = [values[columns == column] for column in order]
    intervals = bootstrap_cis(cells, seed=seed)
    out = [{"column": column, "direction": directions[np.argmax(columns == column)],
            "mean": float(cell.mean()), "ci_low": low, "ci_high": high, "images": int(cell.size)}
           for column, cell, (low, high) in zip(order, cells, intervals)]
    return pd.DataFrame(out, columns=["column", "direction", "mean", "ci_low", "ci_high", "images"])


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed rows, one per (image, explainer, metric, error)."""
    failed = frame[frame.status != "ok"]
    return failed[["image", "explainer", "layer", "metric", "error"]].drop_duplicates()


def _sorted_codes(series: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(codes, categories): codes of ``series`` whose order is the categories' string order."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        categories = sorted(series.cat.categories)
        return series.cat.set_categories(categories).cat.codes.to_numpy(), categories
    codes, uniques = pd.factorize(series.astype(object), sort=True)
    return codes, list(uniques)


def _first_seen(codes: np.ndarray, count: int) -> np.ndarray:
    """For each code, the rank of its first appearance in ``codes`` (-1 when absent)."""
    first = np.full(count, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    ranks = np.full(count, -1, dtype=np.int64)
    present = np.flatnonzero(first < len(codes))
    ranks[present[np.argsort(first[present], kind="stable")]] = np.arange(len(present))
    return ranks


def matrix(frame: pd.DataFrame, seed: int = 0,
           families: dict[str, str] | None = None) -> pd.DataFrame:
    """The explainer x metric matrix: one line per (explainer, layer, column).

    mean over images with a seeded 95% bootstrap interval; ``best`` marks the best explainer
    of each (layer-agnostic) column, ``tied_with_best`` those whose paired bootstrap
    difference from the best includes 0 (the same images, docs/protocol.md "Aggregation");
    ``family`` is the metric's family (``families``, else :func:`xbench.view.metric_families`).
    Computed on category codes and shared bootstrap draws (:func:`xbench.stats.bootstrap_cis`):
    the same numbers as cell by cell, at a cost that does not grow with the rows' Python
    objects.
    """
    keep = (frame.explainer != "") & (frame.status == "ok") & frame.value.notna()
    scored = frame[["explainer", "layer", "column", "image", "value", "degenerate", "metric",
                    "variant", "direction"]][keep]
    explainers, explainer_names = _sorted_codes(scored.explainer)
    layers, layer_names = _sorted_codes(scored.layer)
    columns, column_names = _sorted_codes(scored.column)
    images, _ = _sorted_codes(scored.image)
    values = scored.value.to_numpy(dtype=np.float64)
    degenerate = scored.degenerate.to_numpy(dtype=bool)
    # columns keep the order the metrics produced them in (retention 100%, 50%, 15%, ...)
    column_seen = _first_seen(columns, len(column_names))
    # layers keep the runner's order (forward order), not the alphabet (_blocks.10 < _blocks.2)
    layer_seen = _first_seen(layers, len(layer_names))
    key = ((explainers.astype(np.int64) * len(layer_names) + layers) * len(column_names)
           + columns)
    groups, inverse = np.unique(key, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # grouped; file order within a group
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(groups)))])
    cells, firsts = [], []
    for index in range(len(groups)):
        members = order[bounds[index]:bounds[index + 1]]
        cells.append(members)
        firsts.append(members[0])
    # the strings of each cell's first row only (not millions of Python objects)
    picked = scored.iloc[np.asarray(firsts, dtype=np.int64)]
    metrics = dict(zip(firsts, np.asarray(picked.metric, dtype=object)))
    variants = dict(zip(firsts, np.asarray(picked.variant, dtype=object)))
    directions = dict(zip(firsts, np.asarray(picked.direction, dtype=object)))
    cell_values = [values[members] for members in cells]
    cell_means = resampled_means(cell_values, seed=seed)
    intervals = [percentile_interval(means) for means in cell_means]
    if families is None:
        kinds = {metrics[i]: ("diagnostic" if directions[i] == "" else "score") for i in firsts}
        families = metric_families(kinds, kinds=kinds)
    out = []
    for members, first, cell, (low, high) in zip(cells, firsts, cell_values, intervals):
        column = column_names[columns[first]]
        out.append({
            "explainer": explainer_names[explainers[first]], "layer": layer_names[layers[first]],
            "column": column, "family": families.get(metrics[first], OTHER_FAMILY),
            "metric": metrics[first], "variant": variants[first],
            "direction": directions[first], "mean": float(cell.mean()),
            "ci_low": low, "ci_high": high, "median": float(np.median(cell)),
            "q1": float(np.quantile(cell, 0.25)), "q3": float(np.quantile(cell, 0.75)),
            "images": int(cell.size), "degenerate": int(degenerate[members].sum()),
            "order": int(column_seen[columns[first]]),
            "layer_order": int(layer_seen[layers[first]]),
        })
    result = pd.DataFrame(out, columns=MATRIX_COLUMNS)
    best = np.zeros(len(result), dtype=bool)
    tied = np.zeros(len(result), dtype=bool)
    by_image = {}  # cell -> (image codes sorted, values in that order)

    def per_image(index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in by_image:
            members = cells[index]
            sort = np.argsort(images[members], kind="stable")
            by_image[index] = images[members][sort], values[members][sort]
        return by_image[index]

    def in_image_order(index: int) -> bool:
        return bool(np.all(np.diff(images[cells[index]]) > 0))

    pairs, differences = [], []
    for _, group in result.groupby("column", sort=True):
        if group.direction.iloc[0] not in ARROWS:
            continue  # an explainer's diagnostic (e.g. skipped channels): nothing is better
        lower = group.direction.iloc[0] == "lower"
        best_index = group["mean"].idxmin() if lower else group["mean"].idxmax()
        best[best_index] = True
        best_images, best_values = per_image(best_index)
        for index in group.index:
            if index == best_index:
                continue
            line_images, line_values = per_image(index)
            _, at_best, at_line = np.intersect1d(best_images, line_images, return_indices=True)
            if (len(at_best) > EXACT_MAX_IMAGES and len(at_best) == len(best_images)
                    == len(line_images) and in_image_order(index) and in_image_order(best_index)):
                # the same images in the same positions: the resampled mean differences are
                # the differences of the cells' resampled means (the same draws; linearity)
                low, high = percentile_interval(cell_means[index] - cell_means[best_index])
                tied[index] = not excludes_zero(low, high)
            elif len(at_best) >= 2:
                pairs.append(index)
                differences.append(line_values[at_line] - best_values[at_best])
    for index, (low, high) in zip(pairs, bootstrap_cis(differences, seed=seed)):
        tied[index] = not excludes_zero(low, high)
    result["best"] = best
    result["tied_with_best"] = tied
    return result


def format_number(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def cell_text(line: pd.Series, markdown: bool = True, interval: bool = True) -> str:
    """A cell as text: mean [95% CI] (time: median (IQR)), best bold, ties with the best ≈."""
    if line.metric == "time":
        text = format_number(line["median"])
        if interval and line.q1 != line.q3:  # equal when every image shared one timed batch
            text += f" (IQR {format_number(line.q1)}–{format_number(line.q3)})"
    elif line.ci_low == line.ci_high or not interval:
        text = format_number(line["mean"])
    else:
        text = f"{format_number(line['mean'])} [{format_number(line.ci_low)}, {format_number(line.ci_high)}]"
    if line.best:
        return f"**{text}**" if markdown else f"[bold]{text}[/]"
    if line.tied_with_best:
        return f"{text} ≈"
    return text


def column_order(matrix_frame: pd.DataFrame) -> list[str]:
    """Matrix columns grouped by metric family (faithfulness, localisation, ..., cost:
    :data:`xbench.view.FAMILY_ORDER`), in the order the metrics produced them within one."""
    firsts = matrix_frame.groupby("column", sort=False)["order"].min()
    if "family" not in matrix_frame.columns:
        return sorted(firsts.index, key=lambda column: firsts[column])
    family = matrix_frame.drop_duplicates("column").set_index("column").family
    return sorted(firsts.index, key=lambda column: (family_rank(family[column]), firsts[column]))


def column_families(matrix_frame: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """[(family, its columns)] in :func:`column_order`."""
    family = (matrix_frame.drop_duplicates("column").set_index("column").family
              if "family" in matrix_frame.columns else None)
    out: list[tuple[str, list[str]]] = []
    for column in column_order(matrix_frame):
        name = family[column] if family is not None else OTHER_FAMILY
        if not out or out[-1][0] != name:
            out.append((name, []))
        out[-1][1].append(column)
    return out


def explainer_layers(matrix_frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(explainer, layer) pairs of the matrix: explainers by name, layers in forward order."""
    pairs = matrix_frame.drop_duplicates(["explainer", "layer"])
    pairs = pairs.sort_values(["explainer", "layer_order"], kind="stable")
    return list(zip(pairs.explainer, pairs.layer))


def wide_table(matrix_frame: pd.DataFrame, markdown: bool = True,
               columns: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the matrix as text: one row per explainer (and layer), the
    ``columns`` given (all, grouped by family, when None); with ``columns`` given, only the
    explainers that have a cell in one of them."""
    every = columns is None
    columns = column_order(matrix_frame) if columns is None else columns
    layers = sorted(set(matrix_frame.layer))
    show_layer = len([layer for layer in layers if layer != "-"]) > 1
    head = ["explainer"] + (["layer"] if show_layer else [])
    directions = matrix_frame.drop_duplicates("column").set_index("column").direction
    head += [f"{c} {ARROWS.get(directions[c], '')}".strip() for c in columns]
    cells = {(line["explainer"], line["layer"], line["column"]): _Line(line)
             for line in matrix_frame.to_dict("records")}
    body = []
    for explainer, layer in explainer_layers(matrix_frame):
        present = [(explainer, layer, c) in cells for c in columns]
        if not every and not any(present):
            continue
        line = [explainer] + ([layer] if show_layer else [])
        line += [cell_text(cells[(explainer, layer, c)], markdown)
                 + cells[(explainer, layer, c)].get("gate", "") if here else ""
                 for c, here in zip(columns, present)]
        body.append(line)
    return head, body


class _Line(dict):
    """A matrix line read like the pandas Series :func:`cell_text` takes (``line.mean`` and
    ``line["mean"]``), without a Series' cost per cell."""

    __getattr__ = dict.__getitem__


def _markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def run_section(folder: RunFolder) -> tuple[str, pd.DataFrame]:
    """Markdown section and matrix frame of one run."""
    records = view.load(folder)
    header = records.header
    frame = records.frame(LEADERBOARD_COLUMNS, categorical=True)
    seed = header.config.get("seed", 0)
    table = gates.mark_matrix(frame, matrix(frame, seed=seed, families=run_families(frame, header)),
                              seed=seed)
    accuracy, labelled = top1_accuracy(frame)
    failed = failures(frame)
    env = header.environment
    lines = [
        f"## {header.run_name}",
        "",
        f"- model: `{header.model['name']}` (layer `{_layers(header)}`), "
        f"input {header.model['input_size']} px",
        f"- data: `{header.dataset['name']}` ({header.dataset['layout']}), "
        f"{header.dataset['images']} images, subset hash `{header.dataset['subset_hash']}`",
        f"- protocol v{header.protocol}, profile `{header.profile}`, target "
        f"`{header.config.get('target_rule')}`, seed {header.config.get('seed')}, "
        f"dtype {header.config.get('dtype')}, batch {header.config.get('batch_size')}, "
        f"engine {env.get('engine', {}).get('name', 'eager')}",
        f"- device {env.get('device')}, {env.get('threads')} threads; "
        + ", ".join(f"{k} {v}" for k, v in sorted(env.get("packages", {}).items())),
        f"- top-1 accuracy of the model: {format_number(accuracy)} on {labelled} labelled images",
    ]
    done = len(folder.finished_units())
    if done < header.units_total:
        lines.append(f"- **incomplete**: {done} of {header.units_total} units finished")
    if not failed.empty:
        lines.append(f"- failures: {len(failed)} (image, explainer, metric) cells failed; "
                     "see rows.jsonl")
    degenerate = frame[(frame.degenerate) & (frame.status == "ok")]
    if not degenerate.empty:
        maps = degenerate[["image", "explainer", "layer"]].drop_duplicates()
        per_explainer = maps.groupby(["explainer", "layer"]).size()
        where = ", ".join(f"{explainer}{'' if layer in ('', '-') else f' @{layer}'} {count}"
                          for (explainer, layer), count in per_explainer.items())
        lines.append(f"- degenerate maps (constant/NaN/Inf, scored as all-zero): {len(maps)} "
                     f"({where})")
    lines.append("")
    for family, columns in column_families(table):
        head, body = wide_table(table, columns=columns)
        lines += [f"### {family}", "", _markdown_table(head, body), ""]
    if not table.empty and table.gate.astype(bool).any():
        lines += [gates.LEGEND, ""]
    model = model_scores(frame, seed=header.config.get("seed", 0))
    if not model.empty:
        lines += ["Model-scope metrics (scored once per image, no explainer):", ""]
        body = [[f"{line.column} {ARROWS.get(line.direction, '')}".strip(),
                 f"{format_number(line['mean'])} [{format_number(line.ci_low)}, "
                 f"{format_number(line.ci_high)}]", str(line.images)]
                for _, line in model.iterrows()]
        lines += [_markdown_table(["metric", "mean [95% CI]", "images"], body), ""]
    return "\n".join(lines), table


def run_families(frame: pd.DataFrame, header: RunHeader) -> dict[str, str]:
    """{metric: family} of the explainers' metrics of a run's rows (``frame`` with ``kind``)."""
    explained = frame[(frame.explainer != "") & (frame.status == "ok")].drop_duplicates("metric")
    kinds = dict(zip(np.asarray(explained.metric, dtype=object),
                     np.asarray(explained.kind, dtype=object)))
    return metric_families(kinds, header, kinds)


def _layers(header: RunHeader) -> str:
    layers = header.config.get("layers")
    return layers if layers not in (None, "", "last") else header.model.get("default_layer", "")


LEGEND = (
    "Cells: mean over images [95% bootstrap interval]; time: median seconds per image (IQR). "
    "↓ lower is better, ↑ higher is better. **bold**: best in the column; ≈: not significantly "
    "different from the best (paired bootstrap over the same images, 95%). One table per metric "
    "family (faithfulness, localisation, ..., cost; an explainer's diagnostics last). Regenerate with "
    "`xbench leaderboard`; never edit by hand."
)


def render(results: Path, skipped: list[str] | None = None) -> tuple[str, str]:
    """(LEADERBOARD.md text, leaderboard.csv text) for all runs under ``results``.

    A run whose records cannot be read (a corrupt line, another schema version) is left out
    and listed under "Skipped runs" with the file and line; its message is appended to
    ``skipped`` when given. One broken run never hides the others."""
    sections, tables, problems = [], [], []
    for folder in find_runs(results):
        try:
            text, table = run_section(folder)
            table.insert(0, "run", folder.header().run_name)
        except UserError as exc:
            problems.append(str(exc))
            continue
        sections.append(text)
        tables.append(table)
    markdown = "# xbench leaderboard\n\n" + LEGEND + "\n\n" + "\n".join(sections)
    if not sections:
        markdown += "No runs yet: `xbench run` writes one.\n"
    if problems:
        markdown += ("\n## Skipped runs (records not readable)\n\n"
                     + "".join(f"- {problem}\n" for problem in problems))
    if skipped is not None:
        skipped.extend(problems)
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    csv = frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")
    return markdown.rstrip("\n") + "\n", csv


def write(results: Path, skipped: list[str] | None = None) -> list[Path]:
    """Write LEADERBOARD.md and leaderboard.csv; unreadable runs go to ``skipped``."""
    markdown, csv = render(results, skipped)
    md_path, csv_path = results / LEADERBOARD_MD, results / LEADERBOARD_CSV
    md_path.write_text(markdown, encoding="utf-8")
    csv_path.write_text(csv, encoding="utf-8")
    return [md_path, csv_path]


def check(results: Path) -> list[str]:
    """What is wrong with the committed leaderboard: the message of each run whose records
    cannot be read (file and line), then the path of each leaderboard file that differs from
    what the records regenerate."""
    skipped: list[str] = []
    markdown, csv = render(results, skipped)
    stale = list(skipped)
    for name, expected in ((LEADERBOARD_MD, markdown), (LEADERBOARD_CSV, csv)):
        path = results / name
        if not path.exists() or path.read_text(encoding="utf-8") != expected:
            stale.append(str(path))
    return stale
