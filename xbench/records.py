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
#: everything a run writes into its folder (``--overwrite`` removes all of it)
RUN_OUTPUTS = (HEADER_FILE, ROWS_FILE, PROGRESS_FILE, "run.tmp", "maps", "shards", "report.html",
               ".view")


class RecordError(UserError):
    """A run's records cannot be read: the message names the file and line."""


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
    #: host load: {"cores": N, "start": [1, 5, 15 min], "end": [...]} (end written when the
    #: run ends); timings from a host loaded past its cores are not comparable
    host_load: dict[str, Any] = field(default_factory=dict)

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
                            f"xbench reads version {SCHEMA_VERSION}. Re-run into a new --output "
                            "folder or use the xbench version that wrote it.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: what a result row is: the model's confidence in an image's target (one per image, written
#: when it is read; a failure to read it is a "failure"), a model-scope metric's score (no
#: explainer), an explainer x metric score, an explainer's diagnostic (no better direction,
#: e.g. ``scorecam:skipped-channels``) or a failed cell
ROW_KINDS = ("confidence", "model-score", "score", "diagnostic", "failure")


def row_kind(row: ResultRow | dict[str, Any]) -> str:
    """The kind of ``row`` (a ResultRow or its dict): its ``kind`` field when set, else derived
    as rows written before the field existed mean it: failed -> "failure"; no explainer ->
    "confidence" (metric ``confidence``) or "model-score"; no direction -> "diagnostic";
    otherwise "score"."""
    get = row.get if isinstance(row, dict) else lambda key, default=None: getattr(row, key, default)
    kind = get("kind", "")
    if kind:
        return kind
    if get("status", "ok") == "failed":
        return "failure"
    if get("explainer", "") == "":
        return "confidence" if get("metric", "") == "confidence" else "model-score"
    if get("direction", "") == "":
        return "diagnostic"
    return "score"


@dataclass(frozen=True)
class ResultRow:
    """One score of one image for one (explainer, layer, metric variant), with provenance.

    ``status`` is "ok" or "failed" (then ``value`` is None and ``error`` says why).
    ``degenerate`` marks a constant or non-finite map, scored as the all-zero map
    (docs/protocol.md). ``kind`` says what the row is (one of :data:`ROW_KINDS`, see
    :func:`row_kind`); rows written before it existed get it derived when read.
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
    #: "confidence", "model-score", "score", "diagnostic" or "failure" ('' -> derived)
    kind: str = ""
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
    #: wall time of the explain call that produced this row's map, for all images of its
    #: batch; the ``time`` metric is this divided by ``batch_images`` (None: not explained)
    batch_seconds: float | None = None
    batch_images: int | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", row_kind(self))
        elif self.kind not in ROW_KINDS:
            raise ValueError(f"row kind {self.kind!r}: expected one of {', '.join(ROW_KINDS)}")

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
        """Refuse to share the folder with another writer (a second run on the same --output).

        Taken (O_EXCL) before anything reads the folder's state and held until the run ends,
        so two runs started together cannot both find it free."""
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
                            f"for it to finish or choose another --output. If no run is active, "
                            f"delete {lock}.") from None
        os.write(self._lock_fd, str(os.getpid()).encode())
        os.fsync(self._lock_fd)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            (self.path / LOCK_FILE).unlink(missing_ok=True)

    def probe_writable(self) -> None:
        """Create the folder and a probe file in it, or raise UserError saying why not (run
        before anything expensive, so an unwritable ``--output`` fails at once)."""
        probe = self.path / f".probe-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"probe")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if isinstance(exc, (FileExistsError, NotADirectoryError)):
                reason = "a file, not a folder, is in the way"
            raise UserError(f"cannot write results to {self.path}: {reason} "
                            f"({exc.filename or self.path}). Choose a writable --output folder "
                            f"(and --name).") from exc

    def clear_outputs(self) -> None:
        """Remove everything an earlier run wrote here (rows, progress, maps, shards, report)."""
        import shutil

        for name in RUN_OUTPUTS:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def write_header(self, header: RunHeader) -> None:
        self.update_header(header)
        for path in (self.rows_path, self.progress_path):
            path.write_bytes(b"")

    def update_header(self, header: RunHeader) -> None:
        """Atomically replace run.json (rows and progress untouched)."""
        tmp = self.header_path.with_suffix(".tmp")
        tmp.write_text(header.to_json(), encoding="utf-8")
        os.replace(tmp, self.header_path)

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
        for number, line in enumerate(data.splitlines(), start=1):
            row, problem = parse_row(line)
            if problem:
                raise RecordError(f"{self.rows_path}:{number}: {problem}. Check the run with "
                                  f"`xbench check {self.path}`; re-run it with --overwrite or "
                                  f"move it out of the results folder.")
            yield row

    def verify(self) -> list[str]:
        """Every problem of the run's records, one ``FILE:LINE: what`` per bad line: the
        header, each progress line (JSON, unit, rows_bytes growing and on a line boundary)
        and each rows line (JSON, the ResultRow fields and types); [] when all are sound."""
        try:
            self.header()
        except UserError as exc:
            return [str(exc)]
        problems: list[str] = []
        ends: list[int] = []
        raw = self.progress_path.read_bytes() if self.progress_path.exists() else b""
        for number, line in enumerate(raw.splitlines(keepends=True), start=1):
            where = f"{self.progress_path}:{number}"
            try:
                entry = json.loads(line)
                unit, end = entry["unit"], entry["rows_bytes"]
                if not isinstance(unit, str) or not isinstance(end, int):
                    raise TypeError("unit must be a string and rows_bytes an integer")
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{where}: not a progress entry ({type(exc).__name__}: {exc})")
                continue
            if not line.endswith(b"\n"):
                problems.append(f"{where}: torn (no newline); --resume cuts it")
            if ends and end < ends[-1]:
                problems.append(f"{where}: rows_bytes {end} goes back from {ends[-1]}")
            ends.append(end)
        data = self.rows_path.read_bytes() if self.rows_path.exists() else b""
        boundaries, offset = set(), 0
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            offset += len(line)
            boundaries.add(offset)
            _, problem = parse_row(line)
            if problem:
                problems.append(f"{self.rows_path}:{number}: {problem}")
            elif offset > max(ends, default=0):
                problems.append(f"{self.rows_path}:{number}: after the last finished unit (a "
                                f"torn unit; --resume redoes it)")
        for number, end in enumerate(ends, start=1):
            if end and end not in boundaries:
                problems.append(f"{self.progress_path}:{number}: rows_bytes {end} is not the end "
                                f"of a line of {self.rows_path.name} ({len(data)} bytes)")
        return problems


_ROW_FIELDS = {f.name: f for f in dataclasses.fields(ResultRow)}
_REQUIRED = {name for name, f in _ROW_FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "tuple": (list, tuple)}


def parse_row(line: bytes) -> tuple[ResultRow | None, str]:
    """(row, '') or (None, what is wrong with this JSON line)."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"not a JSON object but {type(data).__name__}"
    missing = sorted(_REQUIRED - set(data))
    unknown = sorted(set(data) - set(_ROW_FIELDS))
    if missing or unknown:
        return None, ("not a result row of schema version "
                      f"{SCHEMA_VERSION}: " + "; ".join(
                          part for part in (f"missing {', '.join(missing)}" if missing else "",
                                            f"unknown {', '.join(unknown)}" if unknown else "")
                          if part))
    for name, value in data.items():
        allowed = _allowed_types(str(_ROW_FIELDS[name].type))
        if value is None and "None" in str(_ROW_FIELDS[name].type):
            continue
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            return None, f"field {name!r} has {type(value).__name__} {value!r}"
    return ResultRow(**data), ""


def _allowed_types(annotation: str) -> tuple[type, ...]:
    return tuple(t for key, types in _TYPES.items() if annotation.startswith(key)
                 or f"| {key}" in annotation for t in types)


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
