"""The run's matrix on the console: one line per metric column grouped by metric family, one
column per explainer, as many tables as the width needs (cells are never folded).

Made to be read piped into a file as well as in a terminal: the best cell of a line carries
``*`` (bold too, where the console has styles), a tie with the best ``≈``; the title is printed
on lines of its own (a table title would be folded inside the run name); each line has one
number format; the explainers with degenerate (constant) maps are named under the tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from xbench import leaderboard, view

BEST_MARK = "*"
TIED_MARK = "≈"
LAST_FAMILIES = ("cost", "model", "diagnostics")
#: family order of the lines, the leaderboard's: what the maps do first, what they cost last
FAMILY_ORDER = tuple(family for family in view.FAMILY_ORDER if family not in LAST_FAMILIES)
LEGEND = (f"{BEST_MARK} best of the line; {TIED_MARK} tied with the best (paired bootstrap); "
          "time is the median, the others the mean over images; 95% intervals in "
          "LEADERBOARD.md")


def family_rank(family: str) -> tuple[int, str]:
    if family in FAMILY_ORDER:
        return (FAMILY_ORDER.index(family), "")
    if family in LAST_FAMILIES:
        return (len(FAMILY_ORDER) + 1 + LAST_FAMILIES.index(family), "")
    return (len(FAMILY_ORDER), family)


def metric_families(table: pd.DataFrame, registry: Any = None) -> dict[str, str]:
    """{column: family}: the frame's ``family`` column when it has one, else each metric's
    ``metric_family()`` from the registry; a line with no direction is a diagnostic, and a
    metric that is not installed any more is 'other'."""
    out: dict[str, str] = {}
    for _, line in table.drop_duplicates("column").iterrows():
        if line.direction not in leaderboard.ARROWS:
            out[line.column] = "diagnostics"
        elif "family" in table.columns and isinstance(line.get("family"), str) and line.family:
            out[line.column] = line.family
        else:
            if registry is None:
                from xbench.plugins import build_registry

                registry = build_registry()
            installed = registry.entries.get("metric", {})
            out[line.column] = (installed[line.metric].cls.metric_family()
                                if line.metric in installed else "other")
    return out


def number_format(values: Iterable[float]) -> Callable[[float], str]:
    """One format for every number of a line: integers when all are whole, else fixed
    decimals giving the largest magnitude three significant digits (one decimal from 100)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if finite and all(v.is_integer() for v in finite):
        decimals = 0
    else:
        top = max((abs(v) for v in finite), default=0.0)
        if top >= 100:
            decimals = 1
        elif top >= 1:
            decimals = 2
        elif top == 0:
            decimals = 1
        else:
            decimals = min(6, 2 - math.floor(math.log10(top)))

    def text(value: float) -> str:
        return f"{value:.{decimals}f}" if value is not None and math.isfinite(value) else "–"

    return text


def cell_value(line: pd.Series) -> float:
    """The number a cell shows: the median for time (a few slow images skew its mean), else
    the mean (as LEADERBOARD.md)."""
    return float(line["median"] if line.metric == "time" else line["mean"])


def line_cells(cells: pd.DataFrame) -> dict[tuple[str, str], tuple[str, str]]:
    """{(explainer, layer): (number, mark)} of one matrix column, in one number format; the
    mark is BEST_MARK, TIED_MARK or ''."""
    fmt = number_format(cell_value(line) for _, line in cells.iterrows())
    return {(line.explainer, line.layer): (fmt(cell_value(line)),
                                          BEST_MARK if line.best
                                          else TIED_MARK if line.tied_with_best else "")
            for _, line in cells.iterrows()}


def degenerate_note(table: pd.DataFrame) -> str:
    """The explainers with degenerate (constant) maps and on how many images, or 'none'."""
    scored = table[table.direction.isin(list(leaderboard.ARROWS))]
    show_layer = len({layer for layer in scored.layer if layer not in ("", "-")}) > 1
    parts = []
    for explainer, layer in leaderboard.explainer_layers(scored):
        cells = scored[(scored.explainer == explainer) & (scored.layer == layer)]
        count = int(cells.degenerate.max()) if len(cells) else 0
        if count:
            where = f"{explainer} @{layer}" if show_layer and layer not in ("", "-") else explainer
            parts.append(f"{where} {count} of {int(cells.images.max())} images")
    return ("degenerate (constant) maps, scored as all-zero maps: "
            + ("; ".join(parts) if parts else "none"))


def print_matrix(console: Console, folder, table: pd.DataFrame, registry: Any = None,
                 families: Mapping[str, str] | None = None) -> None:
    """Print the run's header, model-scope scores and the matrix ``table``
    (:func:`xbench.leaderboard.matrix`) on ``console``."""
    header = folder.header()
    frame = leaderboard.run_frame(folder)
    accuracy, labelled = leaderboard.top1_accuracy(frame)
    engine = header.environment.get("engine", {}).get("name", "eager")
    console.print(Text(header.run_name, style="bold"), soft_wrap=True)
    console.print(f"protocol v{header.protocol}, profile {header.profile}, engine {engine}, "
                  f"top-1 {leaderboard.format_number(accuracy)} ({labelled} labelled)",
                  highlight=False)
    model = leaderboard.model_scores(frame, seed=header.config.get("seed", 0))
    for _, line in model.iterrows():
        fmt = number_format([line["mean"], line.ci_low, line.ci_high])
        console.print(f"model-scope {line.column}: {fmt(line['mean'])} [{fmt(line.ci_low)}, "
                      f"{fmt(line.ci_high)}] over {line.images} images", highlight=False,
                      markup=False, soft_wrap=True)
    if table.empty:
        console.print("no explainer scores", highlight=False)
        return
    explainers = leaderboard.explainer_layers(table)
    show_layer = len({layer for _, layer in explainers if layer != "-"}) > 1
    families = dict(families or metric_families(table, registry))
    order = {column: index for index, column in enumerate(leaderboard.column_order(table))}
    columns = sorted(order, key=lambda column: (family_rank(families[column]), order[column]))
    directions = table.drop_duplicates("column").set_index("column").direction
    labels = {column: f"  {column} {leaderboard.ARROWS.get(directions[column], '')}".rstrip()
              for column in columns}
    styled = console.is_terminal and not console.no_color
    headers = [f"{explainer}\n{layer}" if show_layer else explainer
               for explainer, layer in explainers]
    cells: dict[tuple[str, str, str], tuple[str, str]] = {}
    for column in columns:
        for key, cell in line_cells(table[table.column == column]).items():
            cells[(column, *key)] = cell
    # numbers right-aligned by hand and the column left-justified: rich strips the trailing
    # blank a cell without a mark needs to keep its digits under the others'
    texts: dict[tuple[str, str, str], Text] = {}
    for index, (explainer, layer) in enumerate(explainers):
        own = {key[0]: cell for key, cell in cells.items() if key[1:] == (explainer, layer)}
        digits = max((len(number) for number, _ in own.values()), default=0)
        room = max(max(map(len, headers[index].split("\n"))), digits + 2)
        for column, (number, mark) in own.items():
            text = f"{number.rjust(digits)} {mark or ' '}".rjust(room)
            texts[(column, explainer, layer)] = Text(
                text, style="bold" if styled and mark == BEST_MARK else "")

    def width(index: int) -> int:
        explainer, layer = explainers[index]
        content = [len(part) for part in headers[index].split("\n")]
        content += [len(texts[(column, explainer, layer)]) for column in columns
                    if (column, explainer, layer) in texts]
        return max(content) + 3  # padding and the border

    label_width = max(len("metric"), *(len(label) for label in labels.values()),
                      *(len(family) for family in families.values()))
    room = max(console.width - label_width - 4, 1)
    groups: list[list[int]] = [[]]
    for index in range(len(explainers)):
        if groups[-1] and sum(map(width, groups[-1])) + width(index) > room:
            groups.append([])
        groups[-1].append(index)
    for group in groups:
        rich_table = Table()
        rich_table.add_column("metric", no_wrap=True)
        for index in group:
            rich_table.add_column(headers[index], no_wrap=True)
        current = None
        for column in columns:
            if families[column] != current:
                if current is not None:
                    rich_table.add_section()
                current = families[column]
                rich_table.add_row(Text(current, style="bold" if styled else ""),
                                   *("" for _ in group))
            rich_table.add_row(labels[column], *(texts.get((column, *explainers[index]), "")
                                                 for index in group))
        console.print(rich_table)
    # folded at spaces only (rich never breaks inside a word, so names stay whole)
    console.print(LEGEND, highlight=False, markup=False)
    console.print(degenerate_note(table), highlight=False, markup=False)
