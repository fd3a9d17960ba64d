"""Before/after table of two run folders: mean AD/AI at each retention, insertion, deletion
and the number of degenerate maps, per explainer (used to document a protocol change).

    python benchmarks/compare_runs.py BEFORE_RUN AFTER_RUN [--explainers a,b,c]

BEFORE_RUN may also be ``git:REV:results/NAME`` to read a committed run from history.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess

import pandas as pd

COLUMNS = [("average-drop", "r=100%", "AD100"), ("average-drop", "r=50%", "AD50"),
           ("average-drop", "r=15%", "AD15"), ("average-increase", "r=100%", "AI100"),
           ("average-increase", "r=50%", "AI50"), ("average-increase", "r=15%", "AI15"),
           ("insertion", None, "ins"), ("deletion", None, "del")]


def read_rows(source: str) -> pd.DataFrame:
    if source.startswith("git:"):
        _, rev, path = source.split(":", 2)
        text = subprocess.run(["git", "show", f"{rev}:{path}/rows.jsonl"], check=True,
                              capture_output=True, text=True).stdout
    else:
        with open(f"{source}/rows.jsonl") as handle:
            text = handle.read()
    return pd.DataFrame([json.loads(line) for line in io.StringIO(text) if line.strip()])


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows[(rows.status == "ok") & (rows.explainer != "")]
    table = {}
    for metric, variant, label in COLUMNS:
        picked = rows[rows.metric == metric]
        if variant is not None:
            picked = picked[picked.variant == variant]
        table[label] = picked.groupby("explainer").value.mean()
    faithful = rows[rows.metric == "average-drop"]
    table["degenerate"] = faithful[faithful.degenerate].groupby("explainer").image.nunique()
    out = pd.DataFrame(table)
    out["degenerate"] = out["degenerate"].fillna(0).astype(int)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--explainers", default="")
    args = parser.parse_args()
    before, after = summary(read_rows(args.before)), summary(read_rows(args.after))
    names = args.explainers.split(",") if args.explainers else sorted(set(before.index) | set(after.index))
    labels = [label for *_, label in COLUMNS] + ["degenerate"]
    print("| explainer | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name in names:
        cells = []
        for label in labels:
            old = before[label].get(name) if label in before else None
            new = after[label].get(name) if label in after else None
            fmt = (lambda v: "–" if v is None or pd.isna(v) else
                   (f"{v:d}" if label == "degenerate" else
                    f"{v:.3f}" if label in ("ins", "del") else f"{v:.1f}"))
            cells.append(f"{fmt(old)} → {fmt(new)}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
