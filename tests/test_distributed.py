"""A run sharded over 2 gloo processes by torchrun equals the single-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = ["run", "--explainers", "gradcam", "--metrics", "average-drop,forward-passes",
       "--limit", "4", "--batch-size", "1", "--name", "r", "--no-leaderboard"]
# torchrun gives every process one thread; a single process must use the same count for its
# floating-point reductions to match bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "r" / "rows.jsonl").read_text().splitlines()]


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                             "2", "--master-port", str(29500 + os.getpid() % 1000), "-m",
                             "xbench", *RUN, "--output", str(out), *extra],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "-m", "xbench", *RUN, "--output", str(out)], env=ENV,
                   check=True, capture_output=True)
    return _rows(out)


def test_two_ranks_merge_to_the_single_process_rows(tmp_path, single):
    process = _torchrun(tmp_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    header = json.loads((tmp_path / "r" / "run.json").read_text())
    assert header["world_size"] == 2
    shards = sorted(p.name for p in (tmp_path / "r" / "shards").iterdir())
    assert shards == ["rank000", "rank001"]
    assert _rows(tmp_path) == single


def test_a_killed_rank_resumes_to_identical_rows(tmp_path, single):
    process = _torchrun(tmp_path)
    progress = tmp_path / "r" / "shards" / "rank001" / "progress.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    # kill -9 every worker of the group (torchrun would tear the rest down anyway)
    workers = subprocess.run(["pgrep", "-f", f"xbench .*--output {tmp_path}"], capture_output=True,
                             text=True).stdout.split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    process.communicate(timeout=120)
    finished = sum((tmp_path / "r" / "shards" / rank / "progress.jsonl").read_text().count("\n")
                   for rank in ("rank000", "rank001")
                   if (tmp_path / "r" / "shards" / rank / "progress.jsonl").exists())
    assert 2 <= finished < 8  # killed mid-run: 4 batches x (data + gradcam) units in all
    resumed = _torchrun(tmp_path, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    rows = _rows(tmp_path)
    assert rows == single
    keys = [(r["image"], r["explainer"], r["metric"], r["variant"]) for r in rows]
    assert len(keys) == len(set(keys))  # no duplicates
