"""Inference engines for the hook-free forward passes that dominate a run's cost.

Score-CAM, RISE and the faithfulness metrics spend nearly all their time pushing masked copies of
an image through the network, with no gradient and no hook. ``eager`` runs them as PyTorch
executes the module: every convolution, batch norm, ReLU6 and "same" padding is its own pass over
memory (EfficientNet-Lite0 on 2 CPU cores: half the time outside the convolutions, by
torch.profiler). Two engines remove that overhead, and must agree with eager to float rounding:

- ``onnxruntime``: the network exported to ONNX once (in memory) and run by ONNX Runtime, whose
  graph optimiser folds batch norm into the convolutions and fuses activations and padding
  (EfficientNet-Lite0, batch 16, 2 CPU cores: 17.1 -> 6.4 ms per image; benchmarks/). CPU only.
  Chosen over hand-fusing modules because it does this for any exportable model.
- ``compiled``: ``torch.compile`` (inductor) with frozen weights; the choice for CUDA, where
  ONNX Runtime would need its GPU build (on 2 CPU cores: 1.2-1.8x after a 20-45 s compile).

``auto`` (the default) picks ``onnxruntime`` for fp32 runs on CPU when the model exports, and
``eager`` otherwise; what was picked, and why, is recorded in the run header and every row.

Each engine runs at most ``batch_size`` images per call. ONNX Runtime takes any smaller batch
as it comes (its output rows are bit-identical whatever the batch, tests/test_engine.py);
compiled kernels are specialised to one shape, so ``compiled`` pads a short last chunk with zero
images whose outputs are dropped (one compile, and every row depends only on its own input).
Gradients, hooks on inner layers and weight updates need the eager module:
:meth:`xbench.model.ClassifierHandle.predict` is the only caller.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from typing import Callable

import torch
from torch import nn

from xbench.errors import UserError

ENGINES = ("auto", "eager", "onnxruntime", "compiled")
#: an engine's logits may differ from eager by float rounding, not more (relative to the largest)
AGREEMENT = 1e-3


class InferenceEngine:
    """Logits of ``net`` for inputs of shape (N, *``sample_shape``), run in chunks of at most
    ``batch_size`` (exactly ``batch_size``, zero-padded, when the class sets ``pads``).
    Subclasses build ``self._run`` (a chunk -> its logits); the constructor checks it against
    eager on a random batch and times that first call."""

    name = ""
    #: whether every call must have exactly ``batch_size`` rows (a short chunk is padded)
    pads = True
    #: what to do when the engine cannot run a model (ends the error message)
    remedy = ""

    def __init__(self, net: nn.Module, batch_size: int, sample_shape: tuple[int, ...],
                 device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
                 autocast: contextlib.AbstractContextManager | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"engine batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.memory_format = memory_format
        self._padded = (torch.zeros((batch_size, *sample_shape), device=device).contiguous(
            memory_format=memory_format) if self.pads else None)
        probe = torch.rand((batch_size, *sample_shape), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device).contiguous(memory_format=memory_format)
        start = time.perf_counter()
        try:
            self._run = self._build(net, probe)
            with torch.inference_mode(), autocast or contextlib.nullcontext():
                logits = self._run(probe)
                reference = net(probe)
        except UserError:
            raise
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"--engine {self.name}: cannot run the model this way "
                            f"({type(exc).__name__}: {first_line}). {self.remedy} or run with "
                            f"--engine eager.") from exc
        #: one-off set-up time (export or compile, and the first call), in seconds
        self.setup_seconds = time.perf_counter() - start
        #: largest |engine - eager| logit on a random batch
        self.max_logit_difference = float((logits.float() - reference.float()).abs().max())
        scale = float(reference.float().abs().max()) or 1.0
        if not self.max_logit_difference <= AGREEMENT * scale:
            raise UserError(f"--engine {self.name}: its logits differ from eager PyTorch by "
                            f"{self.max_logit_difference:.3g} (largest logit {scale:.3g}); run "
                            f"with --engine eager and report the model")

    def _build(self, net: nn.Module,
               probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "batch_size": self.batch_size,
                "setup_seconds": round(self.setup_seconds, 1),
                "max_logit_difference": self.max_logit_difference}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` (N, *sample_shape); call in inference mode."""
        outputs = []
        for chunk in inputs.split(self.batch_size):
            n = chunk.shape[0]
            if n < self.batch_size and self.pads:
                self._padded[:n].copy_(chunk)
                self._padded[n:].zero_()
                chunk = self._padded
            else:
                chunk = chunk.contiguous(memory_format=self.memory_format)
            outputs.append(self._run(chunk)[:n])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class OnnxRuntimeForward(InferenceEngine):
    """The network exported to ONNX (in memory) and run by ONNX Runtime on CPU, with a
    dynamic batch dimension: a short chunk runs as it is, no padding."""

    name = "onnxruntime"
    remedy = "pip install onnxruntime onnx"
    pads = False

    def _build(self, net, probe):
        import onnxruntime

        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript-based exporter: seconds for a CNN, no onnxscript dependency
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (probe.contiguous(),), buffer, input_names=["images"],
                              output_names=["logits"], opset_version=17, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: the masking between two forwards runs on PyTorch's
        # threads, and spinning ONNX Runtime threads would take the same cores (7.3 vs 8.0 ms
        # per image in a Score-CAM-like loop on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(buffer.getvalue(), options,
                                               providers=["CPUExecutionProvider"])

        def run(chunk: torch.Tensor) -> torch.Tensor:
            array = chunk.detach().float().contiguous().numpy()  # ONNX Runtime reads NCHW
            return torch.from_numpy(session.run(["logits"], {"images": array})[0])

        return run


class CompiledForward(InferenceEngine):
    """``torch.compile`` (inductor) of the network with frozen weights, so that batch norm folds
    into the convolutions; recompiles if autocast or the device changes."""

    name = "compiled"
    remedy = "Install a C++ compiler (CPU) or triton (CUDA)"

    def _build(self, net, probe):
        return torch.compile(net, dynamic=False, options={"freezing": True})


def build_engine(name: str, net: nn.Module, batch_size: int, sample_shape: tuple[int, ...],
                 device: torch.device, memory_format: torch.memory_format,
                 autocast: contextlib.AbstractContextManager | None = None,
                 ) -> InferenceEngine | None:
    """The engine called ``name`` for ``net`` (None for eager); raises UserError naming the
    engine when it cannot run the model."""
    if name == "eager":
        return None
    if name == "onnxruntime":
        if device.type != "cpu":
            raise UserError(f"--engine onnxruntime runs on CPU only, the run is on {device}; "
                            f"use --engine compiled or eager")
        return OnnxRuntimeForward(net, batch_size, sample_shape, device, autocast=autocast)
    if name == "compiled":
        return CompiledForward(net, batch_size, sample_shape, device, memory_format, autocast)
    raise UserError(f"--engine {name!r}: choose one of {', '.join(ENGINES)}")


def auto_engine(device: torch.device, dtype: str) -> tuple[str, str]:
    """(engine, reason) that ``--engine auto`` picks for a run on ``device`` in ``dtype``."""
    if device.type != "cpu":
        return "eager", f"auto: eager on {device.type} (onnxruntime is the CPU engine)"
    if dtype != "fp32":
        return "eager", f"auto: eager for --dtype {dtype} (the engines run fp32)"
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return "eager", "auto: eager, onnxruntime or onnx is not installed"
    return "onnxruntime", "auto: onnxruntime (fp32 on CPU)"
