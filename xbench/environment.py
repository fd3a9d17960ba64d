"""What the run header records about the software and hardware that produced a number."""

from __future__ import annotations

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


def environment(device: torch.device) -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "",
        "packages": package_versions(),
        "git_sha": git_sha(),
    }
