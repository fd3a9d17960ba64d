"""Mutual-transfer checkpoints: both students (spec + weights), class names and the training
state, written atomically and read with ``weights_only=True``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xbench import UserError
from xbench_plugins.mutual_transfer.students import Student, build_student


CHECKPOINT_FORMAT = "xbench-mutual-transfer"


CHECKPOINT_VERSION = 1


MEMBERS = ("st1", "st2")


def save_checkpoint(path: str | Path, students: dict[str, Student], class_names: Sequence[str],
                    state: dict[str, Any]) -> None:
    """Write a mutual-transfer checkpoint atomically (temp file + rename).

    ``state`` holds the training state (config, epoch, optimizer, history); the members are
    stored as {spec, state_dict} so the Model plugin can rebuild either one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "class_names": list(class_names),
        "members": {name: {"spec": s.spec(), "state_dict": s.net.state_dict()} for name, s in students.items()},
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint (weights_only: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mutual-transfer checkpoint {path}: no such file; train one with "
                        "'xbench train mutual-transfer ... --output CKPT'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path} is not a readable mutual-transfer checkpoint ({type(exc).__name__}: "
                        f"{exc}); train one with 'xbench train mutual-transfer ... --output CKPT'") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a mutual-transfer checkpoint (no format={CHECKPOINT_FORMAT!r} "
                        "marker); train one with 'xbench train mutual-transfer ... --output CKPT'")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: mutual-transfer checkpoint version {payload.get('version')} is not "
                        f"supported (expected {CHECKPOINT_VERSION}); retrain it")
    return payload


def restore_student(member: dict[str, Any]) -> Student:
    """Rebuild a student from its checkpoint entry (no download, weights from the checkpoint)."""
    spec = member["spec"]
    student = build_student(spec["arch"], int(spec["num_classes"]), pretrained=False)
    student.net.load_state_dict(member["state_dict"])
    student.pretrained = bool(spec.get("pretrained", False))
    return student


def load_students(path: str | Path) -> tuple[dict[str, Student], dict[str, Any]]:
    """({'st1': Student, 'st2': Student}, payload) from a checkpoint."""
    payload = read_checkpoint(path)
    students = {name: restore_student(payload["members"][name]) for name in MEMBERS}
    return students, payload
