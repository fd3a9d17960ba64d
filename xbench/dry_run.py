"""``xbench run --dry-run``: what a run will cost, before it runs.

Prints the plan (:class:`xbench.plan.RunPlan`): units, forward (F) and backward (B) passes per
image of each explainer and metric, totals, and a wall-time estimate from a throughput probe on
this machine: a few timed forwards through the run's engine and forward+backward passes of the
eager model at the run's batch size (the README's "Sizing a run" arithmetic, measured):

    time ~ sum over units of F x (seconds per engine forward) + B x (seconds per backward)

It ignores what is not a pass (map post-processing, SLIC, mask generation, reading images), so
it is a lower bound for cheap explainers and close for pass-bound ones (RISE, Score-CAM).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from xbench.base import Passes
from xbench.model import ClassifierHandle
from xbench.plan import RunPlan


@dataclass(frozen=True)
class Throughput:
    """Seconds per image of one forward through the engine, and of one backward."""

    forward: float
    backward: float
    batch_size: int
    engine: str

    def seconds(self, forward: float, backward: float) -> float:
        return forward * self.forward + backward * self.backward


def probe_throughput(handle: ClassifierHandle, batch_size: int, repeats: int = 3) -> Throughput:
    """Time ``repeats`` forwards (through the run's engine, as masked copies go) and eager
    forward+backward passes at ``batch_size`` after one untimed warm-up of each; the best
    of the repeats, per image. Backward = (forward+backward) - eager forward."""
    size = handle.input_size
    x = torch.rand(batch_size, 3, size, size, device=handle.device)

    def best(step) -> float:
        step()
        times = []
        for _ in range(repeats):
            if handle.device.type == "cuda":
                torch.cuda.synchronize(handle.device)
            start = time.perf_counter()
            step()
            if handle.device.type == "cuda":
                torch.cuda.synchronize(handle.device)
            times.append(time.perf_counter() - start)
        return min(times) / batch_size

    def both() -> None:
        with torch.enable_grad():
            handle(x.clone().requires_grad_(True)).max().backward()

    def eager() -> None:
        with torch.no_grad():
            handle(x)

    forward = best(lambda: handle.predict(x))
    eager_forward = best(eager)
    backward = max(best(both) - eager_forward, 0.0)
    handle.zero_grad(set_to_none=True)
    return Throughput(forward, backward, batch_size, handle.engine)


def _cell(passes: Passes | None) -> str:
    return "?" if passes is None else passes.text()


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe(plan: RunPlan, throughput: Throughput | None) -> str:
    """The dry run's report, as printed."""
    selection = plan.selection
    images = len(selection.dataset.items)
    batches = len(selection.batches())
    lines = [f"dry run of {selection.run_name}: {images} images in {batches} "
             f"batch{'es' if batches != 1 else ''} of "
             f"{selection.config.batch_size}, profile {selection.profile}, model "
             f"{plan.model.name or selection.config.model}, layers {', '.join(plan.layers)}",
             f"units: {plan.units_total} ({batches} data + {batches} x {len(plan.cells)} "
             f"explainer units)", "",
             "passes per image (F forward, B backward; ? = not declared by the plugin):"]
    width = max([len(c.label) for c in plan.cells] + [len(m) for m in plan.metric_passes]
                + [len(m) for m in plan.model_metric_passes] + [10])
    for cell in plan.cells:
        lines.append(f"  explainer {cell.label:<{width}}  {_cell(cell.passes)}")
    for name, passes in plan.metric_passes.items():
        shared = f"  (shared: {passes.shared.split(':')[0]})" if passes and passes.shared else ""
        lines.append(f"  metric    {name:<{width}}  {_cell(passes)}{shared}")
    for name, passes in plan.model_metric_passes.items():
        lines.append(f"  model     {name:<{width}}  {_cell(passes)}  (once per image)")
    forward, backward, unknown = plan.totals()
    lines += ["", f"total: {forward:g} forward + {backward:g} backward passes"
              + (f"; {unknown} of {plan.units_total} units of unknown cost not counted"
                 if unknown else "")]
    if throughput is not None:
        seconds = sum(throughput.seconds(u.forward, u.backward) for u in plan.units
                      if u.forward is not None)
        lines.append(f"throughput here: {throughput.forward * 1e3:.2f} ms per forward "
                     f"({throughput.engine}), {throughput.backward * 1e3:.2f} ms per backward, "
                     f"per image at batch {throughput.batch_size}")
        lines.append(f"estimated wall time: {_duration(seconds)} (passes only"
                     + (", known units only" if unknown else "") + ")")
    return "\n".join(lines)
