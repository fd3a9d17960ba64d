"""Check a run's records against a recomputation of a random sample of its units.

``xbench verify RUN --sample K --seed S`` (docs/ci.md) is what CI runs on records someone
else submitted. In order, it

1. refuses (:class:`~xbench.errors.UserError`) when the recomputation could not be the same
   computation: a distribution providing one of the run's plugins is missing or at another
   version than ``run.json`` records; the data's subset hash (ids and labels, in order) differs
   from the recorded one; the options as resolved now differ from the recorded ones;
2. checks the whole run's records, cheaply: every line against the schema and the progress log
   (:meth:`RunFolder.verify`), every unit of the run finished, each row's provenance equal to
   the header's, and completeness: every image read has one row per column of each explainer
   (or that explainer's or metric's failure row), so a row removed anywhere is found;
3. recomputes K units chosen with ``numpy.random.default_rng(S)`` from the run's header and
   compares them field by field with the recorded rows of those units (:data:`TOLERANCES`).

Every finding names the unit, the row (image, explainer, layer, column) and the field.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbench.errors import UserError
from xbench.plugins import Registry
from xbench.records import ResultRow, RunFolder, RunHeader, parse_row

#: fields never compared: the wall time of the explain call and the host's names for itself
#: (the device type, the package versions line); the ``time`` metric's value is a wall time too
EXCLUDED_FIELDS = frozenset({"batch_seconds", "device", "versions"})
TIMED_METRICS = frozenset({"time"})
#: (rtol, atol) of the float fields: |recorded - recomputed| <= atol + rtol * |recomputed|.
#: On one host and engine a recomputation is bit-identical (tests/test_runner.py); across hosts
#: float32 sums are reordered (other SIMD widths, thread counts, GPU kernels), which moves logits
#: by about 1e-5 (the engine start-up check records 9.4e-6 between two engines of one host), so
#: a softmax probability by at most p(1-p) * 1e-5 <= 2.5e-6. The bounds are 4x that on
#: probabilities and scores built from them (curve points are probabilities rounded to 1e-6)
#: and 1e-4 relative: host noise passes, while a changed model, option, image or target moves a
#: score by far more (a toy model whose probabilities differ by 1e-4 between images is caught,
#: tests/test_verify.py). Metrics in percent (average drop) get the atol in percent points
#: (x100, :data:`UNIT_SCALE`); counts of passes are exact.
TOLERANCES = {"value": (1e-4, 1e-5), "curve": (1e-4, 1e-5)}
UNIT_SCALE = {"%": 100.0}
#: metrics whose values are counts (forward and backward passes): compared exactly
EXACT_METRICS_KIND = "cost"
#: row fields that repeat the run header (provenance): every row must agree with it
PROVENANCE = {"run": ("run_name",), "protocol": ("protocol",), "profile": ("profile",),
              "target_rule": ("config", "target_rule"), "model": ("config", "model"),
              "dataset_hash": ("dataset", "subset_hash"), "seed": ("config", "seed"),
              "dtype": ("config", "dtype"), "batch_size": ("config", "batch_size")}


@dataclass(frozen=True)
class Finding:
    """One disagreement: where (unit, row) and what (field, recorded vs recomputed)."""

    unit: str
    row: str
    field: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.unit} {self.row}".strip()
        return f"{where}: {self.field}: {self.detail}"


@dataclass
class Report:
    run: str
    units_total: int
    sampled: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def row_key(row: ResultRow) -> str:
    """How findings name a row: image, explainer @layer, column."""
    who = row.explainer or "(model)"
    if row.layer not in ("", "-"):
        who += f" @{row.layer}"
    return f"[{row.image} {who} {row.column or '(image)'}]"


def _match_key(row: ResultRow) -> tuple[str, str, str, str, str]:
    return (row.image, row.explainer, row.layer, row.metric, row.variant)


def recorded_units(folder: RunFolder) -> dict[str, list[ResultRow]]:
    """{unit: its recorded rows}, from the byte ranges the progress log gives each unit."""
    data = folder.rows_path.read_bytes() if folder.rows_path.exists() else b""
    units: dict[str, list[ResultRow]] = {}
    start = 0
    for unit, end in folder.finished_units().items():
        rows = []
        for line in data[start:end].splitlines():
            row, problem = parse_row(line)
            if row is not None:
                rows.append(row)
        units[unit] = rows
        start = end
    return units


def check_plugin_versions(header: RunHeader, registry: Registry) -> None:
    """Refuse when a distribution providing the run's explainers, metrics or model is missing
    or at another version than the header records (the rows would not be the same code's)."""
    config = header.config
    named = [("explainer", n) for n in config.get("explainers", [])]
    named += [("metric", n) for n in config.get("metrics", [])] + [("model", config["model"])]
    problems = []
    for kind, name in named:
        info = registry.entries[kind].get(name)
        if info is None:
            problems.append(f"{kind} {name!r} is not installed (run.json records plugins "
                            f"{_versions(header.plugins)})")
            continue
        recorded = header.plugins.get(info.distribution)
        if recorded is None:
            problems.append(f"{kind} {name!r} now comes from {info.distribution} "
                            f"{info.version}, a distribution the run did not record "
                            f"({_versions(header.plugins)})")
        elif recorded != info.version:
            problems.append(f"{kind} {name!r}: distribution {info.distribution} is "
                            f"{info.version} here, the run recorded {recorded}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise UserError("cannot verify: the installed plugins differ from the run's: "
                        + "; ".join(unique) + ". Install the recorded versions (pip install "
                        "DIST==VERSION) or re-run with the installed ones.")


def _versions(plugins: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(plugins.items())) or "none"


def check_records(folder: RunFolder, header: RunHeader) -> list[Finding]:
    """What is wrong with the records as a whole (schema, units, provenance, completeness)."""
    findings = [Finding("", "", "records", problem) for problem in folder.verify()]
    finished = folder.finished_units()
    if len(finished) != header.units_total:
        findings.append(Finding("", "", "units", f"{len(finished)} of {header.units_total} "
                                "units finished (an incomplete run cannot be verified)"))
    units = recorded_units(folder)
    batch_size = int(header.config.get("batch_size", 1))
    from xbench.recompute import unit_of

    seen: dict[tuple[str, str, str, str, str], str] = {}
    for unit, rows in units.items():
        for row in rows:
            for name, path in PROVENANCE.items():
                expected: Any = header
                for step in path:
                    expected = getattr(expected, step) if not isinstance(expected, dict) \
                        else expected.get(step)
                if getattr(row, name) != expected:
                    findings.append(Finding(unit, row_key(row), name, f"recorded "
                                            f"{getattr(row, name)!r}, run.json has {expected!r}"))
            if unit_of(row, batch_size) != unit:
                findings.append(Finding(unit, row_key(row), "unit",
                                        f"row belongs to {unit_of(row, batch_size)}"))
            key = _match_key(row)
            if key in seen:
                findings.append(Finding(unit, row_key(row), "row", f"duplicate (also in "
                                        f"{seen[key]})"))
            seen[key] = unit
    findings += _completeness(units, header)
    return findings


def _completeness(units: dict[str, list[ResultRow]], header: RunHeader) -> list[Finding]:
    """A row missing anywhere: each image read (an ok confidence row) must have, for every
    column an explainer (and layer) produced on some image, a row of that column, or a failure
    row of the explainer (metric '') or of the column's metric. Images a box metric excludes
    are excluded for every explainer alike, so a column's images are those any explainer
    scored on it. Every image of the dataset has its one confidence row."""
    findings = []
    all_rows = [row for rows in units.values() for row in rows]
    confidence = Counter(r.image for r in all_rows if r.explainer == "" and r.metric == "confidence")
    expected_images = header.dataset.get("images")
    if expected_images is not None and len(confidence) != expected_images:
        findings.append(Finding("", "", "rows", f"{len(confidence)} images have a confidence "
                                f"row; the run read {expected_images} (a row was removed)"))
    read = {r.image for r in all_rows
            if r.explainer == "" and r.metric == "confidence" and r.status == "ok"}
    column_images: dict[tuple[str, str], set[str]] = defaultdict(set)  # (metric, variant)
    cells: dict[tuple[str, str], dict[tuple[str, str], set[str]]] = defaultdict(
        lambda: defaultdict(set))
    failed: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    unit_of_cell: dict[tuple[str, str, str], str] = {}
    for unit, rows in units.items():
        for row in rows:
            if row.explainer == "":
                continue
            who = (row.explainer, row.layer)
            unit_of_cell[(row.explainer, row.layer, row.image)] = unit
            if row.status != "ok":
                failed[who][row.metric].add(row.image)
                continue
            column_images[(row.metric, row.variant)].add(row.image)
            cells[who][(row.metric, row.variant)].add(row.image)
    whos = set(cells) | set(failed)
    for who in sorted(whos):
        columns = {column for column in column_images
                   if column in cells[who] or any(column[0] == m for m in failed[who])}
        for metric, variant in sorted(columns):
            expect = column_images[(metric, variant)] & read
            have = cells[who].get((metric, variant), set()) | failed[who].get(metric, set()) \
                | failed[who].get("", set())
            for image in sorted(expect - have):
                column = f"{metric}@{variant}" if variant else metric
                layer = "" if who[1] in ("", "-") else f" @{who[1]}"
                unit = unit_of_cell.get((who[0], who[1], image), "")
                findings.append(Finding(unit, f"[{image} {who[0]}{layer} {column}]", "row",
                                        "missing (removed?)"))
    return findings


def _close(recorded: Any, recomputed: Any, rtol: float, atol: float) -> bool:
    if recorded is None or recomputed is None:
        return recorded is recomputed
    a = np.asarray(recorded, dtype=np.float64)
    b = np.asarray(recomputed, dtype=np.float64)
    if a.shape != b.shape:
        return False
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def compare_unit(unit: str, recorded: list[ResultRow], recomputed: list[ResultRow],
                 exact_metrics: Iterable[str] = (),
                 scales: dict[str, float] | None = None) -> list[Finding]:
    """Findings of one unit: rows missing or extra, and each field that differs (floats within
    :data:`TOLERANCES`, the atol times ``scales[metric]`` when given; counts of
    ``exact_metrics`` and every other field exactly)."""
    exact = set(exact_metrics)
    scales = scales or {}
    findings = []
    old = {_match_key(r): r for r in recorded}
    new = {_match_key(r): r for r in recomputed}
    for key, row in new.items():
        if key not in old:
            findings.append(Finding(unit, row_key(row), "row", "missing from the records "
                                    "(the recomputation has it)"))
    for key, row in old.items():
        if key not in new:
            findings.append(Finding(unit, row_key(row), "row", "in the records, not produced "
                                    "by the recomputation"))
            continue
        other = new[key]
        a, b = json.loads(row.to_json()), json.loads(other.to_json())
        for name in sorted(a):
            if name in EXCLUDED_FIELDS or (name == "value" and row.metric in TIMED_METRICS):
                continue
            if name in TOLERANCES and row.metric not in exact:
                rtol, atol = TOLERANCES[name]
                same = _close(a[name], b[name], rtol, atol * scales.get(row.metric, 1.0))
            else:
                same = a[name] == b[name]
            if not same:
                findings.append(Finding(unit, row_key(row), name,
                                        f"recorded {_short(a[name])}, recomputed {_short(b[name])}"))
    return findings


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"curve of {len(value)} points starting {[round(v, 6) for v in value[:3]]}"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return repr(value)


def choose_units(units: list[str], sample: int, seed: int) -> list[str]:
    """``sample`` of ``units`` drawn without replacement by ``default_rng(seed)``, in run order
    (all of them when ``sample`` is at least their number)."""
    if sample < 1:
        raise UserError(f"--sample must be >= 1, got {sample}")
    if sample >= len(units):
        return list(units)
    chosen = np.random.default_rng(seed).choice(len(units), size=sample, replace=False)
    return [units[i] for i in sorted(int(i) for i in chosen)]


Compute = Callable[[Any, list[str]], list[ResultRow]]


def verify(path: Path, registry: Registry, sample: int, seed: int = 0,
           data: str | None = None, labels: str | None = None, boxes: str | None = None,
           device: str | None = None, compute: Compute | None = None) -> Report:
    """Verify the run at ``path`` (see the module docstring); ``compute(runner, unit_ids)``
    recomputes units (default :func:`xbench.recompute.compute_units`)."""
    from xbench.recompute import compute_units, config_differences, runner_from_header, unit_of

    folder = RunFolder(Path(path))
    if not folder.exists():
        raise UserError(f"{path}: not a run folder (no run.json); pass a folder written by "
                        "xbench run, e.g. results/efficientnet-lite0_sample_quick")
    header = folder.header()
    check_plugin_versions(header, registry)
    runner = runner_from_header(header, registry, folder.path, data=data, labels=labels,
                                boxes=boxes, device=device)
    recorded_hash = header.dataset.get("subset_hash")
    if runner.dataset.subset_hash != recorded_hash:
        raise UserError(f"cannot verify: the data changed: {runner.config.data} gives subset "
                        f"hash {runner.dataset.subset_hash}, the run recorded {recorded_hash} "
                        f"({header.dataset.get('images')} images). Pass the run's data folder "
                        "with --data (and --labels).")
    differences = config_differences(runner, header)
    if differences:
        raise UserError("cannot verify: this xbench resolves the run's settings differently: "
                        + "; ".join(differences) + ". Verify with the xbench version that "
                        f"wrote it ({header.xbench_version}).")
    report = Report(run=header.run_name, units_total=header.units_total)
    report.findings += check_records(folder, header)
    units = recorded_units(folder)
    report.sampled = choose_units(list(units), sample, seed)
    classes = {name: registry.entries["metric"][name].cls
               for name in header.config.get("metrics", [])}
    exact = [name for name, cls in classes.items() if cls.kind == EXACT_METRICS_KIND]
    scales = {name: UNIT_SCALE[cls.unit] for name, cls in classes.items()
              if cls.unit in UNIT_SCALE}
    rows = (compute or compute_units)(runner, report.sampled)
    batch_size = runner.config.batch_size
    by_unit: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        by_unit[unit_of(row, batch_size)].append(row)
    for unit in report.sampled:
        report.findings += compare_unit(unit, units[unit], by_unit.get(unit, []), exact, scales)
    return report
