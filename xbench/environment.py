"""What the run header records about the software and hardware that produced a number."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def package_versions(names: tuple[str, ...] = ("xbench", "torch", "torchvision", "numpy",
                                                "captum", "pillow")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if "torch" in out:
        out["torch"] = torch.__version__  # includes the build (+cpu, +cu130), metadata does not
    return out


def short_versions() -> str:
    """'xbench=0.1.0 torch=2.14.1 torchvision=0.29.1', repeated in every result row."""
    versions = package_versions(("xbench", "torch", "torchvision"))
    return " ".join(f"{k}={v}" for k, v in versions.items())


def git_sha() -> str:
    """The commit of the xbench source tree, when it is a git checkout ('' otherwise)."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from xbench.errors import UserError

        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def cpu_model() -> str:
    """'AMD EPYC (avx2)': the processor and the SIMD level torch dispatches to, because CPU
    timings differ several-fold between hosts of the same nominal size."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            name = next((line.split(":", 1)[1].strip() for line in info
                         if line.startswith("model name")), name)
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return f"{name} ({capability.lower()})" if capability else name


#: what :func:`tune_allocator` did in this process ('' until it ran or when it did nothing)
_ALLOCATOR = ""
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> str:
    """Keep freed CPU tensor memory for reuse instead of returning it to the kernel.

    glibc serves every allocation above 128 KiB-32 MiB with a fresh mmap and unmaps it on free,
    so each forward pass of a CNN re-faults hundreds of MB of activations: on this project's
    2-core CPU, EfficientNet-Lite0 forwards take 15.5 ms per image at batch 16 and 5.5-6.5 ms
    once mmap is kept for allocations above 1 GiB and the heap is trimmed above 2 GiB (the
    usual advice for PyTorch CPU inference is jemalloc/tcmalloc via LD_PRELOAD, which a pip
    install cannot set up). Idempotent; a no-op off glibc or with XBENCH_NO_MALLOPT=1.
    Returns a description recorded in the run header ('' when nothing was done).
    """
    global _ALLOCATOR
    if _ALLOCATOR or os.environ.get("XBENCH_NO_MALLOPT") == "1":
        return _ALLOCATOR
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        return ""
    if ok:
        _ALLOCATOR = "glibc mallopt: mmap_threshold=1GiB, trim_threshold=2GiB-1"
    return _ALLOCATOR


def environment(device: torch.device) -> dict[str, object]:
    return {
        "allocator": _ALLOCATOR or "default",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": describe_device(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "",
        "packages": package_versions(),
        "git_sha": git_sha(),
    }
