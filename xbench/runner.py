"""The runner: scores the explainer x metric matrix on a dataset and records every row.

Work is split into *units*: one batch of images x one (explainer, layer). A unit's rows are
appended durably before the unit is marked finished (see :mod:`xbench.records`), so a run
interrupted at any point resumes with ``--resume`` and ends with the same rows, in the same
order, as an uninterrupted run. Failures (an unreadable image, an explainer or metric that
raises, a wrong-shaped or non-finite map) are recorded as rows and never stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xbench import PROTOCOL_VERSION, __version__
from xbench.base import ExplainAgain, Explainer, Metric, MetricBatch
from xbench.boxes import input_boxes
from xbench.data import Dataset, ImageItem, load_image, open_dataset
from xbench.engine import ENGINES, auto_engine
from xbench.environment import environment, resolve_device, short_versions, tune_allocator
from xbench.errors import UserError
from xbench.guard import no_leaked_hooks, time_limit
from xbench.model import ClassifierHandle, block_layers, masked_batch_size
from xbench.plugins import Registry
from xbench.profiles import plugin_options, profile_names
from xbench.records import SCHEMA_VERSION, ResultRow, RunFolder, RunHeader
from xbench.saliency import normalize_maps
from xbench.timing import Stopwatch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RULES = ("predicted", "label")
CURVE_DECIMALS = 6
PREVIEW_SIZE = 56


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the rows of a run (the resolved form goes into run.json)."""

    explainers: str = "all"
    metrics: str = "all"
    model: str = "efficientnet-lite0"
    data: str = "sample"
    labels: str | None = None
    #: object boxes file (xbench.boxes); None: found beside the data, if any
    boxes: str | None = None
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int = 8
    profile: str = "auto"
    layers: str | None = None
    weights: str | None = None
    target_rule: str = "predicted"
    channels_last: bool = True
    #: engine of the hook-free forwards (xbench.engine): auto, eager, onnxruntime or compiled
    engine: str = "auto"
    options: tuple[str, ...] = ()
    checkpoint: str | None = None
    member: str | None = None
    #: seconds an explainer may spend per image before the image is recorded as failed
    timeout: float | None = None
    #: keep a small uint8 preview of every normalised map under maps/ (reports, galleries)
    save_maps: bool = True


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
        if row.status == "ok":
            continue
        if row.explainer == "" and row.metric in ("", "confidence"):
            images += 1
        else:
            cells += 1
        key = (row.explainer, row.layer, row.error.replace(row.image, "<image>"))
        groups[key] += 1
        first.setdefault(key, row.error)
    reasons = [(count, key[0], key[1], first[key]) for key, count in groups.most_common(top)]
    return cells, images, reasons


def split_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """['rise.n_masks=1000', ...] -> {'rise': {'n_masks': '1000'}}, values still text."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, sep, raw = item.partition("=")
        plugin, dot, key = head.partition(".")
        if not sep or not dot or not plugin or not key:
            raise UserError(f"--option {item!r}: expected PLUGIN.KEY=VALUE, e.g. rise.n_masks=1000")
        out.setdefault(plugin, {})[key] = raw
    return out


def _declares(cls: type, option: str) -> bool:
    return any(spec.name == option for spec in cls.option_specs())


def command_line_options(config: RunConfig, classes: dict[str, type]) -> dict[str, dict[str, Any]]:
    """The run's ``-o`` options and ``--checkpoint/--member/--weights`` aliases, converted by
    each plugin's declared types and checked, before anything is loaded.

    ``classes``: {plugin name: class} of the selected explainers, metrics and the model.
    """
    out: dict[str, dict[str, Any]] = {}
    for plugin, values in split_options(config.options).items():
        if plugin not in classes:
            from xbench.errors import did_you_mean

            raise UserError(f"--option {plugin}.*: {plugin!r} is not a selected explainer, "
                            f"metric or the model.{did_you_mean(plugin, classes)}")
        out[plugin] = {key: classes[plugin].parse_option(key, raw) for key, raw in values.items()}
    model = classes[config.model]
    if config.checkpoint:
        takers = [name for name, cls in classes.items() if _declares(cls, "checkpoint")]
        if not takers:
            raise UserError(f"--checkpoint: none of the selected plugins ({', '.join(classes)}) "
                            "takes a checkpoint; select one that does (see 'xbench plugins NAME')")
        for name in takers:
            out.setdefault(name, {}).setdefault("checkpoint", config.checkpoint)
    if config.member is not None:
        if not _declares(model, "member"):
            raise UserError(f"--member: model {config.model!r} has no members")
        out.setdefault(config.model, {})["member"] = model.parse_option("member", config.member)
    if config.weights is not None:
        out.setdefault(config.model, {})["weights"] = config.weights
    return out


def _instantiate(kind: str, cls: type, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{kind} {cls.name!r}: bad options {kwargs}: {exc}") from exc
    except ValueError as exc:
        raise UserError(f"{kind} {cls.name!r}: {exc}") from exc


class Runner:
    """Builds everything a run needs from a RunConfig and executes the matrix."""

    def __init__(self, config: RunConfig, registry: Registry, out: Path, name: str | None = None,
                 progress: Callable[..., Any] | None = None) -> None:
        self.config = config
        self.registry = registry
        if config.target_rule not in TARGET_RULES:
            raise UserError(f"--target {config.target_rule!r}: choose one of {TARGET_RULES}")
        if config.dtype not in DTYPES:
            raise UserError(f"--dtype {config.dtype!r}: choose one of {sorted(DTYPES)}")
        if config.engine not in ENGINES:
            raise UserError(f"--engine {config.engine!r}: choose one of {', '.join(ENGINES)}")
        if config.engine == "onnxruntime" and config.dtype != "fp32":
            raise UserError(f"--engine onnxruntime runs fp32 forwards, not --dtype "
                            f"{config.dtype}: use --engine eager or compiled with it")
        if config.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {config.batch_size}")
        self.explainer_names = registry.select("explainer", config.explainers)
        self.metric_names = select_metrics(registry, config.metrics)
        if config.metrics == "all":  # model-scope and opt-in metrics: they cost many passes
            self.metric_names = [name for name in self.metric_names
                                 if registry.metric(name).kind != "model"
                                 and not getattr(registry.metric(name), "opt_in", False)]
        self.classes: dict[str, type] = {
            **{name: registry.explainer(name) for name in self.explainer_names},
            **{name: registry.metric(name) for name in self.metric_names},
            config.model: registry.model(config.model)}
        self.cli_options = command_line_options(config, self.classes)
        self.dataset = open_dataset(config.data, config.labels, config.boxes).subset(
            config.limit, config.seed)
        self.metric_names = self._box_metrics(self.metric_names)
        self.profile = self._resolve_profile()
        self.device = resolve_device(config.device)
        for plugin, cls in self.classes.items():  # profile values too, before any loading
            cls.make_options(self._options_for(plugin))
        self.run_name = name or self._default_name()
        self.folder = RunFolder(out / self.run_name)
        inside = Path(os.path.normpath(self.folder.path))
        if Path(self.run_name).is_absolute() or inside.parent != Path(os.path.normpath(out)):
            raise UserError(f"--name {self.run_name!r}: a run name is one folder name inside "
                            f"--out {out} (no '/', '..' or absolute path); use --out to choose "
                            f"where runs go.")
        self.progress = progress

    # -- set-up -------------------------------------------------------------------------

    def _box_metrics(self, names: list[str]) -> list[str]:
        """Metrics that read boxes need a dataset with boxes: left out of ``all`` (and of a
        family) without them, an error when named."""
        if self.dataset.boxes is not None:
            return names
        named = set(self.config.metrics.replace(" ", "").split(","))
        needing = [n for n in names if self.registry.metric(n).needs_boxes]
        asked = [n for n in needing
                 if n in named or self.registry.metric(n).metric_family() in named]
        if asked:
            raise UserError(f"--metrics {', '.join(asked)}: needs "
                            f"object boxes, and --data {self.config.data} has none; pass --boxes "
                            "FILE (file,width,height,x0,y0,x1,y1 CSV, LOC_val_solution.csv or the "
                            "ILSVRC2012_bbox_val_v3 folder) or put <folder>_boxes.csv beside it")
        return [n for n in names if n not in needing]

    def _resolve_profile(self) -> str:
        profile = self.config.profile
        if profile == "auto":
            return "quick" if self.dataset.layout == "embedded" else "paper"
        known = profile_names(list(self.registry_classes()))
        if profile not in known:
            raise UserError(f"--profile {profile!r}: choose one of {', '.join(known)} or auto")
        return profile

    def _default_name(self) -> str:
        parts = [self.config.model, self.dataset.name, self.profile]
        if self.config.limit is not None:
            parts.append(f"n{self.config.limit}-s{self.config.seed}")
        return "_".join(parts)

    def registry_classes(self) -> list[type]:
        return [info.cls for table in self.registry.entries.values() for info in table.values()]

    def _options_for(self, plugin: str) -> dict[str, Any]:
        """The plugin's options for this run: its profile values, then the command line's."""
        options = plugin_options(self.profile, self.classes[plugin])
        options.update(self.cli_options.get(plugin, {}))
        return options

    def _load_model(self) -> ClassifierHandle:
        cls = self.classes[self.config.model]
        model = _instantiate("model", cls, **self._options_for(self.config.model))
        loaded = model.load()
        return ClassifierHandle(loaded, self.device, channels_last=self.config.channels_last,
                                name=self.config.model)

    def _layers(self, handle: ClassifierHandle) -> list[str]:
        spec = self.config.layers
        if spec in (None, "", "last"):
            layers = [handle.default_layer]
        elif spec == "all":
            layers = block_layers(handle)
        else:
            layers = [s.strip() for s in spec.split(",") if s.strip()]
        if any(self.registry.explainer(name).uses_layer for name in self.explainer_names):
            for layer in layers:  # before any set-up: unknown names, layers with no spatial map
                handle.layer(layer)
        return layers

    def _explainers(self, layers: list[str]) -> list[tuple[str, Explainer]]:
        out = []
        for name in self.explainer_names:
            cls = self.registry.explainer(name)
            options = self._options_for(name)
            for layer in (layers if cls.uses_layer else ["-"]):
                instance = _instantiate("explainer", cls, layer=None if layer == "-" else layer,
                                        seed=self.config.seed, **options)
                out.append((layer, instance))
        return out

    def _metrics(self) -> list[Metric]:
        return [_instantiate("metric", self.classes[name], **self._options_for(name))
                for name in self.metric_names]

    def resolved_config(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.config)
        config.update(explainers=self.explainer_names, metrics=self.metric_names,
                      profile=self.profile, options=list(self.config.options),
                      plugin_options={name: self._options_for(name)
                                      for name in [*self.explainer_names, *self.metric_names]})
        return config

    def _header(self, handle: ClassifierHandle, units_total: int,
                layers: list[str] | None = None) -> RunHeader:
        loaded = handle.loaded
        return RunHeader(
            schema_version=SCHEMA_VERSION, run_name=self.run_name, xbench_version=__version__,
            protocol=PROTOCOL_VERSION, profile=self.profile, config=self.resolved_config(),
            model={"name": self.config.model, "weights": loaded.weights,
                   "input_size": loaded.input_size, "resize_size": loaded.resize_size,
                   "mean": list(loaded.mean), "std": list(loaded.std),
                   "default_layer": loaded.default_layer,
                   # whether each target layer's output is an activation's (docs/protocol.md)
                   "layer_kinds": {layer: handle.layer_kind(layer)
                                   for layer in (layers or [loaded.default_layer])},
                   "split_call_sites": handle.call_sites},
            dataset={"name": self.dataset.name, "layout": self.dataset.layout,
                     "root": self.dataset.root, "images": len(self.dataset.items),
                     "subset_hash": self.dataset.subset_hash, "limit": self.config.limit,
                     "seed": self.config.seed,
                     "boxes": None if self.dataset.boxes is None else {
                         "source": self.dataset.boxes.source,
                         "layout": self.dataset.boxes.layout}},
            environment=environment(self.device), plugins=self.registry.versions(),
            units_total=units_total,
        )

    # -- execution ----------------------------------------------------------------------

    def batches(self) -> list[tuple[int, tuple[ImageItem, ...]]]:
        items = self.dataset.items
        size = self.config.batch_size
        return [(b, items[i:i + size]) for b, i in enumerate(range(0, len(items), size))]

    def run(self, resume: bool = False, overwrite: bool = False,
            shard: tuple[int, int] = (0, 1)) -> RunSummary:
        """Execute (or finish) the run.

        ``shard`` = (rank, world size): this process takes every world-th batch and writes its
        rows to ``shards/rankNNN/``; after a barrier rank 0 merges the shards, in the order a
        single process would have written them, into the run folder (xbench.distributed).
        """
        from xbench import distributed

        rank, world = shard
        tune_allocator()
        torch.manual_seed(self.config.seed)
        writer = self.folder if world == 1 else self.folder.shard(rank)
        # Before anything slow: an unwritable --out fails at once, and the lock is taken before
        # the folder's state is read, so a second run started meanwhile cannot also find it free.
        writer.probe_writable()
        writer.acquire_lock()
        try:
            summary = self._run_locked(writer, resume, overwrite, rank, world)
        finally:
            writer.release_lock()
        distributed.barrier(world)
        if world > 1 and rank == 0:
            distributed.merge_shards(self.folder, world, summary.unit_order)
        if rank == 0:
            summary.count_failures()
        return summary

    def _run_locked(self, writer: RunFolder, resume: bool, overwrite: bool, rank: int,
                    world: int) -> RunSummary:
        from xbench import distributed

        self._check_folder(resume, overwrite)
        load_start = _load_average()
        handle = self._load_model()
        layers = self._layers(handle)
        explainers = self._explainers(layers)
        metrics = self._metrics()
        batches = self.batches()
        units_total = len(batches) * (1 + len(explainers))
        header = dataclasses.replace(self._header(handle, units_total, layers), world_size=world,
                                     host_load={"cores": os.cpu_count(), "start": load_start})
        engine = self._start_engine(handle)
        header = dataclasses.replace(header, environment={**header.environment, "engine": engine})
        if resume and self.folder.exists():
            self._check_same_run(header)
        distributed.barrier(world)  # every rank has checked the folder before anyone writes
        if resume and writer.exists():
            done = writer.completed_units()
            stored = self.folder.header()
        else:
            if world == 1:  # (a sharded run's ranks have their lock files under shards/ now)
                self.folder.clear_outputs()  # --overwrite: nothing of the old run survives
            if rank == 0 and world > 1:
                self.folder.write_header(header)
            writer.write_header(header)
            done, stored = {}, header
        order = [unit for index, _ in batches
                 for unit in [self._data_unit(index)]
                 + [self._unit(index, e, layer) for layer, e in explainers]]
        summary = RunSummary(self.folder, header, 0, len(done), 0, 0, unit_order=order)
        self._warm_up(handle, explainers)
        mine = [b for b in batches if b[0] % world == rank]
        weights = self._unit_weights(handle, explainers)
        if world > 1:
            progress_total = units_total
        else:
            progress_total = len(mine) * sum(weights.values())
        with self._progress(progress_total, rank, world) as progress:
            for index, items in mine:
                self._run_batch(handle, index, items, explainers, metrics, done, summary,
                                writer, progress, weights)
        host_load = {**header.host_load, "end": _load_average()}
        summary.header = dataclasses.replace(header, host_load=host_load)
        if world == 1 or rank == 0:
            _write_safely(self.folder, dataclasses.replace(stored, host_load=host_load))
        return summary

    def _check_folder(self, resume: bool, overwrite: bool) -> None:
        if not self.folder.exists() or overwrite:
            return
        if not resume:
            raise UserError(
                f"{self.folder.path} already holds a run. Use --resume to finish it (finished "
                f"units are kept), --overwrite to start again, or --name/--out for a new run.")

    def _check_same_run(self, header: RunHeader) -> None:
        old = self.folder.header()
        ignore = {"device"}  # 'auto' may resolve differently; the resolved device is below
        # settings added after a run was started: runs from before engines existed ran eager
        defaults = {**dataclasses.asdict(RunConfig()), "engine": "eager"}
        mismatched = sorted(k for k in set(old.config) | set(header.config)
                            if k not in ignore
                            and old.config.get(k, defaults.get(k)) != header.config.get(k))
        if old.dataset.get("subset_hash") != header.dataset["subset_hash"]:
            mismatched.append("dataset (subset hash)")
        if old.environment.get("device") != header.environment["device"]:
            mismatched.append("device")
        if old.environment.get("engine", {"name": "eager"})["name"] != \
                header.environment["engine"]["name"]:
            mismatched.append("engine (as resolved)")
        if mismatched:
            raise UserError(f"--resume: {self.folder.path} was started with different settings "
                            f"({', '.join(mismatched)}); resume with the original command or use "
                            f"--overwrite / a new --name.")

    def _warm_up(self, handle: ClassifierHandle, explainers: list[tuple[str, Explainer]]) -> None:
        """One forward+backward at the run's batch shape (kernel selection, allocator) and each
        explainer's one-time set-up, so that neither is billed to the first timed explainer
        (docs/protocol.md "Cost")."""
        size = handle.input_size
        batch = max(1, min(self.config.batch_size, len(self.dataset.items)))
        x = torch.rand(batch, 3, size, size, device=self.device, requires_grad=True)
        with torch.enable_grad():
            handle(x).max().backward()
        shape = (3, size, size)
        for _, explainer in explainers:
            explainer.prepare(handle, shape)
        handle.zero_grad(set_to_none=True)

    def _unit_weights(self, handle: ClassifierHandle,
                      explainers: list[tuple[str, Explainer]]) -> dict[str, int]:
        """Expected forward passes of each unit of a batch (unit label -> passes), known before
        it runs: the data unit classifies each image once; an explainer unit costs its
        explainer's passes per image plus one per metric (so a RISE unit weighs hundreds of
        Grad-CAM units in the progress and its ETA)."""
        per_metric = len(self.metric_names)
        weights = {"images": self.config.batch_size}
        for layer, explainer in explainers:
            passes = explainer.expected_forward_passes(handle)
            weights[_label(explainer, layer)] = self.config.batch_size * (passes + per_metric)
        return weights

    @contextlib.contextmanager
    def _progress(self, total: int, rank: int, world: int) -> Iterator[Callable[..., None]]:
        """Yields ``progress(running, done=0)``: the label of the unit now running and the
        weight just finished. On rank 0 only; with several ranks it counts every rank's
        finished units."""
        if self.progress is None or rank != 0:
            yield lambda running, done=0: None
            return
        with self.progress(total=total, completed=0, description=self.run_name) as advance:
            if world == 1:
                yield lambda running, done=0: advance(running, amount=done)
                return
            from xbench import distributed

            def advance_global(running: str, done: float = 0) -> None:
                advance(running, completed=distributed.finished_units(self.folder, world))

            yield advance_global

    def _start_engine(self, handle: ClassifierHandle) -> dict[str, Any]:
        """Switch ``handle`` to the configured engine (xbench.engine); what it did, for the
        header. ``auto`` falls back to eager, with the reason, when its engine cannot run the
        model; an engine asked for by name raises instead."""
        name, reason = self.config.engine, "asked for"
        if name == "auto":
            name, reason = auto_engine(self.device, self.config.dtype)
        try:
            engine = handle.use_engine(name, masked_batch_size(self.device), self._autocast())
        except UserError as exc:
            if self.config.engine != "auto":
                raise
            return {"name": "eager", "reason": f"auto: eager, {name} failed: {exc}"}
        return {"name": name, "reason": reason, **(engine.describe() if engine else {})}

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = DTYPES[self.config.dtype]
        return (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())

    def _base_row(self, handle: ClassifierHandle) -> dict[str, Any]:
        return dict(run=self.run_name, protocol=PROTOCOL_VERSION, profile=self.profile,
                    target_rule=self.config.target_rule, model=self.config.model,
                    dataset_hash=self.dataset.subset_hash, seed=self.config.seed,
                    device=self.device.type, dtype=self.config.dtype, engine=handle.engine,
                    batch_size=self.config.batch_size, versions=short_versions())

    def _run_batch(self, handle: ClassifierHandle, index: int, items: tuple[ImageItem, ...],
                   explainers: list[tuple[str, Explainer]], metrics: list[Metric],
                   done: dict[str, int], summary: RunSummary, writer: RunFolder,
                   progress: Callable[..., None], weights: dict[str, int]) -> None:
        base = self._base_row(handle)
        data_unit = self._data_unit(index)
        pending = [(layer, e) for layer, e in explainers
                   if self._unit(index, e, layer) not in done]
        if data_unit in done and not pending:
            progress("skipped (done)", sum(weights.values()))
            return
        progress(f"batch {index}: images")
        loaded, data_rows = self._load_batch(handle, items, base)
        if data_unit not in done:
            data_rows += self._score_model(handle, loaded, metrics, base)
            _append(writer, data_unit, data_rows)
            summary.units_done += 1
            summary.failed_images += sum(r.status != "ok" for r in data_rows)
        progress(f"batch {index}: images", weights["images"])
        for layer, explainer in explainers:
            unit = self._unit(index, explainer, layer)
            label = _label(explainer, layer)
            if unit in done:
                progress("skipped (done)", weights[label])
                continue
            progress(f"batch {index}: {label}")
            previews: dict[str, np.ndarray] = {}
            rows = self._explain_unit(handle, loaded, explainer, layer,
                                      [m for m in metrics if m.kind != "model"], base, previews)
            if self.config.save_maps and previews:
                _save_previews(writer, unit, previews)
            _append(writer, unit, rows)
            summary.units_done += 1
            summary.failed_cells += sum(r.status != "ok" for r in rows)
            progress(f"batch {index}: {label}", weights[label])

    def _score_model(self, handle: ClassifierHandle, batch: dict[str, Any] | None,
                     metrics: list[Metric], base: dict[str, Any]) -> list[ResultRow]:
        """Rows of the model-scope metrics on one batch (explainer ''), part of its data unit."""
        model_metrics = [m for m in metrics if m.kind == "model"]
        if batch is None or not model_metrics:
            return []
        metric_batch = MetricBatch(
            model=handle, images=batch["images"], targets=batch["targets"], saliency=None,
            degenerate=None, clean_probs=batch["clean_probs"], explain_forward=None,
            explain_backward=None, explain_seconds=None)
        rows: list[ResultRow] = []
        for metric in model_metrics:
            rows.extend(self._score(metric, metric_batch, batch, None, "", base))
        return rows

    @staticmethod
    def _data_unit(index: int) -> str:
        return f"batch{index:06d}:data"

    @staticmethod
    def _unit(index: int, explainer: Explainer, layer: str) -> str:
        return f"batch{index:06d}:{explainer.name}:{layer}"

    def _load_batch(self, handle: ClassifierHandle, items: tuple[ImageItem, ...],
                    base: dict[str, Any]) -> tuple[dict[str, Any] | None, list[ResultRow]]:
        """Read and classify a batch: (tensors of the usable images, one row per image)."""
        loaded = handle.loaded
        tensors, good, rows_by_item = [], [], {}
        for position, item in enumerate(items):
            try:
                tensors.append(load_image(item.path, loaded.resize_size, loaded.input_size))
                good.append(position)
            except Exception as exc:  # noqa: BLE001 - any decoder error is this file's failure
                rows_by_item[position] = self._row(base, item, None, None, "", "", "",
                                                   "confidence", "", "higher", None, "failed",
                                                   error=f"cannot read {item.path}: "
                                                         f"{type(exc).__name__}: {exc}")
        if not good:
            return None, [rows_by_item[p] for p in sorted(rows_by_item)]
        images = torch.stack(tensors).to(self.device)
        probs = handle.probabilities(images, batch_size=self.config.batch_size).float()
        predicted = probs.argmax(dim=1)
        keep, targets = [], []
        for row_index, position in enumerate(good):
            item = items[position]
            pred = int(predicted[row_index])
            target = pred if self.config.target_rule == "predicted" else item.label
            if target is None:
                rows_by_item[position] = self._row(
                    base, item, pred, None, "", "", "", "confidence", "", "higher", None,
                    "failed", error=f"{item.id}: no label, needed by --target label")
                continue
            keep.append(row_index)
            targets.append(target)
            rows_by_item[position] = self._row(base, item, pred, target, "", "", "",
                                               "confidence", "", "higher",
                                               float(probs[row_index, target]))
        rows = [rows_by_item[p] for p in sorted(rows_by_item)]
        if not keep:
            return None, rows
        keep_t = torch.tensor(keep, device=self.device)
        target_t = torch.tensor(targets, device=self.device)
        batch = {"items": [items[good[k]] for k in keep], "images": images[keep_t],
                 "targets": target_t, "predicted": predicted[keep_t],
                 "clean_probs": probs[keep_t].gather(1, target_t[:, None])[:, 0]}
        if self.dataset.boxes is not None:
            batch["boxes"] = [self._boxes(item, loaded) for item in batch["items"]]
        return batch, rows

    def _boxes(self, item: ImageItem, loaded: Any) -> torch.Tensor:
        """The item's boxes in input pixels ((0, 5) when it has none), xbench.boxes."""
        found = self.dataset.boxes.get(item.id)
        if found is None:
            return torch.zeros(0, 5, dtype=torch.long)
        with Image.open(item.path) as image:  # the header only: the stored size
            size = image.size
        return input_boxes(found, size, loaded.resize_size, loaded.input_size, item.label)

    def _row(self, base: dict[str, Any], item: ImageItem, predicted: int | None,
             target: int | None, explainer: str, explainer_variant: str, layer: str,
             metric: str, variant: str, direction: str,
             value: float | None, status: str = "ok", error: str = "", degenerate: bool = False,
             curve: tuple[float, ...] | None = None) -> ResultRow:
        return ResultRow(image=item.id, index=self._index[item.id], label=item.label, predicted=predicted,
                         target=target, explainer=explainer, explainer_variant=explainer_variant,
                         layer=layer, metric=metric, variant=variant, direction=direction,
                         value=value, status=status, degenerate=degenerate, error=error,
                         curve=curve, **base)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        """Position of each image in the (sub)dataset, recorded in its rows."""
        return {item.id: i for i, item in enumerate(self.dataset.items)}

    def _explain_unit(self, handle: ClassifierHandle, batch: dict[str, Any] | None,
                      explainer: Explainer, layer: str, metrics: list[Metric],
                      base: dict[str, Any], previews: dict[str, np.ndarray]) -> list[ResultRow]:
        """Rows of one unit; the normalised maps go into ``previews`` (image id -> uint8)."""
        if batch is None:
            return []
        try:
            return self._explain_and_score(handle, batch, explainer, layer, metrics, base,
                                           previews)
        except Exception as exc:  # noqa: BLE001 - a plugin failure is recorded, not fatal
            if len(batch["items"]) == 1:
                item = batch["items"][0]
                return [self._row(base, item, int(batch["predicted"][0]),
                                  int(batch["targets"][0]), explainer.name, explainer.variant,
                                  layer, "", "", "", None, "failed",
                                  error=f"explainer {explainer.name!r} on {item.id}: "
                                        f"{type(exc).__name__}: {exc}")]
        # Retry image by image, so one bad image does not cost the whole batch its scores.
        rows = []
        for i in range(len(batch["items"])):
            single = {k: (v[i:i + 1]) for k, v in batch.items()}  # lists too (boxes)
            rows.extend(self._explain_unit(handle, single, explainer, layer, metrics, base,
                                           previews))
        return rows

    def _explain_and_score(self, handle: ClassifierHandle, batch: dict[str, Any],
                           explainer: Explainer, layer: str, metrics: list[Metric],
                           base: dict[str, Any], previews: dict[str, np.ndarray]) -> list[ResultRow]:
        images, targets, items = batch["images"], batch["targets"], batch["items"]
        n = len(items)
        grad_mode = torch.enable_grad() if explainer.needs_gradients else torch.no_grad()
        autocast = self._autocast()
        limit = None if self.config.timeout is None else self.config.timeout * n
        with no_leaked_hooks(handle, explainer.name), time_limit(limit, explainer.name), \
                handle.counting() as counts, Stopwatch(self.device) as watch, grad_mode, autocast:
            maps = explainer.explain(handle, images, targets)
        _check_maps(explainer.name, maps, n, handle.device)
        handle.zero_grad(set_to_none=True)
        saliency, degenerate = normalize_maps(maps, (images.shape[-2], images.shape[-1]))
        previews.update(zip((item.id for item in items), map_previews(saliency)))
        per_image = lambda total: torch.full((n,), total / n, dtype=torch.float64)  # noqa: E731
        metric_batch = MetricBatch(
            model=handle, images=images, targets=targets, saliency=saliency,
            degenerate=degenerate, clean_probs=batch["clean_probs"],
            explain_forward=per_image(counts["forward"]),
            explain_backward=per_image(counts["backward"]),
            explain_seconds=per_image(watch.seconds), boxes=batch.get("boxes"),
            explain=ExplainAgain(explainer, handle, self._autocast))
        # a timing metric's rows keep the batch's time (their value is its per-image share);
        # other rows stay free of timings, so they are reproducible byte for byte
        timed = {**base, "batch_seconds": watch.seconds, "batch_images": n}
        rows: list[ResultRow] = []
        for metric in metrics:
            is_timing = metric.kind == "cost" and getattr(metric, "unit", "") == "s"
            rows.extend(self._score(metric, metric_batch, batch, explainer, layer,
                                    timed if is_timing else base))
        for key, values in explainer.diagnostics().items():
            rows.extend(self._row(base, item, int(batch["predicted"][i]), int(batch["targets"][i]),
                                  explainer.name, explainer.variant, layer,
                                  f"{explainer.name}:{key}", "", "", float(values[i]))
                        for i, item in enumerate(items))
        return rows

    def _score(self, metric: Metric, metric_batch: MetricBatch, batch: dict[str, Any],
               explainer: Explainer | None, layer: str, base: dict[str, Any]) -> list[ResultRow]:
        """Rows of one metric on one batch; ``explainer`` None for a model-scope metric."""
        items = batch["items"]
        common = lambda i: dict(  # noqa: E731
            base=base, item=items[i], predicted=int(batch["predicted"][i]),
            target=int(batch["targets"][i]), explainer=explainer.name if explainer else "",
            explainer_variant=explainer.variant if explainer else "", layer=layer,
            metric=metric.name, direction=metric.direction)
        try:
            with torch.no_grad():
                scores = metric.score(metric_batch)
            for variant, values in scores.items():
                if tuple(values.shape) != (len(items),):
                    raise ValueError(f"returned shape {tuple(values.shape)} for variant "
                                     f"{variant!r}; expected ({len(items)},)")
        except Exception as exc:  # noqa: BLE001 - a metric failure is recorded, not fatal
            return [self._row(**common(i), variant=metric.row_variant(""), value=None, status="failed",
                              error=f"metric {metric.name!r}: {type(exc).__name__}: {exc}")
                    for i in range(len(items))]
        rows = []
        for key, values in scores.items():
            curves = metric_batch.curves.get((metric.name, key))
            variant = metric.row_variant(key)
            for i in range(len(items)):
                value = float(values[i])
                degenerate = metric.kind == "faithfulness" and bool(metric_batch.degenerate[i])
                curve = None
                if curves is not None:
                    curve = tuple(round(float(v), CURVE_DECIMALS) for v in curves[i])
                if math.isnan(value) and metric.needs_boxes:
                    continue  # no box this metric can use: the image is excluded, not scored
                if math.isfinite(value):
                    rows.append(self._row(**common(i), variant=variant, value=value,
                                          degenerate=degenerate, curve=curve))
                else:
                    rows.append(self._row(**common(i), variant=variant, value=None,
                                          status="failed", degenerate=degenerate,
                                          error=f"metric {metric.name!r} gave {value}"))
        return rows


def _label(explainer: Explainer, layer: str) -> str:
    return explainer.name if layer == "-" else f"{explainer.name} @{layer}"


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _write_safely(folder: RunFolder, header: RunHeader) -> None:
    """Record the end-of-run header; the rows are safe already, so a failure only warns."""
    try:
        folder.update_header(header)
    except OSError:
        pass


def select_metrics(registry: Registry, spec: str) -> list[str]:
    """``--metrics``: 'all', or names and family names (``localisation``, ``complexity``,
    ``faithfulness``, ``cost``, ``model``; a family expands to its metrics in registry order)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return registry.select("metric", "all")
    metrics = registry.names("metric")
    families: dict[str, list[str]] = {}
    for name in metrics:
        families.setdefault(registry.metric(name).metric_family(), []).append(name)
    out: list[str] = []
    for name in names:
        if name in metrics:
            chosen = [name]
        elif name in families:
            chosen = families[name]
        else:
            chosen = registry.select("metric", [name])  # raises, with "did you mean"
        out.extend(n for n in chosen if n not in out)
    return out


def map_previews(saliency: torch.Tensor, size: int = PREVIEW_SIZE) -> np.ndarray:
    """Normalised maps (B, H, W) as uint8 (B, s, s) previews for reports and galleries."""
    small = F.interpolate(saliency[:, None].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[:, 0]
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _save_previews(writer: RunFolder, unit: str, previews: dict[str, np.ndarray]) -> None:
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


def _append(writer: RunFolder, unit: str, rows: list[ResultRow]) -> None:
    """Append a unit; a full or read-only disk stops the run cleanly (nothing half-counted)."""
    try:
        writer.append_unit(unit, rows)
    except OSError as exc:
        raise UserError(f"cannot write results to {writer.path}: {exc.strerror or exc}. The "
                        f"finished units are safe; free space (or fix permissions) and rerun "
                        f"the same command with --resume.") from exc


def _check_maps(name: str, maps: Any, n: int, device: torch.device) -> None:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"explainer {name!r} returned {type(maps).__name__}, expected a tensor")
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ValueError(f"explainer {name!r} returned shape {tuple(maps.shape)}, "
                         f"expected ({n}, h, w)")
    if maps.device != device:
        raise ValueError(f"explainer {name!r} returned maps on {maps.device}, expected {device}")
