"""A leaderboard at full ILSVRC2012-val scale (issue 22): regeneration and ``--check`` of a
synthetic run of 50,000 images x 10 explainers x the paper metrics, under 60 s and 2 GB.

Run: ``python -m pytest benchmarks/bench_scale.py --benchmark-enable -s`` (set
``XBENCH_SCALE_IMAGES`` for another size; tests/test_view.py runs the same machinery on 2,000).

The run is deterministic and written as a real run folder through :mod:`xbench.records`
(``RunFolder.write_header`` and ``append_raw_unit``, one unit per batch x explainer, every line
a valid ``ResultRow``): per image one confidence row and, per explainer, Average Drop and
Average Increase at three retentions, insertion and deletion with their 225-point curves (the
paper's 224 steps), insertion-deletion, and the forward/backward passes and time rows: 12
rows per image and explainer, 6.05 million rows, about 6 GB of ``rows.jsonl``. The rows are
formatted from templates (a pool of curves picked by image and explainer) so that writing
them takes minutes, not the hours a real run would.

Each measurement runs ``xbench leaderboard`` in a fresh process and reads that process's peak
resident memory, ``VmHWM`` of ``/proc/self/status`` (the whole process: interpreter, imports,
pyarrow's buffers; tracemalloc would miss memory allocated by Arrow, and ``ru_maxrss`` would
carry over the peak of the process that started it, which Linux keeps across exec):

- cold: no view cache yet (the records are read once from ``rows.jsonl``, the Parquet cache
  written), as after a run finishes;
- warm: the cache matches the records (what every later regeneration sees);
- check: ``xbench leaderboard --check`` with the cache warm;
- check cold: ``--check`` with no cache, as CI runs it on a fresh checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xbench.records import ResultRow, RunFolder, RunHeader, SCHEMA_VERSION
from xbench.view import VIEW_FOLDER

IMAGES = int(os.environ.get("XBENCH_SCALE_IMAGES", "50000"))
EXPLAINERS = 10
BATCH = 500
CURVE_POINTS = 225  # 224 insertion/deletion steps of 224 pixels at 224 x 224 (the paper)
BUDGET_S = 60.0
BUDGET_BYTES = 2 * 1024**3
RETENTIONS = ("r=100%", "r=50%", "r=15%")
#: (metric, variant, direction, has curve) of every explainer row of an image
METRICS = ([("average-drop", r, "lower", False) for r in RETENTIONS]
           + [("average-increase", r, "higher", False) for r in RETENTIONS]
           + [("insertion", "step=224", "higher", True), ("deletion", "step=224", "lower", True),
              ("insertion-deletion", "step=224", "higher", False),
              ("forward-passes", "", "lower", False), ("backward-passes", "", "lower", False),
              ("time", "", "lower", False)])
FAMILIES = {"average-drop": "faithfulness", "average-increase": "faithfulness",
            "insertion": "faithfulness", "deletion": "faithfulness",
            "insertion-deletion": "faithfulness", "forward-passes": "cost",
            "backward-passes": "cost", "time": "cost"}
_IMAGE, _INDEX, _VALUE, _CURVE = "@IMAGE@", -111111111, -222222.5, [-333333.5]


def _template(run: str, explainer: str, metric: str, variant: str, direction: str,
              curve: bool) -> str:
    """A row's JSON line (``ResultRow.to_json``) with ``{image}``, ``{index}``, ``{value}``
    and ``{curve}`` left to fill."""
    row = ResultRow(run=run, image=_IMAGE, index=_INDEX, label=1, predicted=1, target=1,
                    explainer=explainer, explainer_variant="", layer="-" if explainer else "",
                    metric=metric, variant=variant, direction=direction, value=_VALUE,
                    protocol="2", profile="paper", target_rule="predicted",
                    model="synthetic", dataset_hash="0" * 16, device="cpu", dtype="fp32",
                    engine="eager", batch_size=BATCH, versions="xbench=synthetic",
                    curve=tuple(_CURVE) if curve else None)
    text = row.to_json().replace("{", "{{").replace("}", "}}")
    text = text.replace(f'"{_IMAGE}"', '"{image}"').replace(str(_INDEX), "{index}")
    text = text.replace(repr(_VALUE), "{value}")
    return text.replace(json.dumps(_CURVE), "{curve}") + "\n"


def write_synthetic_run(root: Path, images: int = IMAGES, explainers: int = EXPLAINERS,
                        seed: int = 0) -> RunFolder:
    """Write the deterministic synthetic run ``root/synthetic`` and return its folder."""
    folder = RunFolder(root / "synthetic")
    folder.path.mkdir(parents=True, exist_ok=True)
    names = [f"explainer{e:02d}" for e in range(explainers)]
    header = RunHeader(
        schema_version=SCHEMA_VERSION, run_name="synthetic", xbench_version="synthetic",
        protocol="2", profile="paper",
        config={"seed": 0, "target_rule": "predicted", "dtype": "fp32", "batch_size": BATCH,
                "explainers": names, "metrics": sorted(FAMILIES),
                "metric_families": FAMILIES},
        model={"name": "synthetic", "input_size": 224, "default_layer": "-"},
        dataset={"name": "synthetic", "layout": "synthetic", "images": images,
                 "subset_hash": "0" * 16},
        environment={"device": "cpu", "threads": 1, "packages": {}},
        plugins={}, units_total=-(-images // BATCH) * (explainers + 1))
    folder.write_header(header)
    rng = np.random.default_rng(seed)
    pool = [json.dumps([round(float(v), 6) for v in np.sort(rng.random(CURVE_POINTS))[::-1]])
            for _ in range(256)]
    confidence = _template("synthetic", "", "confidence", "", "higher", False)
    templates = {name: [_template("synthetic", name, *spec) for spec in METRICS] for name in names}
    for start in range(0, images, BATCH):
        stop = min(images, start + BATCH)
        ids = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(start, stop)]
        probs = rng.random(stop - start)
        folder.append_raw_unit(f"batch{start // BATCH:06d}:", "".join(
            confidence.format(image=image, index=start + i, value=repr(float(p)), curve="null")
            for i, (image, p) in enumerate(zip(ids, probs))).encode("utf-8"))
        for e, name in enumerate(names):
            values = rng.random((stop - start, len(METRICS))) * (1.0 + e / explainers)
            lines = []
            for i, image in enumerate(ids):
                for m, template in enumerate(templates[name]):
                    curve = pool[((start + i) * 31 + e * 7 + m) % len(pool)] if METRICS[m][3] else "null"
                    lines.append(template.format(image=image, index=start + i,
                                                 value=repr(float(values[i, m])), curve=curve))
            folder.append_raw_unit(f"batch{start // BATCH:06d}:{name}:-",
                                   "".join(lines).encode("utf-8"))
    return folder


_MEASURE = """
import resource, sys, time
from pathlib import Path
from xbench import leaderboard
start = time.perf_counter()
if sys.argv[2] == "check":
    problems = leaderboard.check(Path(sys.argv[1]))
    assert problems == [], problems
else:
    leaderboard.write(Path(sys.argv[1]))
seconds = time.perf_counter() - start
# VmHWM: this process image's own peak; ru_maxrss would keep the peak of the process that
# spawned it (Linux carries it across exec), e.g. a test session's gigabytes
hwm = [line for line in Path("/proc/self/status").read_text().splitlines()
       if line.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(seconds, peak)
"""


def measure(results: Path, mode: str) -> tuple[float, int]:
    """(seconds, peak resident bytes) of a leaderboard ``mode`` ("write" or "check") of
    ``results`` in a fresh process (imports not timed; the peak includes them)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(results), mode],
                         capture_output=True, text=True, check=True)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), int(peak)


def drop_views(results: Path) -> None:
    for cache in results.glob(f"*/{VIEW_FOLDER}"):
        shutil.rmtree(cache)


def regenerate_and_check(results: Path) -> dict[str, tuple[float, int]]:
    """{"cold", "warm", "check", "check cold": (seconds, peak bytes)} on ``results``; "check
    cold" is CI's case, a fresh checkout with no view cache."""
    drop_views(results)
    timings = {"cold": measure(results, "write"), "warm": measure(results, "write"),
               "check": measure(results, "check")}
    drop_views(results)
    timings["check cold"] = measure(results, "check")
    return timings


@pytest.fixture(scope="module")
def full_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    start = time.perf_counter()
    write_synthetic_run(root, IMAGES)
    print(f"\nsynthetic run of {IMAGES} images written in {time.perf_counter() - start:.0f} s "
          f"({(root / 'synthetic' / 'rows.jsonl').stat().st_size / 1e9:.2f} GB of rows)")
    return root


def test_full_val_leaderboard_fits_the_budget(benchmark, full_val):
    results = benchmark.pedantic(regenerate_and_check, args=(full_val,), rounds=1, iterations=1)
    load = os.getloadavg()
    for name, (seconds, peak) in results.items():
        print(f"{name}: {seconds:.1f} s, peak {peak / 2**20:.0f} MiB (load {load[0]:.1f})")
        benchmark.extra_info[name] = {"seconds": seconds, "peak_bytes": peak}
    benchmark.extra_info["load"] = load
    for name, (seconds, peak) in results.items():
        assert seconds < BUDGET_S, f"{name}: {seconds:.1f} s"
        assert peak < BUDGET_BYTES, f"{name}: {peak / 2**20:.0f} MiB"
