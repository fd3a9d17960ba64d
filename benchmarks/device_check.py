"""The checks and the summary table of ``benchmarks/device_check.sh`` (docs/device-check.md).

Subcommands, each exiting 1 with one line per problem when a check fails:

- ``env --device D``: what runs the check (torch, CUDA, the device); fails when D is missing.
- ``compare REF RUN --dtype DT``: the rows of run folder RUN against the reference run REF
  (made by the script on CPU in fp32 with the same options), within :data:`TOLERANCES`.
- ``same REF RUN``: RUN (a torchrun-sharded run) has the rows of REF (one process, same device).
- ``timing --device D``: :class:`xbench.timing.Stopwatch` times a deliberately asynchronous
  kernel, including the kernel.
- ``throughput --device D --engine E --dtype DT --batches 16,64 --output F``: forwards per second
  of the model at each batch size, through the engine an ``xbench run`` uses, into JSON F.
- ``summary --runs DIR --throughput F...``: the table of throughput, Score-CAM and RISE seconds
  per image and their ratio to the forward-pass bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

#: run folder names the script uses: <engine>-<dtype>; the CPU reference is REFERENCE
REFERENCE = "cpu-reference"
COST_METRICS = ("forward-passes", "backward-passes")
TIME_METRIC = "time"


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted |run - reference| of a score. ``per_image``: every image's score must
    agree; otherwise the mean over the images of each (explainer, layer, metric, variant)
    cell (Average Drop and AUC are such means in their papers)."""

    per_image: bool
    #: insertion/deletion AUC, in [0, 1]
    auc: float
    #: Average Drop, in percentage points (AD = 100/N sum max(0, Y - O)/Y)
    average_drop: float
    #: the model's confidence in the target (data rows), in [0, 1]
    confidence: float


#: fp32 (TF32 off): float rounding, ~1e-6 on probabilities, made 1e-3 on AUC because a rounding
#: change can move one 3136-pixel insertion step past a near-tied pixel; bf16/fp16 autocast:
#: a few unit roundoffs u (bf16 2^-8, fp16 2^-11) of the logits, carried through softmax into
#: means over the images: 5u on AUC and confidence, 500u percentage points on AD
#: (AD divides by the clean confidence, which can be small).
TOLERANCES = {
    "fp32": Tolerance(per_image=True, auc=1e-3, average_drop=0.1, confidence=1e-4),
    "bf16": Tolerance(per_image=False, auc=0.02, average_drop=2.0, confidence=0.02),
    "fp16": Tolerance(per_image=False, auc=0.0025, average_drop=0.25, confidence=0.0025),
}


def bound_of(metric: str, tolerance: Tolerance) -> float | None:
    """The tolerance of ``metric`` (None: not compared: timings and unknown metrics)."""
    if metric in ("insertion", "deletion", "insertion-deletion"):
        return tolerance.auc
    if metric == "average-drop":
        return tolerance.average_drop
    if metric == "confidence":
        return tolerance.confidence
    if metric in COST_METRICS:
        return 0.0  # counted, not computed: must be equal on every device
    return None


def load_rows(folder: Path) -> list[dict]:
    path = Path(folder) / "rows.jsonl"
    if not path.is_file():
        raise SystemExit(f"device_check: no rows at {path}; did the xbench run before it fail? "
                         f"(see its log next to the run folder)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(row: dict) -> str:
    parts = [row["explainer"] or "(model)", row["layer"] or "-", row["metric"]]
    return "/".join(parts + ([row["variant"]] if row["variant"] else []))


def compare_rows(reference: list[dict], run: list[dict], dtype: str) -> list[str]:
    """Problems (one line each, naming the cell) where ``run`` disagrees with ``reference``
    beyond :data:`TOLERANCES` [``dtype``]; [] when they agree. Failed rows and a changed
    target are problems; the ``time`` metric is compared by :func:`time_problems` instead."""
    tolerance = TOLERANCES[dtype]
    problems = [f"{_cell(r)} on {r['image']}: failed: {r['error']}" for r in run
                if r["status"] != "ok"]
    by_key = {(r["image"], _cell(r)): r for r in reference if r["status"] == "ok"}
    seen = {(r["image"], _cell(r)) for r in run}
    problems += [f"{cell} on {image}: missing from the run" for image, cell in sorted(by_key)
                 if (image, cell) not in seen]
    cells: dict[str, list[tuple[float, float]]] = {}
    for row in run:
        key = (row["image"], _cell(row))
        if row["status"] != "ok" or key not in by_key:
            continue
        expected = by_key[key]
        if row["target"] != expected["target"]:
            problems.append(f"{key[1]} on {row['image']}: target {row['target']}, reference "
                            f"{expected['target']} (top-1 changed; scores not comparable)")
            continue
        bound = bound_of(row["metric"], tolerance)
        if bound is None:
            continue
        if tolerance.per_image or bound == 0.0:
            difference = abs(row["value"] - expected["value"])
            if not difference <= bound:
                problems.append(f"{key[1]} on {row['image']}: {row['value']:.6g}, reference "
                                f"{expected['value']:.6g} (|diff| {difference:.3g} > {bound:g}, "
                                f"{dtype})")
        else:
            cells.setdefault(key[1], []).append((row["value"], expected["value"]))
    for cell, pairs in sorted(cells.items()):
        mean_run = statistics.fmean(p[0] for p in pairs)
        mean_reference = statistics.fmean(p[1] for p in pairs)
        bound = bound_of(cell.split("/")[2], tolerance)
        difference = abs(mean_run - mean_reference)
        if not difference <= bound:
            problems.append(f"{cell}: mean {mean_run:.6g} over {len(pairs)} images, reference "
                            f"{mean_reference:.6g} (|diff| {difference:.3g} > {bound:g}, {dtype})")
    return problems


def same_rows(reference: list[dict], run: list[dict]) -> list[str]:
    """Problems where the merged rows of a sharded run differ from the single-process rows:
    same rows in the same order, scores within fp32 rounding (cuDNN may pick other kernels in
    another process), everything else equal."""
    if len(run) != len(reference):
        return [f"{len(run)} rows, the single-process run has {len(reference)}"]
    problems = []
    for position, (mine, theirs) in enumerate(zip(run, reference)):
        ignore = {"value", "run", "curve"}
        different = sorted(k for k in set(mine) | set(theirs)
                           if k not in ignore and mine.get(k) != theirs.get(k))
        if different:
            problems.append(f"row {position} ({_cell(mine)} on {mine['image']}): "
                            f"{', '.join(different)} differ")
            continue
        if mine["metric"] == TIME_METRIC or mine["value"] is None:
            continue
        bound = bound_of(mine["metric"], TOLERANCES["fp32"])
        bound = 1e-6 if bound is None else bound
        if not abs(mine["value"] - theirs["value"]) <= bound:
            problems.append(f"row {position} ({_cell(mine)} on {mine['image']}): "
                            f"{mine['value']:.6g} vs {theirs['value']:.6g}")
    return problems


def time_problems(rows: list[dict]) -> list[str]:
    """Every explanation time (CUDA events on GPU) must be a positive, finite number."""
    times = [r for r in rows if r["metric"] == TIME_METRIC]
    if not times:
        return ["no 'time' rows: run with --metrics ...,time"]
    return [f"{_cell(r)} on {r['image']}: time {r['value']!r} s is not positive"
            for r in times if not (r["status"] == "ok" and math.isfinite(r["value"])
                                   and r["value"] > 0)]


# -- the asynchronous-kernel timing check ----------------------------------------------------

def stopwatch_problems(stopwatch: Callable[[], contextlib.AbstractContextManager],
                       launch: Callable[[], None], synchronize: Callable[[], None],
                       repeats: int = 3) -> tuple[list[str], dict[str, float]]:
    """Whether ``stopwatch()`` (an object with ``.seconds`` after its block) times work that
    ``launch`` starts asynchronously; ([problems], {measurements in seconds}).

    The work's duration is measured on the host as launch + ``synchronize``; the launch alone
    must take much less (else the work is not asynchronous and the check proves nothing), and
    the stopwatch around a bare ``launch()`` must report at least 80% of the duration.
    """
    launch()  # warm-up: first-call costs are not the kernel
    synchronize()
    durations, launches, measured = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        launch()
        launches.append(time.perf_counter() - start)
        synchronize()
        durations.append(time.perf_counter() - start)
        with stopwatch() as watch:
            launch()
        synchronize()
        measured.append(watch.seconds)
    values = {"work": min(durations), "launch": min(launches), "stopwatch": min(measured)}
    problems = []
    if not values["launch"] < 0.5 * values["work"]:
        problems.append(f"the work is not asynchronous (launch {values['launch']:.4f} s of "
                        f"{values['work']:.4f} s): the check cannot tell anything")
    if not values["stopwatch"] > 0:
        problems.append(f"Stopwatch measured {values['stopwatch']!r} s: not positive")
    elif not values["stopwatch"] >= 0.8 * values["work"]:
        problems.append(f"Stopwatch measured {values['stopwatch']:.4f} s for work of "
                        f"{values['work']:.4f} s: it misses the asynchronous part")
    return problems, values


def cuda_sleep_launcher(device, seconds: float = 0.05) -> Callable[[], None]:
    """A launcher of one GPU kernel that spins about ``seconds`` (torch.cuda._sleep, whose
    cycle count is calibrated here on the device)."""
    import torch

    cycles = 10_000_000
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device)
    per_cycle = start.elapsed_time(end) / 1000 / cycles
    target = max(1, int(seconds / per_cycle))
    return lambda: torch.cuda._sleep(target)


def thread_launcher(seconds: float = 0.05) -> tuple[Callable[[], None], Callable[[], None]]:
    """(launch, synchronize) of host work that runs asynchronously in a thread: a CPU stand-in
    for a CUDA kernel, to test :func:`stopwatch_problems` itself."""
    threads: list[threading.Thread] = []

    def launch() -> None:
        thread = threading.Thread(target=time.sleep, args=(seconds,))
        thread.start()
        threads.append(thread)

    def synchronize() -> None:
        while threads:
            threads.pop().join()

    return launch, synchronize


def timing_check(device) -> list[str]:
    import torch

    from xbench.timing import Stopwatch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        launch, synchronize = cuda_sleep_launcher(device), lambda: torch.cuda.synchronize(device)
        problems, values = stopwatch_problems(lambda: Stopwatch(device), launch, synchronize)
    else:
        # no asynchronous CPU kernels: the CPU Stopwatch must time a known sleep
        watch = Stopwatch(device)
        with watch:
            time.sleep(0.05)
        values = {"work": 0.05, "stopwatch": watch.seconds}
        problems = ([] if 0.05 <= watch.seconds < 0.5
                    else [f"Stopwatch measured {watch.seconds:.4f} s for a 0.05 s sleep"])
    print("timing: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in values.items()))
    return problems


# -- throughput and the summary table --------------------------------------------------------

def forwards_per_second(images: int, seconds: float) -> float:
    if images < 1 or not seconds > 0:
        raise ValueError(f"forwards_per_second: {images} images in {seconds} s")
    return images / seconds


def best_batch(per_batch: dict[int, float]) -> tuple[int, float]:
    """(batch size, forwards per second) of the fastest batch size; ties: the smaller batch."""
    if not per_batch:
        raise ValueError("best_batch: no measurements")
    return min(per_batch.items(), key=lambda item: (-item[1], item[0]))


def forward_bound_ratio(seconds_per_image: float, forwards_per_image: float,
                        throughput: float) -> float:
    """Explanation time over the time its forwards take at the best measured throughput: 1.0
    means the explainer is as fast as its forward passes allow; the excess is masking,
    upsampling, the backward pass and launch gaps."""
    return seconds_per_image / (forwards_per_image / throughput)


def measure_throughput(device, engine: str, dtype: str, batches: Iterable[int],
                       model: str = "efficientnet-lite0", repeats: int = 5) -> dict[int, float]:
    """{batch size: forwards per second} of ``model`` through ``engine`` as ``xbench run`` sets
    it up (channels-last, autocast for bf16/fp16), timed by the Stopwatch; best of ``repeats``."""
    import torch

    from xbench.model import ClassifierHandle
    from xbench.plugins import build_registry
    from xbench.runner import DTYPES
    from xbench.timing import Stopwatch

    loaded = build_registry().model(model)().load()
    handle = ClassifierHandle(loaded, device, channels_last=True, name=model)
    cast = DTYPES[dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=cast)) if cast else contextlib.nullcontext
    out = {}
    for batch in batches:
        handle.use_engine(engine, batch, autocast())
        images = torch.rand(batch, 3, loaded.input_size, loaded.input_size,
                            generator=torch.Generator().manual_seed(batch)).to(device)
        best = math.inf
        with autocast():
            handle.predict(images)  # warm-up: kernel selection, allocator
            for _ in range(repeats):
                with Stopwatch(device) as watch:
                    handle.predict(images)
                best = min(best, watch.seconds)
        out[batch] = forwards_per_second(batch, best)
    return out


def explainer_costs(rows: list[dict], explainer: str) -> tuple[float, float] | None:
    """(seconds per image, forwards per image) of ``explainer``, means over the images."""
    times = [r["value"] for r in rows if r["explainer"] == explainer
             and r["metric"] == TIME_METRIC and r["status"] == "ok"]
    forwards = [r["value"] for r in rows if r["explainer"] == explainer
                and r["metric"] == "forward-passes" and r["status"] == "ok"]
    if not times or not forwards:
        return None
    return statistics.fmean(times), statistics.fmean(forwards)


SUMMARY_COLUMNS = ("engine", "dtype", "batch", "fwd/s", "Score-CAM s/img", "xbound",
                   "RISE s/img", "xbound", "scores")


def summary_lines(throughput: dict, rows: list[dict] | None, check: str) -> list[str]:
    """One table line's cells: ``throughput`` is a JSON of :func:`main` ``throughput``
    ({engine, dtype, per_batch}), ``rows`` the run's rows (None: no run), ``check`` the
    comparison's outcome."""
    per_batch = {int(k): v for k, v in throughput["per_batch"].items()}
    batch, fps = best_batch(per_batch)
    cells = [throughput["engine"], throughput["dtype"], str(batch), f"{fps:.4g}"]
    for explainer in ("scorecam", "rise"):
        cost = explainer_costs(rows or [], explainer)
        if cost is None:
            cells += ["-", "-"]
            continue
        seconds, forwards = cost
        cells += [f"{seconds:.4g}", f"{forward_bound_ratio(seconds, forwards, fps):.2f}"]
    return cells + [check]


def format_table(lines: list[list[str]], title: str = "") -> str:
    """A Markdown table (it reads as plain text too), text left- and numbers right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(SUMMARY_COLUMNS)]
    numeric = [bool(lines) and all(_is_number(line[i]) for line in lines)
               for i in range(len(SUMMARY_COLUMNS))]

    def render(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w)
                                 for c, w, n in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                          for w, n in zip(widths, numeric)) + "|"
    text = [render(SUMMARY_COLUMNS), rule, *map(render, lines)]
    return "\n".join(([title, ""] if title else []) + text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return text == "-"
    return True


# -- command line ----------------------------------------------------------------------------

def _report(problems: list[str], what: str) -> int:
    for line in problems:
        print(f"FAIL {what}: {line}")
    if not problems:
        print(f"ok   {what}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--device", required=True)
    p = sub.add_parser("compare")
    p.add_argument("reference", type=Path)
    p.add_argument("run", type=Path)
    p.add_argument("--dtype", choices=sorted(TOLERANCES), required=True)
    p = sub.add_parser("same")
    p.add_argument("reference", type=Path)
    p.add_argument("run", type=Path)
    p = sub.add_parser("timing")
    p.add_argument("--device", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--device", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--dtype", choices=sorted(TOLERANCES), required=True)
    p.add_argument("--batches", required=True, help="comma-separated batch sizes")
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("summary")
    p.add_argument("--runs", type=Path, required=True, help="folder of <engine>-<dtype> runs")
    p.add_argument("--checks", type=Path, help="lines 'RUN_NAME OUTCOME' (ok, FAIL, ...)")
    p.add_argument("--title", default="")
    p.add_argument("throughput", type=Path, nargs="+")
    args = parser.parse_args(argv)

    if args.command in ("env", "timing", "throughput"):
        import torch  # only here: the comparisons and the table start in a fraction of a second
    if args.command == "env":
        from xbench.distributed import backend_and_gpu

        device = torch.device(args.device)
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, "
              f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else '-'}, "
              f"{torch.cuda.device_count()} CUDA device(s)")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                print(f"FAIL env: --device {args.device} but torch sees no CUDA device (a "
                      f"CPU-only torch build, or no driver); DEVICE_CHECK_DEVICE=cpu runs the "
                      f"dry run")
                return 1
            print(f"device: {torch.cuda.get_device_name(device)}, TF32 convolutions allowed "
                  f"by default: {torch.backends.cudnn.allow_tf32}")
            backend = backend_and_gpu(1, 2, torch.cuda.device_count())[0]
            print(f"torchrun: 2 ranks on {torch.cuda.device_count()} GPU(s) join with {backend}")
        else:
            print("torchrun: 2 ranks on CPU join with gloo")
        return 0
    if args.command == "compare":
        problems = compare_rows(load_rows(args.reference), load_rows(args.run), args.dtype)
        problems += time_problems(load_rows(args.run))
        return _report(problems, f"{args.run.name} vs {args.reference.name}")
    if args.command == "same":
        return _report(same_rows(load_rows(args.reference), load_rows(args.run)),
                       f"{args.run.name} (merged shards) vs {args.reference.name}")
    if args.command == "timing":
        return _report(timing_check(torch.device(args.device)), "Stopwatch")
    if args.command == "throughput":
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        per_batch = measure_throughput(torch.device(args.device), args.engine, args.dtype,
                                       batches, model=args.model)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        device = torch.device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        args.output.write_text(json.dumps({"engine": args.engine, "dtype": args.dtype,
                                        "model": args.model, "device": name,
                                        "per_batch": per_batch}))
        print(f"throughput {args.engine} {args.dtype}: " + ", ".join(
            f"batch {b}: {v:,.4g}/s" for b, v in per_batch.items()))
        return 0
    checks = dict(line.split(maxsplit=1) for line in args.checks.read_text().splitlines()
                  if line.strip()) if args.checks else {}
    lines, titles = [], set()
    for path in args.throughput:
        throughput = json.loads(path.read_text())
        titles.add(f"{throughput['model']} on {throughput['device']}")
        name = f"{throughput['engine']}-{throughput['dtype']}"
        folder = args.runs / name
        rows = load_rows(folder) if (folder / "rows.jsonl").is_file() else None
        lines.append(summary_lines(throughput, rows, checks.get(name, "not run")))
    print(format_table(lines, f"{', '.join(sorted(titles))}: {args.title}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
