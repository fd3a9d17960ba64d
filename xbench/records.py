"""Run records: a versioned run header (``run.json``) and one frozen dataclass per result row.

On disk a run is a folder::

    run.json        RunHeader: versions, device, dtype, seeds, resolved config, dataset hash
    rows.jsonl      ResultRow per line, appended unit by unit (a unit = one batch x explainer)
    progress.jsonl  one line per finished unit with the byte size of rows.jsonl after it
    LOCK            present while a process writes the run

A unit's rows are written, flushed and fsynced before its progress line, so after a crash the
last progress line says exactly which bytes of ``rows.jsonl`` are complete; ``--resume``
truncates anything after it (a torn or half-written unit) and redoes only the missing units.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xbench.errors import UserError

SCHEMA_VERSION = 1
HEADER_FILE = "run.json"
ROWS_FILE = "rows.jsonl"
PROGRESS_FILE = "progress.jsonl"
LOCK_FILE = "LOCK"


@dataclass(frozen=True)
class RunHeader:
    """Everything needed to reproduce or compare a run; written once, before any row."""

    schema_version: int
    run_name: str
    xbench_version: str
    protocol: str
    profile: str
    config: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]
    environment: dict[str, Any]
    plugins: dict[str, str]
    units_total: int
    world_size: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> RunHeader:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read run header {path}: {exc}") from exc
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{path} was written with results schema version {version}; this "
                            f"xbench reads version {SCHEMA_VERSION}. Re-run into a new --out "
                            "folder or use the xbench version that wrote it.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ResultRow:
    """One score of one image for one (explainer, layer, metric variant), with provenance.

    ``status`` is "ok" or "failed" (then ``value`` is None and ``error`` says why); a failure
    to read an image has ``explainer`` and ``metric`` empty. ``degenerate`` marks a constant
    or non-finite map, scored as the all-zero map (docs/protocol.md).
    """

    run: str
    image: str
    index: int
    label: int | None
    predicted: int | None
    target: int | None
    explainer: str
    explainer_variant: str
    layer: str
    metric: str
    variant: str
    direction: str
    value: float | None
    status: str = "ok"
    degenerate: bool = False
    error: str = ""
    # provenance repeated in every row (docs/protocol.md "Aggregation")
    protocol: str = ""
    profile: str = ""
    target_rule: str = ""
    model: str = ""
    dataset_hash: str = ""
    seed: int = 0
    device: str = ""
    dtype: str = ""
    #: engine of the hook-free forwards: 'eager', 'onnxruntime' or 'compiled' ('' before engines)
    engine: str = ""
    batch_size: int = 0
    versions: str = ""
    #: per-image curve of the metric (insertion/deletion), rounded; None for scalar metrics
    curve: tuple[float, ...] | None = None

    @property
    def column(self) -> str:
        return f"{self.metric}@{self.variant}" if self.variant else self.metric

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, allow_nan=False)


@dataclass
class RunFolder:
    """Reads and appends the files of one run folder."""

    path: Path
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def header_path(self) -> Path:
        return self.path / HEADER_FILE

    @property
    def rows_path(self) -> Path:
        return self.path / ROWS_FILE

    @property
    def progress_path(self) -> Path:
        return self.path / PROGRESS_FILE

    def shard(self, rank: int) -> RunFolder:
        """The folder one rank of a distributed run writes its own rows to."""
        return RunFolder(self.path / "shards" / f"rank{rank:03d}")

    def exists(self) -> bool:
        return self.header_path.exists()

    def header(self) -> RunHeader:
        return RunHeader.from_file(self.header_path)

    def acquire_lock(self) -> None:
        """Refuse to share the folder with another writer (a second run on the same --out)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        try:
            self._lock_fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = lock.read_text().strip() if lock.exists() else "?"
            if owner.isdigit() and not _pid_alive(int(owner)):
                lock.unlink()  # left by a killed run: safe to take over
                return self.acquire_lock()
            raise UserError(f"{self.path} is in use by another xbench run (process {owner}); wait "
                            f"for it to finish or choose another --out. If no run is active, "
                            f"delete {lock}.") from None
        os.write(self._lock_fd, str(os.getpid()).encode())
        os.fsync(self._lock_fd)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            (self.path / LOCK_FILE).unlink(missing_ok=True)

    def write_header(self, header: RunHeader) -> None:
        tmp = self.header_path.with_suffix(".tmp")
        tmp.write_text(header.to_json(), encoding="utf-8")
        os.replace(tmp, self.header_path)
        for path in (self.rows_path, self.progress_path):
            path.write_bytes(b"")

    def _read_progress(self) -> tuple[dict[str, int], int, int]:
        """({unit: rows-file size after it}, bytes of complete progress lines, file size)."""
        done: dict[str, int] = {}
        good_bytes = 0
        raw = self.progress_path.read_bytes() if self.progress_path.exists() else b""
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            done[entry["unit"]] = entry["rows_bytes"]
            good_bytes += len(line)
        return done, good_bytes, len(raw)

    def finished_units(self) -> dict[str, int]:
        """{unit: rows-file size after it}, read-only (a torn tail is ignored, not cut)."""
        return self._read_progress()[0]

    def completed_units(self) -> dict[str, int]:
        """{unit: rows-file size after it}, after cutting a torn tail off both files."""
        done, good_bytes, size = self._read_progress()
        if good_bytes != size:
            with self.progress_path.open("r+b") as handle:
                handle.truncate(good_bytes)
        rows_end = max(done.values(), default=0)
        if self.rows_path.exists() and self.rows_path.stat().st_size != rows_end:
            with self.rows_path.open("r+b") as handle:
                handle.truncate(rows_end)
        return done

    def append_unit(self, unit: str, rows: Iterable[ResultRow]) -> None:
        """Append a unit's rows durably, then record the unit as finished."""
        self.append_raw_unit(unit, "".join(row.to_json() + "\n" for row in rows).encode("utf-8"))

    def append_raw_unit(self, unit: str, payload: bytes) -> None:
        """Append already-serialised rows (JSON lines) of a unit, then mark it finished."""
        with self.rows_path.open("ab") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
            end = handle.tell()
        line = json.dumps({"unit": unit, "rows_bytes": end}, sort_keys=True) + "\n"
        with self.progress_path.open("ab") as handle:
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def rows(self) -> Iterator[ResultRow]:
        """The rows of finished units (a torn tail past the last progress line is ignored)."""
        if not self.rows_path.exists():
            return
        limit = max(self.finished_units().values(), default=0)
        with self.rows_path.open("rb") as handle:
            data = handle.read(limit)
        for line in data.splitlines():
            yield ResultRow(**json.loads(line))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_runs(results: Path) -> list[RunFolder]:
    """Run folders under ``results`` (directly or one level down), sorted by name."""
    if not results.exists():
        return []
    if (results / HEADER_FILE).exists():
        return [RunFolder(results)]
    return [RunFolder(p) for p in sorted(results.iterdir()) if (p / HEADER_FILE).exists()]
