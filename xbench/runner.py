"""The runner: scores the explainer x metric matrix on a dataset and records every row.

It wires the three parts of a run together:

- :mod:`xbench.plan`: RunConfig -> RunSelection (plugins, options, dataset; checked before
  anything loads) -> RunPlan (layers, units, header, expected passes);
- :mod:`xbench.execute`: the unit loop with its guards, engine, warm-up, retries, previews,
  disk errors and the distributed merge;
- :mod:`xbench.rows`: one row constructor per row kind.

Work is split into *units*: one batch of images x one (explainer, layer). A unit's rows are
appended durably before the unit is marked finished (see :mod:`xbench.records`), so a run
interrupted at any point resumes with ``--resume`` and ends with the same rows, in the same
order, as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xbench.base import Explainer, Metric
from xbench.environment import environment, tune_allocator
from xbench.errors import UserError
from xbench.execute import (Execution, RunSummary, failure_report, load_average, map_previews,
                            progress_reporter, provenance, start_engine, warm_up, write_safely)
from xbench.model import ClassifierHandle
from xbench.plan import (DTYPES, NO_LAYER, TARGET_RULES, ModelFacts, RunConfig, RunPlan,
                         RunSelection, command_line_options, instantiate, select_metrics,
                         split_options)
from xbench.records import ResultRow, RunFolder, RunHeader

__all__ = ["DTYPES", "TARGET_RULES", "RunConfig", "RunSummary", "Runner", "command_line_options",
           "failure_report", "map_previews", "select_metrics", "split_options"]


class Runner:
    """Builds everything a run needs from a RunConfig and executes the matrix.

    The constructor checks the config (plugins, options, data, output name) without loading
    a model; :meth:`run` writes the run, :meth:`plan` lays it out, :meth:`compute_units`
    recomputes chosen units without writing."""

    def __init__(self, config: RunConfig, registry: Any, out: Path, name: str | None = None,
                 progress: Callable[..., Any] | None = None) -> None:
        self.selection = RunSelection(config, registry, out, name)
        self.config = config
        self.registry = registry
        self.progress = progress

    # the selection's resolved names, as callers (CLI, API, tests) read them
    explainer_names = property(lambda self: self.selection.explainer_names)
    metric_names = property(lambda self: self.selection.metric_names)
    classes = property(lambda self: self.selection.classes)
    cli_options = property(lambda self: self.selection.cli_options)
    dataset = property(lambda self: self.selection.dataset)
    profile = property(lambda self: self.selection.profile)
    device = property(lambda self: self.selection.device)
    run_name = property(lambda self: self.selection.run_name)
    folder = property(lambda self: self.selection.folder)

    def resolved_config(self) -> dict[str, Any]:
        return self.selection.resolved_config()

    # -- set-up -------------------------------------------------------------------------

    def _load_model(self) -> ClassifierHandle:
        cls = self.classes[self.config.model]
        model = instantiate("model", cls, **self.selection.options_for(self.config.model))
        return ClassifierHandle(model.load(), self.device, channels_last=self.config.channels_last,
                                name=self.config.model)

    def _start_engine(self, handle: ClassifierHandle) -> dict[str, Any]:
        return start_engine(handle, self.config, self.device)

    def _plan(self, handle: ClassifierHandle) -> RunPlan:
        """The run's plan on the loaded model; its layers checked first (unknown names,
        layers without a spatial map), before any set-up."""
        plan = RunPlan.build(self.selection, ModelFacts.of(handle))
        if any(self.registry.explainer(name).uses_layer for name in self.explainer_names):
            for layer in plan.layers:
                handle.layer(layer)
        return plan

    def plan(self) -> RunPlan:
        """Load the model and lay the run out (nothing is explained or written)."""
        return self._plan(self._load_model())

    def dry_run(self, probe: bool = True) -> str:
        """The plan with its passes and, with ``probe``, a wall-time estimate from a short
        throughput probe of the model on the run's engine (xbench.dry_run); writes nothing."""
        from xbench.dry_run import describe, probe_throughput

        handle = self._load_model()
        plan = self._plan(handle)
        throughput = None
        if probe:
            self._start_engine(handle)
            throughput = probe_throughput(handle, self.config.batch_size)
        return describe(plan, throughput)

    def _explainers(self, layers: list[str]) -> list[tuple[str, Explainer]]:
        out = []
        for name in self.explainer_names:
            cls = self.registry.explainer(name)
            options = self.selection.options_for(name)
            for layer in (layers if cls.uses_layer else [NO_LAYER]):
                instance = instantiate("explainer", cls, layer=None if layer == NO_LAYER else layer,
                                       seed=self.config.seed, **options)
                out.append((layer, instance))
        return out

    def _metrics(self) -> list[Metric]:
        return [instantiate("metric", self.classes[name], **self.selection.options_for(name))
                for name in self.metric_names]

    def _execution(self, handle: ClassifierHandle, plugins: tuple[list, list]) -> Execution:
        """The unit loop's state, once the engine runs (the rows record its name)."""
        explainers, metrics = plugins
        return Execution(self.config, self.dataset, self.run_name, handle, explainers, metrics,
                         provenance(self.run_name, self.config, self.profile,
                                    self.dataset.subset_hash, self.device, handle.engine))

    def _warm_up(self, execution: Execution) -> None:
        batch = max(1, min(self.config.batch_size, len(self.dataset.items)))
        warm_up(execution.handle, batch, execution.explainers)

    # -- running ------------------------------------------------------------------------

    def batches(self):
        return self.selection.batches()

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
        # Before anything slow: an unwritable --output fails at once, and the lock is taken before
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
        load_start = load_average()
        handle = self._load_model()
        plan = self._plan(handle)
        plugins = self._explainers(list(plan.layers)), self._metrics()
        header = dataclasses.replace(
            plan.header(environment(self.device), self.registry.versions()), world_size=world,
            host_load={"cores": os.cpu_count(), "start": load_start})
        engine = self._start_engine(handle)
        header = dataclasses.replace(header, environment={**header.environment, "engine": engine})
        execution = self._execution(handle, plugins)
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
        summary = RunSummary(self.folder, header, 0, len(done), 0, 0, unit_order=plan.order)
        self._warm_up(execution)
        mine = [b for b in self.batches() if b[0] % world == rank]
        weights = execution.unit_weights()
        total = plan.units_total if world > 1 else len(mine) * sum(weights.values())
        with progress_reporter(self.progress, total, rank, world, self.run_name,
                               self.folder) as progress:
            for index, items in mine:
                execution.run_batch(index, items, done, summary, writer, progress, weights)
        host_load = {**header.host_load, "end": load_average()}
        summary.header = dataclasses.replace(header, host_load=host_load)
        if world == 1 or rank == 0:
            write_safely(self.folder, dataclasses.replace(stored, host_load=host_load))
        return summary

    def compute_units(self, unit_ids: list[str]) -> list[ResultRow]:
        """Recompute the units ``unit_ids`` (as in progress.jsonl) and return their rows, in
        that order, writing nothing: the model is loaded, the engine started and warmed up as
        a run does, and each unit's batch read and classified again (``xbench verify``)."""
        torch.manual_seed(self.config.seed)
        handle = self._load_model()
        plan = self._plan(handle)
        plugins = self._explainers(list(plan.layers)), self._metrics()
        self._start_engine(handle)
        execution = self._execution(handle, plugins)
        self._warm_up(execution)
        return execution.compute(dict(self.batches()), list(unit_ids))

    def _check_folder(self, resume: bool, overwrite: bool) -> None:
        if not self.folder.exists() or overwrite:
            return
        if not resume:
            raise UserError(
                f"{self.folder.path} already holds a run. Use --resume to finish it (finished "
                f"units are kept), --overwrite to start again, or --name/--output for a new run.")

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
