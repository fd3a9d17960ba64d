"""Docs that run: every ```bash and ```python block of README.md, CONTRIBUTING.md and docs/*.md
is executed here, or is preceded by a marker that says it is not run and why:

    <!-- not run: REASON -->

(the last non-blank line before the opening fence). The conventions, including how shell
blocks are made cheap, are documented in CONTRIBUTING.md, "Docs that run".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
RUN_LANGUAGES = ("bash", "python")
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
#: the cheap stand-ins for an `xbench run` in a docs block (documented in CONTRIBUTING.md)
CHEAP_EXPLAINERS = "gradcam,layercam"
CHEAP_METRICS = "average-drop,forward-passes"
CHEAP_LIMIT = "2"
BLOCK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the marker's reason

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the not-run marker before each, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{index + 1}: unclosed code fence")
        previous = next((lines[j].strip() for j in range(index - 1, -1, -1) if lines[j].strip()),
                        "")
        marker = NOT_RUN.match(previous)
        found.append(Block(page, index + 1, opening["language"], "\n".join(lines[index + 1:end]),
                           marker["reason"] if marker else None))
        index = end + 1
    return found


def cheap(script: str) -> str:
    """Shell ``script`` with every ``xbench run`` made cheap: ``--explainers all`` narrowed,
    and ``--limit``, ``--metrics`` and ``--no-maps`` added where the command sets none."""
    joined = re.sub(r"\s*\\\n\s*", " ", script)
    out = []
    for line in joined.splitlines():
        command, hash_, comment = line.partition(" #")
        words = shlex.split(command, comments=True) if command.strip() else []
        if "xbench" in words and words[words.index("xbench") + 1:][:1] == ["run"]:
            command = command.replace("--explainers all", f"--explainers {CHEAP_EXPLAINERS}")
            extra = [flag for flag, value in (("--limit", CHEAP_LIMIT),
                                              ("--metrics", CHEAP_METRICS),
                                              ("--no-maps", None))
                     if flag not in words for flag in [flag if value is None
                                                       else f"{flag} {value}"]]
            command = command.rstrip() + "".join(f" {flag}" for flag in extra)
        out.append(command + (hash_ + comment if hash_ else ""))
    return "\n".join(out)


def test_cheap_narrows_xbench_run_and_leaves_other_commands_alone():
    assert cheap("xbench run --explainers all") == (
        f"xbench run --explainers {CHEAP_EXPLAINERS} --limit {CHEAP_LIMIT} "
        f"--metrics {CHEAP_METRICS} --no-maps")
    assert cheap("xbench run --limit 9 \\\n   --metrics time --no-maps  # note").split() == (
        "xbench run --limit 9 --metrics time --no-maps # note".split())
    assert cheap("xbench explain photo.jpg -o x.png") == "xbench explain photo.jpg -o x.png"


def test_blocks_and_markers_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n"
                    "```python\nprint(1)\n```\n```text\nout\n```\n<!-- not run: -->\n```bash\nx\n```\n")
    found = blocks(page)
    assert [(b.line, b.language, b.not_run) for b in found] == [
        (4, "bash", "needs a GPU"), (7, "python", None), (10, "text", None), (14, "bash", None)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh folder holding photo.jpg and a copy of the committed results/."""
    from PIL import Image

    from xbench.data import sample_images

    chelsea = next(path for name, path, _ in sample_images() if name == "chelsea.png")
    Image.open(chelsea).convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    shutil.copytree(ROOT / "results", tmp_path / "results")
    return tmp_path


def _run(argv: list[str], cwd: Path, where: str, code: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"{where}: the documented block failed (exit {done.returncode}):\n{code}\n"
                    f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_block_runs_or_says_why_not(page: Path, workdir: Path):
    page_blocks = [b for b in blocks(page) if b.language in RUN_LANGUAGES]
    runnable = [b for b in page_blocks if b.not_run is None]
    python = [b for b in runnable if b.language == "python"]
    for block in runnable:
        if block.language == "bash":
            _run(["bash", "-e", "-c", cheap(block.code)], workdir, block.where(), block.code)
    if python:
        # one interpreter per page, blocks in order: a block may use an earlier block's names
        script = "\n".join(f"# {b.where()}\n{textwrap.dedent(b.code)}\n" for b in python)
        (workdir / "page_blocks.py").write_text(script)
        _run([sys.executable, "page_blocks.py"], workdir,
             ", ".join(b.where() for b in python), script)
    if not page_blocks:
        pytest.skip(f"{page.relative_to(ROOT)} has no bash or python blocks")
