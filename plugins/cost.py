"""Cost of an explanation: forward passes, backward passes and wall time per image.

The harness counts passes through the model wrapper and times each explanation (CUDA events
after synchronisation on GPU, perf_counter on CPU, warm-up excluded); these metrics expose
those measurements as columns of the matrix (docs/protocol.md "Cost").
"""

from __future__ import annotations

from xbench import Metric, hookimpl
from xbench import Passes


class ForwardPasses(Metric):
    name = "forward-passes"
    direction = "lower"
    kind = "cost"
    passes = Passes(0)  # reads what the harness measured
    unit = "passes"
    summary = "images pushed through the model's forward to explain one image"

    def score(self, batch):
        return {"": batch.explain_forward.double()}


class BackwardPasses(Metric):
    name = "backward-passes"
    direction = "lower"
    kind = "cost"
    passes = Passes(0)  # reads what the harness measured
    unit = "passes"
    summary = "backward passes through the model to explain one image"

    def score(self, batch):
        return {"": batch.explain_backward.double()}


class ExplanationTime(Metric):
    name = "time"
    direction = "lower"
    kind = "cost"
    passes = Passes(0)  # reads what the harness measured
    unit = "s"
    summary = "explanation wall time per image (batch time / batch size), warm-up excluded"

    def score(self, batch):
        return {"": batch.explain_seconds.double()}


@hookimpl
def register_metrics(register):
    register(ForwardPasses)
    register(BackwardPasses)
    register(ExplanationTime)
