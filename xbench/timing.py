"""Wall-clock timing that is honest on both CPU and CUDA (docs/protocol.md "Cost")."""

from __future__ import annotations

import time

import torch


class Stopwatch:
    """Times a block: CUDA events read after synchronising on GPU, perf_counter on CPU.

    CUDA kernels run asynchronously, so a host clock read right after launching them measures
    the launch, not the work; events recorded on the stream and read after synchronising do.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0
