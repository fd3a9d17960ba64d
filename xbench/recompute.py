"""Recompute chosen units of a recorded run from its header, without writing anything.

It rebuilds a :class:`~xbench.runner.Runner` from ``run.json`` (model, plugins, options,
seed, engine as resolved, profile, target rule, layers, data folder) and runs only the named
units through :meth:`~xbench.runner.Runner.compute_units`, so the rows come out exactly as
``xbench run`` wrote them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xbench.errors import UserError
from xbench.plugins import Registry
from xbench.records import ResultRow, RunHeader
from xbench.runner import RunConfig, Runner

#: header settings that name where or on what the run happened, not what it computed
HOST_SETTINGS = ("device",)


def config_from_header(header: RunHeader, data: str | None = None, labels: str | None = None,
                       boxes: str | None = None, device: str | None = None) -> RunConfig:
    """The :class:`RunConfig` that reproduces ``header``'s rows.

    The engine is the one the run resolved (``auto`` may pick another elsewhere); ``data``,
    ``labels``, ``boxes`` and ``device`` replace the recorded ones (a folder recorded relative
    to another working directory, another machine's device)."""
    recorded = header.config
    known = {f.name for f in dataclasses.fields(RunConfig)}
    values: dict[str, Any] = {k: v for k, v in recorded.items() if k in known}
    values["explainers"] = ",".join(recorded["explainers"])
    values["metrics"] = ",".join(recorded["metrics"])
    values["options"] = tuple(recorded.get("options", ()))
    values["profile"] = header.profile
    values["engine"] = header.environment.get("engine", {}).get("name", "eager")
    values["save_maps"] = False
    for key, override in (("data", data), ("labels", labels), ("boxes", boxes),
                          ("device", device)):
        if override is not None:
            values[key] = override
    return RunConfig(**values)


def runner_from_header(header: RunHeader, registry: Registry, folder: Path,
                       **overrides: str | None) -> Runner:
    """A Runner set up as the run was (nothing is loaded or written yet)."""
    return Runner(config_from_header(header, **overrides), registry, folder.parent,
                  name=header.run_name)


def config_differences(runner: Runner, header: RunHeader) -> list[str]:
    """Settings the rebuilt runner resolves differently from the header (e.g. a profile's
    value changed in code since the run): 'key: recorded X, now Y'."""
    now = json.loads(json.dumps(runner.resolved_config()))
    ignore = {*HOST_SETTINGS, "engine", "save_maps", "data", "labels", "boxes"}
    # settings added after a run was recorded: it ran with their defaults
    defaults = json.loads(json.dumps(dataclasses.asdict(RunConfig())))
    out = []
    for key in sorted(set(now) | set(header.config)):
        if key in ignore:
            continue
        recorded = header.config.get(key, defaults.get(key))
        if recorded != now.get(key):
            out.append(f"{key}: recorded {recorded!r}, now {now.get(key)!r}")
    return out


def unit_of(row: ResultRow, batch_size: int) -> str:
    """The unit that wrote ``row`` (``batch000003:data`` or ``batch000003:gradcam:head``)."""
    batch = row.index // batch_size
    if row.explainer == "":
        return f"batch{batch:06d}:data"
    return f"batch{batch:06d}:{row.explainer}:{row.layer}"


def parse_unit(unit: str) -> tuple[int, str | None, str | None]:
    """'batch000003:gradcam:head' -> (3, 'gradcam', 'head'); a data unit -> (3, None, None)."""
    head, _, rest = unit.partition(":")
    if not head.startswith("batch") or not head[5:].isdigit() or not rest:
        raise UserError(f"unit {unit!r}: expected batchNNNNNN:data or batchNNNNNN:EXPLAINER:LAYER")
    if rest == "data":
        return int(head[5:]), None, None
    explainer, _, layer = rest.partition(":")
    return int(head[5:]), explainer, layer


def compute_units(runner: Runner, unit_ids: Iterable[str]) -> list[ResultRow]:
    """The rows of ``unit_ids``, computed as ``runner.run()`` computes them, in unit order;
    nothing is written (:meth:`xbench.runner.Runner.compute_units`)."""
    units = list(unit_ids)
    for unit in units:
        parse_unit(unit)  # a malformed id is named before anything loads
    return runner.compute_units(units)
