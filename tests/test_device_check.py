"""benchmarks/device_check.{sh,py} on CPU: row comparison with tolerances, the timing check,
the table, and the whole script in its CPU dry mode."""

from __future__ import annotations

import importlib.util
import sys
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from xbench.distributed import backend_and_gpu
from xbench.errors import UserError
from xbench.timing import Stopwatch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dc = _load()


def _row(image="a", explainer="gradcam", layer="head", metric="insertion", value=0.5,
         target=3, status="ok", **extra) -> dict:
    return dict(image=image, explainer=explainer, layer=layer, metric=metric, variant="",
                value=value, target=target, status=status, error="", run="r", curve=None,
                predicted=target, **extra)


def _rows(values: dict[tuple[str, str], float]) -> list[dict]:
    return [_row(image=image, metric=metric, value=value)
            for (image, metric), value in values.items()]


REFERENCE = {("a", "insertion"): 0.60, ("b", "insertion"): 0.40,
             ("a", "average-drop"): 30.0, ("b", "average-drop"): 50.0,
             ("a", "forward-passes"): 129.0, ("b", "forward-passes"): 129.0}


def test_agreeing_rows_pass_in_every_dtype():
    nudged = {key: value + (1e-7 if "passes" not in key[1] else 0)
              for key, value in REFERENCE.items()}
    for dtype in ("fp32", "bf16", "fp16"):
        assert dc.compare_rows(_rows(REFERENCE), _rows(nudged), dtype) == []


def test_fp32_checks_every_image_and_names_the_cell():
    run = dict(REFERENCE)
    run[("b", "insertion")] += 2e-3  # > 1e-3 on one image
    problems = dc.compare_rows(_rows(REFERENCE), _rows(run), "fp32")
    assert len(problems) == 1
    assert problems[0].startswith("gradcam/head/insertion on b: 0.402")
    assert "> 0.001, fp32" in problems[0]


def test_bf16_checks_means_over_images():
    # +/-0.03 on the two images cancels in the mean: within the bf16 bound
    run = dict(REFERENCE)
    run[("a", "insertion")] += 0.03
    run[("b", "insertion")] -= 0.03
    assert dc.compare_rows(_rows(REFERENCE), _rows(run), "bf16") == []
    run[("b", "average-drop")] += 5.0  # mean AD moves 2.5 pp > 2.0
    problems = dc.compare_rows(_rows(REFERENCE), _rows(run), "bf16")
    assert problems == ["gradcam/head/average-drop: mean 42.5 over 2 images, reference 40 "
                        "(|diff| 2.5 > 2, bf16)"]
    assert dc.compare_rows(_rows(REFERENCE), _rows(run), "fp16") != []


def test_pass_counts_must_be_equal_in_every_dtype():
    run = dict(REFERENCE)
    run[("a", "forward-passes")] = 130.0
    problems = dc.compare_rows(_rows(REFERENCE), _rows(run), "bf16")
    assert len(problems) == 1 and "forward-passes on a" in problems[0]


def test_failed_missing_and_retargeted_rows_are_problems():
    run = _rows(REFERENCE)[1:]  # ("a", "insertion") missing
    run[0] = _row(image="b", metric="insertion", value=None, status="failed")
    run[0]["error"] = "CUDA out of memory"
    run[1]["target"] = 9  # a changed top-1
    problems = dc.compare_rows(_rows(REFERENCE), run, "fp32")
    assert any("on b: failed: CUDA out of memory" in p for p in problems)
    assert any("insertion on a: missing" in p for p in problems)
    assert any("target 9, reference 3" in p for p in problems)


def test_times_must_be_positive():
    rows = [_row(metric="time", value=0.2), _row(image="b", metric="time", value=0.0)]
    assert dc.time_problems(rows) == ["gradcam/head/time on b: time 0.0 s is not positive"]
    assert dc.time_problems([_row()]) == ["no 'time' rows: run with --metrics ...,time"]


def test_sharded_rows_must_equal_single_process_rows():
    single = _rows(REFERENCE)
    assert dc.same_rows(single, [dict(r, run="other") for r in single]) == []
    assert dc.same_rows(single, single[:-1]) == ["5 rows, the single-process run has 6"]
    swapped = [single[1], single[0], *single[2:]]
    assert dc.same_rows(single, swapped)[0].startswith("row 0 (gradcam/head/insertion on b)")
    off = [dict(r) for r in single]
    off[2]["value"] += 1.0
    assert dc.same_rows(single, off) == ["row 2 (gradcam/head/average-drop on a): 31 vs 30"]


def test_throughput_arithmetic():
    assert dc.forwards_per_second(64, 0.032) == pytest.approx(2000)
    assert dc.best_batch({16: 900.0, 64: 2000.0, 256: 2000.0}) == (64, 2000.0)
    # Score-CAM with 129 forwards per image at 2000/s is bounded by 64.5 ms per image
    assert dc.forward_bound_ratio(0.129, 129, 2000) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        dc.forwards_per_second(64, 0.0)


def test_summary_table():
    throughput = {"engine": "eager", "dtype": "bf16", "per_batch": {"16": 900.0, "64": 2000.0}}
    rows = [_row(explainer="scorecam", metric="time", value=0.129),
            _row(explainer="scorecam", metric="forward-passes", value=129.0)]
    line = dc.summary_lines(throughput, rows, "ok")
    assert line == ["eager", "bf16", "64", "2000", "0.129", "2.00", "-", "-", "ok"]
    table = dc.format_table([line], "title").splitlines()
    assert table[0] == "title"
    assert table[2].split("|")[1:-1] == [f" {h} " for h in (
        "engine", "dtype", "batch", "fwd/s", "Score-CAM s/img", "xbound", "RISE s/img",
        "xbound", "scores")]
    assert table[3].count(":|") == 6  # numbers right-aligned, text not
    assert table[4] == ("| eager  | bf16  |    64 |  2000 |           0.129 |   2.00 |          - "
                        "|      - | ok     |")


def test_stopwatch_times_a_known_sleep_on_cpu():
    with Stopwatch(torch.device("cpu")) as watch:
        time.sleep(0.05)
    assert 0.05 <= watch.seconds < 0.5


def test_timing_check_catches_a_stopwatch_that_misses_asynchronous_work():
    launch, synchronize = dc.thread_launcher(0.05)
    # the CPU Stopwatch does not wait for the thread: what a CUDA timer without sync would do
    problems, values = dc.stopwatch_problems(lambda: Stopwatch(torch.device("cpu")), launch,
                                             synchronize, repeats=2)
    assert len(problems) == 1 and "misses the asynchronous part" in problems[0], values

    class Synchronising(Stopwatch):
        def __exit__(self, *exc):
            synchronize()
            super().__exit__(*exc)

    problems, values = dc.stopwatch_problems(lambda: Synchronising(torch.device("cpu")), launch,
                                             synchronize, repeats=2)
    assert problems == [] and values["stopwatch"] >= 0.05


def test_ranks_share_a_gpu_with_gloo():
    assert backend_and_gpu(1, 2, gpus=1) == ("gloo", 0)
    assert backend_and_gpu(1, 2, gpus=2) == ("nccl", 1)
    assert backend_and_gpu(3, 4, gpus=2) == ("gloo", 1)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        backend_and_gpu(0, 1, gpus=0)


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_cuda_dry_run_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "env",
                          "--device", "cuda"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "torch sees no CUDA device" in out.stdout


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    """The whole script with DEVICE_CHECK_DEVICE=cpu: every step, the table, exit status 0."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = {**os.environ, "DEVICE_CHECK_DEVICE": "cpu", "DEVICE_CHECK_WORK": str(tmp_path / "w"),
           "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in ("env", "gpu-tests", "timing", "cpu-reference", "run-eager-fp32",
                 "compare-eager-fp32", "single-process", "torchrun", "torchrun-rows", "summary"):
        assert f"ok   {step} (" in out.stdout, (step, out.stdout)
    table = (tmp_path / "w" / "summary.md").read_text().splitlines()
    cells = [c.strip() for c in table[-1].split("|")[1:-1]]
    assert cells[:2] == ["eager", "fp32"] and cells[-1] == "ok"
    assert all(float(c) > 0 for c in cells[3:8])  # throughput, seconds, ratios
    rows = [json.loads(line) for line in
            (tmp_path / "w" / "runs" / "torchrun" / "rows.jsonl").read_text().splitlines()]
    assert {r["explainer"] for r in rows} == {"", "gradcam", "scorecam"}
