"""Views derived from run records: pandas frames, the matrix, LEADERBOARD.md and its CSV.

Nothing here is stored state: every view is recomputed from ``rows.jsonl`` and ``run.json``,
deterministically (seeded bootstrap, sorted keys), so the committed leaderboard can be checked
byte for byte against the committed records (``xbench leaderboard --check``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from xbench import gates
from xbench.errors import UserError
from xbench.records import ResultRow, RunFolder, RunHeader, find_runs
from xbench.stats import bootstrap_ci, significantly_different

LEADERBOARD_MD = "LEADERBOARD.md"
LEADERBOARD_CSV = "leaderboard.csv"
ARROWS = {"lower": "↓", "higher": "↑"}


def rows_frame(rows: list[ResultRow]) -> pd.DataFrame:
    """One line per ResultRow (curves left out), with the matrix column name added."""
    fields = [f.name for f in dataclasses.fields(ResultRow) if f.name != "curve"]
    frame = pd.DataFrame([{name: getattr(r, name) for name in fields} for r in rows],
                         columns=fields)
    frame["column"] = [r.column for r in rows]
    return frame


def run_frame(folder: RunFolder) -> pd.DataFrame:
    return rows_frame(list(folder.rows()))


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
    out = []
    for column, cell in scored.groupby("column", sort=False):
        values = cell.value.to_numpy(dtype=np.float64)
        low, high = bootstrap_ci(values, seed=seed)
        out.append({"column": column, "direction": cell.direction.iloc[0],
                    "mean": float(values.mean()), "ci_low": low, "ci_high": high,
                    "images": int(values.size)})
    return pd.DataFrame(out, columns=["column", "direction", "mean", "ci_low", "ci_high", "images"])


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed rows, one per (image, explainer, metric, error)."""
    failed = frame[frame.status != "ok"]
    return failed[["image", "explainer", "layer", "metric", "error"]].drop_duplicates()


def matrix(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The explainer x metric matrix: one line per (explainer, layer, column).

    mean over images with a seeded 95% bootstrap interval; ``best`` marks the best explainer
    of each (layer-agnostic) column, ``tied_with_best`` those whose paired bootstrap
    difference from the best includes 0 (the same images, docs/protocol.md "Aggregation").
    """
    scored = frame[(frame.explainer != "") & (frame.status == "ok") & frame.value.notna()]
    # columns keep the order the metrics produced them in (retention 100%, 50%, 15%, ...)
    first_seen = {column: i for i, column in enumerate(dict.fromkeys(scored.column))}
    # layers keep the runner's order (forward order), not the alphabet (_blocks.10 < _blocks.2)
    layer_seen = {layer: i for i, layer in enumerate(dict.fromkeys(scored.layer))}
    out = []
    for (explainer, layer, column), cell in scored.groupby(["explainer", "layer", "column"],
                                                          sort=True):
        values = cell.value.to_numpy(dtype=np.float64)
        low, high = bootstrap_ci(values, seed=seed)
        out.append({
            "explainer": explainer, "layer": layer, "column": column,
            "metric": cell.metric.iloc[0], "variant": cell.variant.iloc[0],
            "direction": cell.direction.iloc[0], "mean": float(values.mean()),
            "ci_low": low, "ci_high": high, "median": float(np.median(values)),
            "q1": float(np.quantile(values, 0.25)), "q3": float(np.quantile(values, 0.75)),
            "images": int(values.size), "degenerate": int(cell.degenerate.sum()),
            "order": first_seen[column], "layer_order": layer_seen[layer],
        })
    result = pd.DataFrame(out, columns=["explainer", "layer", "column", "metric", "variant",
                                        "direction", "mean", "ci_low", "ci_high", "median", "q1",
                                        "q3", "images", "degenerate", "order",
                                        "layer_order"])
    result["best"] = False
    result["tied_with_best"] = False
    for column, group in result.groupby("column", sort=True):
        if group.direction.iloc[0] not in ARROWS:
            continue  # an explainer's diagnostic (e.g. skipped channels): nothing is better
        lower = group.direction.iloc[0] == "lower"
        best_index = group["mean"].idxmin() if lower else group["mean"].idxmax()
        result.loc[best_index, "best"] = True
        best = result.loc[best_index]
        best_values = _per_image(scored, best.explainer, best.layer, column)
        for index, line in group.iterrows():
            if index == best_index:
                continue
            values = _per_image(scored, line.explainer, line.layer, column)
            common = best_values.index.intersection(values.index)
            if len(common) >= 2:
                result.loc[index, "tied_with_best"] = not significantly_different(
                    values.loc[common].to_numpy(), best_values.loc[common].to_numpy(), seed=seed)
    return result


def _per_image(scored: pd.DataFrame, explainer: str, layer: str, column: str) -> pd.Series:
    cell = scored[(scored.explainer == explainer) & (scored.layer == layer)
                  & (scored.column == column)]
    return cell.set_index("image").value.sort_index()


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
    """Matrix columns in the order the metrics produced them."""
    firsts = matrix_frame.groupby("column", sort=False)["order"].min()
    return sorted(firsts.index, key=lambda column: firsts[column])


def explainer_layers(matrix_frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(explainer, layer) pairs of the matrix: explainers by name, layers in forward order."""
    pairs = matrix_frame.drop_duplicates(["explainer", "layer"])
    pairs = pairs.sort_values(["explainer", "layer_order"], kind="stable")
    return list(zip(pairs.explainer, pairs.layer))


def wide_table(matrix_frame: pd.DataFrame, markdown: bool = True) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the matrix as text: one row per explainer (and layer)."""
    columns = column_order(matrix_frame)
    layers = sorted(set(matrix_frame.layer))
    show_layer = len([layer for layer in layers if layer != "-"]) > 1
    head = ["explainer"] + (["layer"] if show_layer else [])
    directions = matrix_frame.drop_duplicates("column").set_index("column").direction
    head += [f"{c} {ARROWS.get(directions[c], '')}".strip() for c in columns]
    body = []
    for explainer, layer in explainer_layers(matrix_frame):
        group = matrix_frame[(matrix_frame.explainer == explainer) & (matrix_frame.layer == layer)]
        cells = group.set_index("column")
        line = [explainer] + ([layer] if show_layer else [])
        line += [cell_text(cells.loc[c], markdown) + cells.loc[c].get("gate", "")
                 if c in cells.index else "" for c in columns]
        body.append(line)
    return head, body


def _markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def run_section(folder: RunFolder) -> tuple[str, pd.DataFrame]:
    """Markdown section and matrix frame of one run."""
    header = folder.header()
    frame = run_frame(folder)
    table = gates.mark_matrix(frame, matrix(frame, seed=header.config.get("seed", 0)),
                              seed=header.config.get("seed", 0))
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
    if not table.empty:
        head, body = wide_table(table)
        lines += [_markdown_table(head, body), ""]
        lines += [gates.LEGEND, ""] if table.gate.astype(bool).any() else []
    model = model_scores(frame, seed=header.config.get("seed", 0))
    if not model.empty:
        lines += ["Model-scope metrics (scored once per image, no explainer):", ""]
        body = [[f"{line.column} {ARROWS.get(line.direction, '')}".strip(),
                 f"{format_number(line['mean'])} [{format_number(line.ci_low)}, "
                 f"{format_number(line.ci_high)}]", str(line.images)]
                for _, line in model.iterrows()]
        lines += [_markdown_table(["metric", "mean [95% CI]", "images"], body), ""]
    return "\n".join(lines), table


def _layers(header: RunHeader) -> str:
    layers = header.config.get("layers")
    return layers if layers not in (None, "", "last") else header.model.get("default_layer", "")


LEGEND = (
    "Cells: mean over images [95% bootstrap interval]; time: median seconds per image (IQR). "
    "↓ lower is better, ↑ higher is better. **bold**: best in the column; ≈: not significantly "
    "different from the best (paired bootstrap over the same images, 95%). Regenerate with "
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
