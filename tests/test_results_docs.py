"""The tables of docs/results.md that a command prints are what that command prints now: a
``<!-- controls: results/RUN -->`` marker is followed by ``xbench analyze results/RUN
--controls``'s output, verbatim (so no number in the docs outlives the code that made it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xbench.analyze import controls_text
from xbench.records import RunFolder

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- controls: (results/[\w.-]+) -->\n")


def _marked() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "results.md").read_text()
    out = []
    for match in MARKER.finditer(text):
        rest = text[match.end():]
        end = rest.find("\n\n", rest.find("\n\n") + 2)  # the table, a blank line, the legend
        out.append((match.group(1), rest[:end + 1] if end >= 0 else rest))
    return out


def test_results_page_holds_a_controls_table():
    assert _marked(), "docs/results.md: no <!-- controls: results/RUN --> table"


@pytest.mark.parametrize("run, table", _marked() or [("", "")])
def test_controls_table_is_what_the_command_prints(run, table):
    folder = ROOT / run
    if not run or not (folder / "run.json").exists():
        pytest.skip(f"{run} not present")
    assert table == controls_text(RunFolder(folder))
