"""One read of a run's records, shared by the leaderboard, the report and the CLI.

``rows.jsonl`` stays the write path (append-only, fsynced, crash-safe: xbench/records.py); the
views read it once into a columnar table (Apache Arrow, read by pyarrow's multithreaded JSON
reader) and keep that table as Parquet in ``RUN/.view/`` so the next leaderboard reads a few
columns of a compressed file instead of parsing the JSON again:

- ``scalars.parquet``: every field of every finished row but the curve, plus ``column``
  (``metric@variant``) and ``kind`` (:func:`xbench.records.row_kind`); strings dictionary-
  encoded (a run repeats a handful of explainers, metrics and provenance strings millions of
  times);
- ``curves.parquet``: ``row`` (the row's position in ``scalars``) and ``curve``, only for rows
  that carry one (insertion/deletion): stored apart and built only when something first asks
  for curves (reports, curve plots; the leaderboard never does), with ``curves-key.json``;
- ``key.json``: what the cache was built from, written last.

The cache is valid while ``key.json`` matches the records: the finished byte count of
``rows.jsonl`` (from ``progress.jsonl``), the file's size and modification time, and SHA-256
hashes of its first 64 KiB and of the last 1 MiB before the finished count. Appending a unit,
``--overwrite`` and any rewrite change the key, and the run is read again; an edit that keeps
the size, the time stamp and both hashed ends is not seen, which is why the cache is never
committed (``.gitignore``) and ``xbench leaderboard --check`` in CI, on a fresh checkout,
always reads the records themselves. A folder that cannot be written (a read-only checkout)
simply gets no cache. Rows that pyarrow rejects (a corrupt line, an unknown field) are read
again line by line by :meth:`xbench.records.RunFolder.rows`, whose error names the file and
line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from xbench.records import ResultRow, RunFolder, RunHeader

VIEW_FOLDER = ".view"
#: bumped when the cached tables change shape (an old cache is then rebuilt)
VIEW_FORMAT = 1
SCALARS_FILE = "scalars.parquet"
CURVES_FILE = "curves.parquet"
KEY_FILE = "key.json"
CURVES_KEY_FILE = "curves-key.json"
#: lz4, not zstd: the curves are most of the bytes, and zstd's better ratio cost seconds per GB
CURVES_COMPRESSION = "lz4"
HEAD_BYTES = 64 << 10
TAIL_BYTES = 1 << 20
#: the families tables group metric columns by, in this order (docs/protocol.md); others
#: follow alphabetically, then explainers' diagnostics, then metrics of unknown family
FAMILY_ORDER = ("faithfulness", "localisation", "robustness", "sanity", "complexity",
                "cost", "model")
DIAGNOSTIC_FAMILY = "diagnostic"
OTHER_FAMILY = "other"

_FIELDS = [f for f in dataclasses.fields(ResultRow)]
_FIELD_NAMES = [f.name for f in _FIELDS]
_SCALAR_NAMES = [name for name in _FIELD_NAMES if name != "curve"]
_DERIVED = ["column", "kind"] if "kind" not in _FIELD_NAMES else ["column"]


def _arrow_type(annotation: str) -> pa.DataType | None:
    base = annotation.replace(" | None", "").strip()
    return {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
            "tuple[float, ...]": pa.list_(pa.float64())}.get(base)


def _schema() -> pa.Schema | None:
    """The Arrow schema of a ResultRow line, or None when a field has a type it cannot hold."""
    types = [(f.name, _arrow_type(str(f.type))) for f in _FIELDS]
    if any(t is None for _, t in types):
        return None
    return pa.schema(types)


_REQUIRED_NON_NULL = [f.name for f in _FIELDS if "None" not in str(f.type)]


class _NotFast(Exception):
    """The fast reader cannot read these records; the line-by-line reader will say why."""


@dataclass
class RunView:
    """The records of one run as columns: the scalar rows (no curves) and, apart, the curves.

    Backed by the Parquet cache (columns are read as asked for) or, for a run read without
    one, by tables in memory."""

    folder: RunFolder
    _scalars: pa.Table | None = field(default=None, repr=False)
    _curves: pa.Table | None = field(default=None, repr=False)
    _scalars_path: Path | None = field(default=None, repr=False)
    _curves_path: Path | None = field(default=None, repr=False)
    _key: dict[str, Any] | None = field(default=None, repr=False)
    _header: RunHeader | None = field(default=None, repr=False)

    @property
    def header(self) -> RunHeader:
        if self._header is None:
            self._header = self.folder.header()
        return self._header

    @property
    def scalars(self) -> pa.Table:
        """Every scalar column of every row (strings dictionary-encoded)."""
        return self._table()

    def _table(self, columns: Sequence[str] | None = None) -> pa.Table:
        if self._scalars is not None:
            return self._scalars if columns is None else self._scalars.select(list(columns))
        assert self._scalars_path is not None
        return pq.read_table(self._scalars_path, columns=None if columns is None else list(columns),
                             read_dictionary=_string_columns(self._scalars_path))

    def __len__(self) -> int:
        if self._scalars is not None:
            return self._scalars.num_rows
        return pq.read_metadata(self._scalars_path).num_rows

    def frame(self, columns: Sequence[str] | None = None, categorical: bool = False) -> pd.DataFrame:
        """A pandas frame of the scalar rows (all columns when ``columns`` is None).

        ``categorical``: strings as pandas Categoricals with sorted categories (small and
        fast for millions of rows); otherwise plain strings, as :func:`records_frame` gives."""
        table = self._table(columns)
        if not categorical:
            table = _decode(table)
        frame = table.to_pandas()
        for name in frame.columns:
            if isinstance(frame[name].dtype, pd.CategoricalDtype):
                categories = frame[name].cat.categories
                frame[name] = frame[name].cat.set_categories(sorted(categories))
        return frame

    def curves(self) -> pa.Table:
        """``row`` (position in :attr:`scalars`) and ``curve`` of the rows that carry one.

        A cached view builds its curves table on the first call (the leaderboard never asks:
        parsing and writing the curves was most of a cold read) and keeps it beside the
        scalars while the records stay the same."""
        if self._curves is None:
            if self._curves_path is not None:
                cached = _read_cached_curves(self._curves_path, self._key)
                if cached is not None:
                    return cached
                built = _build_curves(self.folder, self._key, self._curves_path)
                if built is not None:
                    return built
                self._curves = read_curves(self.folder,
                                           None if self._key is None else self._key["limit"])
            else:
                self._curves = _empty_curves()
        return self._curves

    def result_rows(self, metrics: Iterable[str] | None = None,
                    with_curves: bool = True) -> Iterator[ResultRow]:
        """ResultRow objects of the rows of ``metrics`` (all when None), in file order, with
        their curves: for code written against rows (curves and layer plots)."""
        table = self._table(_SCALAR_NAMES)
        positions = np.arange(table.num_rows)
        if metrics is not None:
            mask = pc.is_in(pc.cast(table["metric"], pa.string()),
                            value_set=pa.array(sorted(set(metrics)), pa.string()))
            mask = mask.to_numpy(zero_copy_only=False)
            table = table.filter(pa.array(mask))
            positions = positions[mask]
        curves: dict[int, list[float]] = {}
        if with_curves and "curve" in _FIELD_NAMES:
            stored = self.curves()
            picked = stored.filter(pa.array(np.isin(stored["row"].to_numpy(), positions)))
            curves = dict(zip(picked["row"].to_pylist(), picked["curve"].to_pylist()))
        for position, data in zip(positions.tolist(), _decode(table).to_pylist()):
            if "curve" in _FIELD_NAMES:
                data["curve"] = curves.get(position)
            yield ResultRow(**data)


# -- reading --------------------------------------------------------------------------------


_memo: dict[Path, tuple[dict[str, Any], RunView]] = {}


def load(folder: RunFolder | Path | str, cache: bool = True) -> RunView:
    """The view of a run's finished rows: from ``RUN/.view/`` when it matches the records
    (``cache``), else read from ``rows.jsonl`` (and cached when the folder is writable).

    Raises :class:`xbench.records.RecordError` naming the file and line of a bad row."""
    folder = folder if isinstance(folder, RunFolder) else RunFolder(Path(folder))
    key = cache_key(folder)
    where = folder.path.resolve()
    remembered = _memo.get(where)
    if cache and remembered is not None and remembered[0] == key:
        return remembered[1]
    view = _read_cached(folder, key) if cache else None
    if view is None and cache and key["limit"]:
        view = _build_cache(folder, key)
    if view is None:
        scalars, curves = read_records(folder)
        view = RunView(folder, scalars, curves)
    if cache:
        _memo.clear()  # one run at a time: a full-val view is large
        _memo[where] = (key, view)
    return view


def cache_key(folder: RunFolder) -> dict[str, Any]:
    """What the cached tables of ``folder`` must have been built from (module docstring)."""
    finished = folder.finished_units()
    limit = max(finished.values(), default=0)
    key: dict[str, Any] = {"format": VIEW_FORMAT, "fields": _FIELD_NAMES, "limit": limit,
                           "size": 0, "mtime_ns": 0, "head": "", "tail": ""}
    try:
        stat = folder.rows_path.stat()
    except OSError:
        return key
    key.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    with folder.rows_path.open("rb") as handle:
        key["head"] = hashlib.sha256(handle.read(min(HEAD_BYTES, limit))).hexdigest()
        start = max(0, limit - TAIL_BYTES)
        handle.seek(start)
        key["tail"] = hashlib.sha256(handle.read(limit - start)).hexdigest()
    return key


def read_records(folder: RunFolder) -> tuple[pa.Table, pa.Table]:
    """(scalars, curves) of the finished rows of ``folder``, read from ``rows.jsonl``."""
    limit = max(folder.finished_units().values(), default=0)
    if limit == 0 or not folder.rows_path.exists():
        return _empty_scalars(), _empty_curves()
    if _schema() is not None:
        scalars: list[pa.RecordBatch] = []
        curves: list[pa.RecordBatch] = []
        try:
            _parse_blocks(folder.rows_path, limit,
                          lambda batch, offset: _split(batch, offset, scalars.append,
                                                       curves.append))
            return _concat(scalars, _empty_scalars()), _concat(curves, _empty_curves())
        except (_NotFast, pa.ArrowException, ValueError):
            pass
    return _from_rows(list(folder.rows()))


def _parse_blocks(path: Path, limit: int, consume, fields: Sequence[str] | None = None) -> None:
    """Call ``consume(batch, offset)`` for each parsed block of the first ``limit`` bytes
    (``offset``: the position of the block's first row). ``fields``: parse only these
    (the others are skipped, not converted); every field, strictly, when None."""
    schema = _schema()
    if fields is not None:
        schema = pa.schema([schema.field(name) for name in fields])
    with path.open("rb") as handle:
        reader = pj.open_json(
            pa.PythonFile(_Prefix(handle, limit), mode="r"),
            read_options=pj.ReadOptions(block_size=8 << 20),
            parse_options=pj.ParseOptions(
                explicit_schema=schema,
                unexpected_field_behavior="error" if fields is None else "ignore"))
        offset = 0
        for batch in reader:
            for name in _REQUIRED_NON_NULL if fields is None else ():
                if batch.column(name).null_count:
                    raise _NotFast(name)
            consume(batch, offset)
            offset += batch.num_rows
        reader.close()


def _split(batch: pa.RecordBatch, offset: int, scalar_sink, curve_sink) -> None:
    """Hand ``batch``'s scalar and curve batches to the sinks (None: not wanted)."""
    if scalar_sink is not None:
        scalar_sink(_scalar_batch(batch))
    if curve_sink is not None and "curve" in batch.schema.names:
        curve_sink(_curve_batch(batch.column("curve"), offset))


def read_curves(folder: RunFolder, limit: int | None = None) -> pa.Table:
    """The curves table of the finished rows of ``folder`` (of its first ``limit`` bytes),
    read from ``rows.jsonl``."""
    if limit is None:
        limit = max(folder.finished_units().values(), default=0)
    if limit == 0 or "curve" not in _FIELD_NAMES:
        return _empty_curves()
    batches: list[pa.RecordBatch] = []
    try:
        _parse_blocks(folder.rows_path, limit,
                      lambda batch, offset: _split(batch, offset, None, batches.append),
                      fields=["curve"])
        return _concat(batches, _empty_curves())
    except (pa.ArrowException, ValueError):
        return read_records(folder)[1]


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of an open file, read in plain reads (a memory map would
    count the whole file in the process's resident memory)."""

    def __init__(self, handle, limit: int) -> None:
        self.handle, self.left = handle, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self.left)
        if size <= 0:
            return 0
        count = self.handle.readinto(memoryview(buffer)[:size])
        self.left -= count
        return count


def _from_rows(rows: list[ResultRow]) -> tuple[pa.Table, pa.Table]:
    """The tables of already-parsed rows (the line-by-line path)."""
    schema = _schema()
    data = [dataclasses.asdict(row) for row in rows]
    if schema is not None:
        batch = pa.RecordBatch.from_pylist(data, schema=schema)
    else:
        batch = pa.RecordBatch.from_pylist([{k: v for k, v in d.items() if k != "curve"}
                                            for d in data])
    scalars = _scalar_batch(batch)
    curves = (pa.Table.from_batches([_curve_batch(batch.column("curve"), 0)])
              if "curve" in batch.schema.names else _empty_curves())
    return pa.Table.from_batches([scalars]), curves


def _scalar_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The scalar columns of ``batch`` with ``column`` and ``kind`` added, strings
    dictionary-encoded."""
    names = [n for n in batch.schema.names if n != "curve"]
    arrays = {name: batch.column(name) for name in names}
    metric, variant = arrays["metric"], arrays["variant"]
    arrays["column"] = pc.if_else(pc.equal(variant, ""), metric,
                                  pc.binary_join_element_wise(metric, variant, "@"))
    if "kind" not in arrays:
        arrays["kind"] = _kinds(arrays)
    encoded = {name: (pc.dictionary_encode(array) if pa.types.is_string(array.type) else array)
               for name, array in arrays.items()}
    return pa.RecordBatch.from_pydict(encoded)


def _kinds(arrays: dict[str, pa.Array]) -> pa.Array:
    """:func:`xbench.records.row_kind` of every row, vectorised (same rules, same order)."""
    failed = pc.equal(arrays["status"], "failed").to_numpy(zero_copy_only=False)
    no_explainer = pc.equal(arrays["explainer"], "").to_numpy(zero_copy_only=False)
    confidence = pc.equal(arrays["metric"], "confidence").to_numpy(zero_copy_only=False)
    no_direction = pc.equal(arrays["direction"], "").to_numpy(zero_copy_only=False)
    kinds = np.select(
        [failed, no_explainer & confidence, no_explainer, no_direction],
        ["failure", "confidence", "model-score", "diagnostic"], default="score")
    return pa.array(kinds.astype(object), pa.string())


def _curve_batch(curve: pa.Array, offset: int) -> pa.RecordBatch:
    present = pc.is_valid(curve).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(present) + offset
    return pa.RecordBatch.from_pydict({"row": pa.array(rows, pa.int64()),
                                       "curve": curve.filter(pa.array(present))})


def _concat(batches: list[pa.RecordBatch], empty: pa.Table) -> pa.Table:
    if not batches:
        return empty
    tables = [pa.Table.from_batches([b]) for b in batches]
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()


def _empty_scalars() -> pa.Table:
    schema = _schema()
    if schema is None:
        return pa.table({name: pa.array([], pa.string()) for name in _SCALAR_NAMES + _DERIVED})
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    return pa.Table.from_batches([_scalar_batch(empty)])


def _empty_curves() -> pa.Table:
    return pa.table({"row": pa.array([], pa.int64()),
                     "curve": pa.array([], pa.list_(pa.float64()))})


def _decode(table: pa.Table) -> pa.Table:
    """``table`` with dictionary columns cast back to plain strings."""
    columns = [pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col
               for col in table.columns]
    return pa.table(columns, names=table.column_names)


# -- the cache ------------------------------------------------------------------------------


def _read_cached(folder: RunFolder, key: dict[str, Any]) -> RunView | None:
    where = folder.path / VIEW_FOLDER
    try:
        stored = json.loads((where / KEY_FILE).read_text(encoding="utf-8"))
        if stored != key:
            return None
        pq.read_metadata(where / SCALARS_FILE)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return RunView(folder, _scalars_path=where / SCALARS_FILE, _curves_path=where / CURVES_FILE,
                   _key=key)


def _read_cached_curves(path: Path, key: dict[str, Any] | None) -> pa.Table | None:
    try:
        stored = json.loads((path.parent / CURVES_KEY_FILE).read_text(encoding="utf-8"))
        if key is None or stored != key:
            return None
        return pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException):
        return None


def _build_curves(folder: RunFolder, key: dict[str, Any] | None, path: Path) -> pa.Table | None:
    """Write the curves of ``folder`` to ``path`` (beside the cached scalars) and return
    them, or None when they cannot be kept there."""
    if key is None or cache_key(folder) != key:
        return None  # the records moved on since the view was made
    sink = _Sink(path.with_name(path.name + ".tmp"), compression=CURVES_COMPRESSION)
    try:
        (path.parent / CURVES_KEY_FILE).unlink(missing_ok=True)
        _parse_blocks(folder.rows_path, key["limit"],
                      lambda batch, offset: _split(batch, offset, None, sink), fields=["curve"])
        sink.close(_empty_curves())
        os.replace(sink.path, path)
        tmp = path.parent / (CURVES_KEY_FILE + ".tmp")
        tmp.write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path.parent / CURVES_KEY_FILE)
        return pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException):
        if sink.writer is not None:
            sink.writer.close()
        sink.path.unlink(missing_ok=True)
        return None


def _string_columns(path: Path) -> list[str]:
    schema = pq.read_schema(path)
    return [f.name for f in schema if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type)]


class _Sink:
    """Batches written to one Parquet file as they come (the writer opens on the first)."""

    def __init__(self, path: Path, compression: str = "zstd") -> None:
        self.path = path
        self.compression = compression
        self.writer: pq.ParquetWriter | None = None

    def __call__(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, batch.schema, compression=self.compression)
        self.writer.write_batch(batch)

    def close(self, empty: pa.Table) -> None:
        if self.writer is None:
            pq.write_table(empty, self.path, compression=self.compression)
        else:
            self.writer.close()


class _Overlapped:
    """Runs ``work(batch, offset)`` for each parsed block on one writer thread while the
    reader parses the next block: Arrow releases the GIL in both, so on two cores parsing
    and writing can overlap instead of adding up (docs/scale.md has the cold read's time with
    this and the curves left out; the two were not measured apart). At most one block waits,
    so memory stays bounded by two blocks."""

    def __init__(self, work) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.work = work
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xbench-view")
        self.pending = None

    def __call__(self, batch: pa.RecordBatch, offset: int) -> None:
        self.wait()
        self.pending = self.pool.submit(self.work, batch, offset)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises the writer's error here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _build_cache(folder: RunFolder, key: dict[str, Any]) -> RunView | None:
    """Read the scalar rows straight into ``RUN/.view/`` (memory bounded by two blocks; the
    curves are skipped, built when first asked for), or None when the folder cannot be
    written or the fast reader cannot read them."""
    where = folder.path / VIEW_FOLDER
    try:
        where.mkdir(exist_ok=True)
        (where / KEY_FILE).unlink(missing_ok=True)  # invalid while the tables are replaced
        (where / CURVES_KEY_FILE).unlink(missing_ok=True)
        scalars = _Sink(where / (SCALARS_FILE + ".tmp"))
    except OSError:
        return None  # a read-only results folder: the view works, it is just not kept
    try:
        if _schema() is None:
            raise _NotFast("schema")
        writer = _Overlapped(lambda batch, offset: scalars(_scalar_batch(batch)))
        try:
            # strict parse of every field (an unknown field or a bad line sends the run to the
            # line-by-line reader, which names it); the curves are parsed, not kept
            _parse_blocks(folder.rows_path, key["limit"], writer)
        finally:
            writer.close()
        scalars.close(_empty_scalars())
    except (_NotFast, pa.ArrowException, ValueError, OSError):
        if scalars.writer is not None:
            scalars.writer.close()
        scalars.path.unlink(missing_ok=True)
        return None
    try:
        os.replace(scalars.path, where / SCALARS_FILE)
        tmp = where / (KEY_FILE + ".tmp")
        tmp.write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
        os.replace(tmp, where / KEY_FILE)
    except OSError:
        return None
    return RunView(folder, _scalars_path=where / SCALARS_FILE, _curves_path=where / CURVES_FILE,
                   _key=key)


# -- frames of rows and metric families -----------------------------------------------------


def records_frame(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """One line per ResultRow (curves left out), with ``column`` and ``kind`` added: the
    same frame :meth:`RunView.frame` gives for the same rows."""
    scalars, _ = _from_rows(list(rows))
    return RunView(RunFolder(Path(".")), scalars).frame()


def metric_families(metrics: Iterable[str], header: RunHeader | None = None,
                    kinds: dict[str, str] | None = None) -> dict[str, str]:
    """{metric: family} for table grouping.

    A family recorded by the run (``header.config["metric_families"]``) comes first, so a
    leaderboard depends on the records alone; then the installed metric's
    :meth:`xbench.Metric.metric_family`; an explainer's diagnostic (row kind "diagnostic",
    ``kinds``) is "diagnostic"; anything else is "other"."""
    recorded = dict((header.config.get("metric_families") or {}) if header is not None else {})
    kinds = kinds or {}
    out = {}
    for metric in metrics:
        if metric in recorded:
            out[metric] = str(recorded[metric])
        elif kinds.get(metric) == "diagnostic":
            out[metric] = DIAGNOSTIC_FAMILY
        else:
            out[metric] = _installed_family(metric)
    return out


@lru_cache(maxsize=None)
def _installed_family(metric: str) -> str:
    registry = _registry()
    if registry is None:
        return OTHER_FAMILY
    try:
        return registry.metric(metric).metric_family() or OTHER_FAMILY
    except Exception:  # noqa: BLE001 - not installed here: the family is unknown
        return OTHER_FAMILY


@lru_cache(maxsize=1)
def _registry():
    try:
        from xbench.plugins import build_registry

        return build_registry()
    except Exception:  # noqa: BLE001 - a broken plugin must not stop a leaderboard
        return None


def family_rank(family: str) -> tuple[int, str]:
    """Sort key of a family: FAMILY_ORDER, then others by name, diagnostics, unknown."""
    if family in FAMILY_ORDER:
        return (FAMILY_ORDER.index(family), "")
    if family == DIAGNOSTIC_FAMILY:
        return (len(FAMILY_ORDER) + 1, "")
    if family == OTHER_FAMILY:
        return (len(FAMILY_ORDER) + 2, "")
    return (len(FAMILY_ORDER), family)
