"""Executing a planned run: the unit loop, its guards, the engine, warm-up, retries, previews,
disk errors and the distributed merge.

Units come from :class:`xbench.plan.RunPlan`; their rows from :class:`xbench.rows.RowFactory`.
A unit's rows are appended durably before the unit is marked finished (:mod:`xbench.records`),
so a run interrupted at any point resumes and ends with the same rows, in the same order, as an
uninterrupted run. Failures (an unreadable image, an explainer or metric that raises, a
wrong-shaped or non-finite map) are recorded as rows and never stop the run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xbench.base import Explainer, Metric, MetricBatch
from xbench.boxes import input_boxes
from xbench.data import Dataset, ImageItem, load_image
from xbench.engine import auto_engine
from xbench.environment import short_versions
from xbench.errors import UserError
from xbench.guard import no_leaked_hooks, time_limit
from xbench.model import ClassifierHandle, masked_batch_size
from xbench.plan import DTYPES, NO_LAYER, RunConfig, data_unit_id, unit_id
from xbench.records import ResultRow, RunFolder, RunHeader, row_kind
from xbench.rows import CONFIDENCE, RowFactory, Source, Subject
from xbench.saliency import normalize_maps
from xbench.timing import Stopwatch

CURVE_DECIMALS = 6
PREVIEW_SIZE = 56


@dataclass(frozen=True)
class Batch:
    """The readable images of one batch, classified: what explainers and metrics receive."""

    items: tuple[ImageItem, ...]
    images: torch.Tensor  # (B, 3, H, W) pixel space, on the run's device
    targets: torch.Tensor  # (B,) the classes explained
    predicted: torch.Tensor  # (B,) top-1 classes
    clean_probs: torch.Tensor  # (B,) p_c(x) of the targets on the clean images
    #: per-image object boxes in input pixels (xbench.boxes); None when the data has none
    boxes: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def one(self, i: int) -> Batch:
        """The batch of image ``i`` alone (explainer retries)."""
        return Batch(self.items[i:i + 1], self.images[i:i + 1], self.targets[i:i + 1],
                     self.predicted[i:i + 1], self.clean_probs[i:i + 1],
                     None if self.boxes is None else self.boxes[i:i + 1])

    def subject(self, i: int) -> Subject:
        return Subject(self.items[i], int(self.predicted[i]), int(self.targets[i]))


@dataclass
class RunSummary:
    folder: RunFolder
    header: RunHeader
    units_done: int
    units_skipped: int
    failed_cells: int
    failed_images: int
    messages: list[str] = field(default_factory=list)
    unit_order: list[str] = field(default_factory=list, repr=False)
    #: the most frequent failure reasons: (count, explainer, layer, first message)
    failure_reasons: list[tuple[int, str, str, str]] = field(default_factory=list)

    def count_failures(self) -> None:
        """Failure counts and reasons of the whole run, read back from its records (so the
        summary, the matrix and the leaderboard count the same rows)."""
        self.failed_cells, self.failed_images, self.failure_reasons = \
            failure_report(self.folder.rows())

    @property
    def host_overloaded(self) -> bool:
        """Whether the 1-minute load exceeded the host's cores at the start or the end."""
        load, cores = self.header.host_load, self.header.host_load.get("cores") or 0
        peaks = [values[0] for key in ("start", "end") for values in [load.get(key)] if values]
        return bool(cores and peaks and max(peaks) > cores)


def failure_report(rows: Any, top: int = 3) -> tuple[int, int, list[tuple[int, str, str, str]]]:
    """(failed cells, unreadable images, the ``top`` most frequent reasons) of ``rows``.

    A failed cell is a failed row of an explainer or of a model-scope metric; an unreadable
    image is a failed image row (explainer and metric empty). Reasons are grouped by
    (explainer, layer, message with the image id taken out), most frequent first; each with
    its first message as written."""
    cells = images = 0
    groups: Counter = Counter()
    first: dict[tuple[str, str, str], str] = {}
    for row in rows:
        if row_kind(row) != "failure":
            continue
        if row.explainer == "" and row.metric in ("", CONFIDENCE):  # reading the image failed
            images += 1
        else:
            cells += 1
        key = (row.explainer, row.layer, row.error.replace(row.image, "<image>"))
        groups[key] += 1
        first.setdefault(key, row.error)
    reasons = [(count, key[0], key[1], first[key]) for key, count in groups.most_common(top)]
    return cells, images, reasons


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for ``--dtype`` (none for fp32)."""
    torch_dtype = DTYPES[dtype]
    return (torch.autocast(device.type, dtype=torch_dtype) if torch_dtype is not None
            else contextlib.nullcontext())


def start_engine(handle: ClassifierHandle, config: RunConfig,
                 device: torch.device) -> dict[str, Any]:
    """Switch ``handle`` to the configured engine (xbench.engine); what it did, for the
    header. ``auto`` falls back to eager, with the reason, when its engine cannot run the
    model; an engine asked for by name raises instead."""
    name, reason = config.engine, "asked for"
    if name == "auto":
        name, reason = auto_engine(device, config.dtype)
    try:
        engine = handle.use_engine(name, masked_batch_size(device), autocast(device, config.dtype))
    except UserError as exc:
        if config.engine != "auto":
            raise
        return {"name": "eager", "reason": f"auto: eager, {name} failed: {exc}"}
    return {"name": name, "reason": reason, **(engine.describe() if engine else {})}


def warm_up(handle: ClassifierHandle, batch_size: int,
            explainers: list[tuple[str, Explainer]]) -> None:
    """One forward+backward at the run's batch shape (kernel selection, allocator) and each
    explainer's one-time set-up, so that neither is billed to the first timed explainer
    (docs/protocol.md "Cost")."""
    size = handle.input_size
    x = torch.rand(batch_size, 3, size, size, device=handle.device, requires_grad=True)
    with torch.enable_grad():
        handle(x).max().backward()
    shape = (3, size, size)
    for _, explainer in explainers:
        explainer.prepare(handle, shape)
    handle.zero_grad(set_to_none=True)


def label(explainer: Explainer, layer: str) -> str:
    return explainer.name if layer == NO_LAYER else f"{explainer.name} @{layer}"


class Execution:
    """Computes units of one run with a loaded model, its explainers and metrics."""

    def __init__(self, config: RunConfig, dataset: Dataset, run_name: str,
                 handle: ClassifierHandle, explainers: list[tuple[str, Explainer]],
                 metrics: list[Metric], provenance: dict[str, Any]) -> None:
        self.config = config
        self.dataset = dataset
        self.run_name = run_name
        self.handle = handle
        self.explainers = explainers
        self.metrics = metrics
        self.device = handle.device
        self.rows = RowFactory(provenance, self._positions)

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        """Position of each image in the (sub)dataset, recorded in its rows."""
        return {item.id: i for i, item in enumerate(self.dataset.items)}

    # -- the loop ------------------------------------------------------------------------

    def unit_weights(self) -> dict[str, int]:
        """Expected forward passes of each unit of a batch (unit label -> passes), known before
        it runs: the data unit classifies each image once; an explainer unit costs its
        explainer's passes per image plus one per metric (so a RISE unit weighs hundreds of
        Grad-CAM units in the progress and its ETA)."""
        per_metric = len(self.metrics)
        weights = {"images": self.config.batch_size}
        for layer, explainer in self.explainers:
            passes = explainer.expected_forward_passes(self.handle)
            weights[label(explainer, layer)] = self.config.batch_size * (passes + per_metric)
        return weights

    def run_batch(self, index: int, items: tuple[ImageItem, ...], done: dict[str, int],
                  summary: RunSummary, writer: RunFolder, progress: Callable[..., None],
                  weights: dict[str, int]) -> None:
        """Compute and append the units of one batch that are not ``done``."""
        data_unit = data_unit_id(index)
        pending = [(layer, e) for layer, e in self.explainers
                   if unit_id(index, e.name, layer) not in done]
        if data_unit in done and not pending:
            progress("skipped (done)", sum(weights.values()))
            return
        progress(f"batch {index}: images")
        batch, data_rows = self.load_batch(items)
        if data_unit not in done:
            data_rows += self.score_model(batch)
            append(writer, data_unit, data_rows)
            summary.units_done += 1
            summary.failed_images += sum(r.status != "ok" for r in data_rows)
        progress(f"batch {index}: images", weights["images"])
        for layer, explainer in self.explainers:
            unit = unit_id(index, explainer.name, layer)
            name = label(explainer, layer)
            if unit in done:
                progress("skipped (done)", weights[name])
                continue
            progress(f"batch {index}: {name}")
            previews: dict[str, np.ndarray] = {}
            rows = self.explain_unit(batch, explainer, layer, previews)
            if self.config.save_maps and previews:
                save_previews(writer, unit, previews)
            append(writer, unit, rows)
            summary.units_done += 1
            summary.failed_cells += sum(r.status != "ok" for r in rows)
            progress(f"batch {index}: {name}", weights[name])

    def compute(self, batches: dict[int, tuple[ImageItem, ...]],
                units: list[str]) -> list[ResultRow]:
        """The rows of ``units`` (ids of this run), computed and returned, not written."""
        cells = {unit_id(index, e.name, layer): (index, layer, e)
                 for index in batches for layer, e in self.explainers}
        loaded: dict[int, tuple[Batch | None, list[ResultRow]]] = {}
        rows: list[ResultRow] = []
        for unit in units:
            index = _batch_index(unit)
            if index not in batches or (unit != data_unit_id(index) and unit not in cells):
                raise UserError(f"unit {unit!r} is not a unit of run {self.run_name!r}")
            if index not in loaded:
                loaded[index] = self.load_batch(batches[index])
            batch, data_rows = loaded[index]
            if unit == data_unit_id(index):
                rows += data_rows + self.score_model(batch)
            else:
                _, layer, explainer = cells[unit]
                rows += self.explain_unit(batch, explainer, layer, {})
        return rows

    # -- data units ----------------------------------------------------------------------

    def load_batch(self, items: tuple[ImageItem, ...]) -> tuple[Batch | None, list[ResultRow]]:
        """Read and classify a batch: (the usable images, one row per image)."""
        loaded = self.handle.loaded
        tensors, good, rows_by_item = [], [], {}
        for position, item in enumerate(items):
            try:
                tensors.append(load_image(item.path, loaded.resize_size, loaded.input_size))
                good.append(position)
            except Exception as exc:  # noqa: BLE001 - any decoder error is this file's failure
                rows_by_item[position] = self.rows.image_failure(
                    Subject(item), f"cannot read {item.path}: {type(exc).__name__}: {exc}")
        if not good:
            return None, [rows_by_item[p] for p in sorted(rows_by_item)]
        images = torch.stack(tensors).to(self.device)
        probs = self.handle.probabilities(images, batch_size=self.config.batch_size).float()
        predicted = probs.argmax(dim=1)
        keep, targets = [], []
        for row_index, position in enumerate(good):
            item = items[position]
            pred = int(predicted[row_index])
            target = pred if self.config.target_rule == "predicted" else item.label
            if target is None:
                rows_by_item[position] = self.rows.image_failure(
                    Subject(item, pred), f"{item.id}: no label, needed by --target label")
                continue
            keep.append(row_index)
            targets.append(target)
            rows_by_item[position] = self.rows.confidence(
                Subject(item, pred, target), float(probs[row_index, target]))
        rows = [rows_by_item[p] for p in sorted(rows_by_item)]
        if not keep:
            return None, rows
        keep_t = torch.tensor(keep, device=self.device)
        target_t = torch.tensor(targets, device=self.device)
        kept = tuple(items[good[k]] for k in keep)
        batch = Batch(
            items=kept, images=images[keep_t], targets=target_t, predicted=predicted[keep_t],
            clean_probs=probs[keep_t].gather(1, target_t[:, None])[:, 0],
            boxes=None if self.dataset.boxes is None else tuple(
                self._boxes(item) for item in kept))
        return batch, rows

    def _boxes(self, item: ImageItem) -> torch.Tensor:
        """The item's boxes in input pixels ((0, 5) when it has none), xbench.boxes."""
        found = self.dataset.boxes.get(item.id)
        if found is None:
            return torch.zeros(0, 5, dtype=torch.long)
        loaded = self.handle.loaded
        with Image.open(item.path) as image:  # the header only: the stored size
            size = image.size
        return input_boxes(found, size, loaded.resize_size, loaded.input_size, item.label)

    def score_model(self, batch: Batch | None) -> list[ResultRow]:
        """Rows of the model-scope metrics on one batch (explainer ''), part of its data unit."""
        model_metrics = [m for m in self.metrics if m.kind == "model"]
        if batch is None or not model_metrics:
            return []
        metric_batch = MetricBatch(
            model=self.handle, images=batch.images, targets=batch.targets, saliency=None,
            degenerate=None, clean_probs=batch.clean_probs, explain_forward=None,
            explain_backward=None, explain_seconds=None)
        rows: list[ResultRow] = []
        for metric in model_metrics:
            rows.extend(self.score(metric, metric_batch, batch, Source(), None))
        return rows

    # -- explainer units -----------------------------------------------------------------

    def explain_unit(self, batch: Batch | None, explainer: Explainer, layer: str,
                     previews: dict[str, np.ndarray]) -> list[ResultRow]:
        """Rows of one unit; the normalised maps go into ``previews`` (image id -> uint8)."""
        if batch is None:
            return []
        source = Source(explainer.name, explainer.variant, layer)
        try:
            return self._explain_and_score(batch, explainer, source, previews)
        except Exception as exc:  # noqa: BLE001 - a plugin failure is recorded, not fatal
            if len(batch) == 1:
                return [self.rows.explainer_failure(
                    batch.subject(0), source, f"explainer {explainer.name!r} on "
                    f"{batch.items[0].id}: {type(exc).__name__}: {exc}")]
        # Retry image by image, so one bad image does not cost the whole batch its scores.
        rows = []
        for i in range(len(batch)):
            rows.extend(self.explain_unit(batch.one(i), explainer, layer, previews))
        return rows

    def _explain_and_score(self, batch: Batch, explainer: Explainer, source: Source,
                           previews: dict[str, np.ndarray]) -> list[ResultRow]:
        handle, images, n = self.handle, batch.images, len(batch)
        grad_mode = torch.enable_grad() if explainer.needs_gradients else torch.no_grad()
        limit = None if self.config.timeout is None else self.config.timeout * n
        with no_leaked_hooks(handle, explainer.name), time_limit(limit, explainer.name), \
                handle.counting() as counts, Stopwatch(self.device) as watch, grad_mode, \
                autocast(self.device, self.config.dtype):
            maps = explainer.explain(handle, images, batch.targets)
        check_maps(explainer.name, maps, n, handle.device)
        handle.zero_grad(set_to_none=True)
        saliency, degenerate = normalize_maps(maps, (images.shape[-2], images.shape[-1]))
        previews.update(zip((item.id for item in batch.items), map_previews(saliency)))
        per_image = lambda total: torch.full((n,), total / n, dtype=torch.float64)  # noqa: E731
        metric_batch = MetricBatch(
            model=handle, images=images, targets=batch.targets, saliency=saliency,
            degenerate=degenerate, clean_probs=batch.clean_probs,
            explain_forward=per_image(counts["forward"]),
            explain_backward=per_image(counts["backward"]),
            explain_seconds=per_image(watch.seconds),
            boxes=None if batch.boxes is None else list(batch.boxes))
        # a timing metric's rows keep the batch's time (their value is its per-image share);
        # other rows stay free of timings, so they are reproducible byte for byte
        timing = {"batch_seconds": watch.seconds, "batch_images": n}
        rows: list[ResultRow] = []
        for metric in self.metrics:
            if metric.kind == "model":
                continue
            is_timing = metric.kind == "cost" and getattr(metric, "unit", "") == "s"
            rows.extend(self.score(metric, metric_batch, batch, source,
                                   timing if is_timing else None))
        for key, values in explainer.diagnostics().items():
            rows.extend(self.rows.diagnostic(batch.subject(i), source, key, float(values[i]))
                        for i in range(n))
        return rows

    def score(self, metric: Metric, metric_batch: MetricBatch, batch: Batch, source: Source,
              timing: dict[str, Any] | None) -> list[ResultRow]:
        """Rows of one metric on one batch; ``source`` empty for a model-scope metric."""
        n = len(batch)
        try:
            with torch.no_grad():
                scores = metric.score(metric_batch)
            for variant, values in scores.items():
                if tuple(values.shape) != (n,):
                    raise ValueError(f"returned shape {tuple(values.shape)} for variant "
                                     f"{variant!r}; expected ({n},)")
        except Exception as exc:  # noqa: BLE001 - a metric failure is recorded, not fatal
            return [self.rows.metric_failure(
                batch.subject(i), source, metric, metric.row_variant(""),
                f"metric {metric.name!r}: {type(exc).__name__}: {exc}", timing=timing)
                for i in range(n)]
        rows = []
        for key, values in scores.items():
            curves = metric_batch.curves.get((metric.name, key))
            variant = metric.row_variant(key)
            for i in range(n):
                value = float(values[i])
                degenerate = metric.kind == "faithfulness" and bool(metric_batch.degenerate[i])
                curve = None
                if curves is not None:
                    curve = tuple(round(float(v), CURVE_DECIMALS) for v in curves[i])
                if math.isnan(value) and metric.needs_boxes:
                    continue  # no box this metric can use: the image is excluded, not scored
                if math.isfinite(value):
                    rows.append(self.rows.score(batch.subject(i), source, metric, variant, value,
                                                degenerate, curve, timing))
                else:
                    rows.append(self.rows.metric_failure(
                        batch.subject(i), source, metric, variant,
                        f"metric {metric.name!r} gave {value}", degenerate, timing))
        return rows


def provenance(run_name: str, config: RunConfig, profile: str, dataset_hash: str,
               device: torch.device, engine: str) -> dict[str, Any]:
    """The fields every row of a run repeats (docs/protocol.md "Aggregation")."""
    from xbench import PROTOCOL_VERSION

    return dict(run=run_name, protocol=PROTOCOL_VERSION, profile=profile,
                target_rule=config.target_rule, model=config.model, dataset_hash=dataset_hash,
                seed=config.seed, device=device.type, dtype=config.dtype, engine=engine,
                batch_size=config.batch_size, versions=short_versions())


def _batch_index(unit: str) -> int:
    head = unit.split(":", 1)[0]
    try:
        return int(head.removeprefix("batch"))
    except ValueError:
        raise UserError(f"unit {unit!r}: expected batchNNNNNN:data or "
                        f"batchNNNNNN:EXPLAINER:LAYER") from None


@contextlib.contextmanager
def progress_reporter(progress: Callable[..., Any] | None, total: int, rank: int, world: int,
                      run_name: str, folder: RunFolder) -> Iterator[Callable[..., None]]:
    """Yields ``progress(running, done=0)``: the label of the unit now running and the
    weight just finished. On rank 0 only; with several ranks it counts every rank's
    finished units."""
    if progress is None or rank != 0:
        yield lambda running, done=0: None
        return
    with progress(total=total, completed=0, description=run_name) as advance:
        if world == 1:
            yield lambda running, done=0: advance(running, amount=done)
            return
        from xbench import distributed

        def advance_global(running: str, done: float = 0) -> None:
            advance(running, completed=distributed.finished_units(folder, world))

        yield advance_global


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def write_safely(folder: RunFolder, header: RunHeader) -> None:
    """Record the end-of-run header; the rows are safe already, so a failure only warns."""
    try:
        folder.update_header(header)
    except OSError:
        pass


def map_previews(saliency: torch.Tensor, size: int = PREVIEW_SIZE) -> np.ndarray:
    """Normalised maps (B, H, W) as uint8 (B, s, s) previews for reports and galleries."""
    small = F.interpolate(saliency[:, None].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[:, 0]
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def save_previews(writer: RunFolder, unit: str, previews: dict[str, np.ndarray]) -> None:
    """``maps/<unit>.npz`` with arrays ``images`` (ids) and ``maps`` (N, s, s) uint8.

    Written before the unit's rows: a crash in between only leaves a file the resumed run
    overwrites with identical content."""
    path = writer.path / "maps" / (unit.replace(":", "__").replace("/", "_") + ".npz")
    try:
        path.parent.mkdir(exist_ok=True)
        ids = list(previews)
        with path.open("wb") as handle:
            np.savez_compressed(handle, images=np.array(ids), maps=np.stack([previews[i] for i in ids]))
    except OSError as exc:
        raise UserError(f"cannot write maps to {path}: {exc.strerror or exc}. Free space and "
                        "rerun with --resume.") from exc


def append(writer: RunFolder, unit: str, rows: list[ResultRow]) -> None:
    """Append a unit; a full or read-only disk stops the run cleanly (nothing half-counted)."""
    try:
        writer.append_unit(unit, rows)
    except OSError as exc:
        raise UserError(f"cannot write results to {writer.path}: {exc.strerror or exc}. The "
                        f"finished units are safe; free space (or fix permissions) and rerun "
                        f"the same command with --resume.") from exc


def check_maps(name: str, maps: Any, n: int, device: torch.device) -> None:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"explainer {name!r} returned {type(maps).__name__}, expected a tensor")
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ValueError(f"explainer {name!r} returned shape {tuple(maps.shape)}, "
                         f"expected ({n}, h, w)")
    if maps.device != device:
        raise ValueError(f"explainer {name!r} returned maps on {maps.device}, expected {device}")
