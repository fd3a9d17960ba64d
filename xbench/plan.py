"""Planning a run: RunConfig -> RunSelection -> RunPlan, before anything is explained.

- :class:`RunSelection` resolves what a config selects without loading a model: the plugins,
  their options (profile values, then ``-o``, checked by their declared types), the dataset,
  the profile, the device and the run folder. Every config error is raised here.
- :class:`RunPlan` adds what the model says (:class:`ModelFacts`: input size, layers and their
  channels) and lays the run out: its layers, its units in the order they are written, the
  header, and the forward/backward passes each unit will cost (the plugins' declared
  :meth:`~xbench.base.Explainer.expected_passes`). It is pure: tests build one from
  hand-written facts, ``xbench run --dry-run`` prints one.

A unit is one batch of images x one (explainer, layer), plus one data unit per batch (the
images' confidence rows and any model-scope metric); see :mod:`xbench.execute`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xbench import PROTOCOL_VERSION, __version__
from xbench.base import Passes, PassFacts
from xbench.data import Dataset, ImageItem, open_dataset
from xbench.engine import ENGINES
from xbench.environment import resolve_device
from xbench.errors import UserError, did_you_mean
from xbench.plugins import Registry
from xbench.profiles import plugin_options, profile_names
from xbench.records import SCHEMA_VERSION, RunFolder, RunHeader

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RULES = ("predicted", "label")
#: the layer of an explainer that reads none (``uses_layer = False``)
NO_LAYER = "-"


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


def check_config(config: RunConfig) -> None:
    """The settings that need no plugin or file to be checked."""
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
            raise UserError(f"--option {plugin}.*: {plugin!r} is not a selected explainer, "
                            f"metric or the model.{did_you_mean(plugin, classes)}")
        out[plugin] = {key: classes[plugin].parse_option(key, raw) for key, raw in values.items()}
    apply_model_flags(out, classes, config.model, checkpoint=config.checkpoint,
                      member=config.member, weights=config.weights)
    return out


def apply_model_flags(options: dict[str, dict[str, Any]], classes: dict[str, type], model: str,
                      checkpoint: str | None, member: str | None, weights: str | None) -> None:
    """``--checkpoint``, ``--member`` and ``--weights`` as the declared options of the plugins
    that take them (every command that loads a model: run, explain), into ``options``."""
    if checkpoint:
        takers = [name for name, cls in classes.items() if _declares(cls, "checkpoint")]
        if not takers:
            raise UserError(f"--checkpoint: none of the selected plugins ({', '.join(classes)}) "
                            "takes a checkpoint; select one that does (see 'xbench plugins NAME')")
        for name in takers:
            options.setdefault(name, {}).setdefault("checkpoint", checkpoint)
    if member is not None:
        if not _declares(classes[model], "member"):
            raise UserError(f"--member: model {model!r} has no members")
        options.setdefault(model, {})["member"] = classes[model].parse_option("member", member)
    if weights is not None:
        options.setdefault(model, {})["weights"] = weights


def select_metrics(registry: Registry, spec: str) -> list[str]:
    """``--metrics``: 'all', or names and family names (``localisation``, ``complexity``,
    ``faithfulness``, ``cost``, ``model``; a family expands to its metrics in registry order)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    metrics = registry.names("metric")
    # 'all' leaves out model-scope and opt-in metrics (they cost many passes), alone or in a list
    default = [name for name in registry.select("metric", "all")
               if registry.metric(name).kind != "model"
               and not getattr(registry.metric(name), "opt_in", False)]
    if names == ["all"]:
        return default
    families: dict[str, list[str]] = {}
    for name in metrics:
        families.setdefault(registry.metric(name).metric_family(), []).append(name)
    out: list[str] = []
    for name in names:
        if name == "all":
            chosen = default
        elif name in metrics:
            chosen = [name]
        elif name in families:
            chosen = families[name]
        else:
            chosen = registry.select("metric", [name])  # raises, with "did you mean"
        out.extend(n for n in chosen if n not in out)
    return out


def instantiate(kind: str, cls: type, **kwargs: Any) -> Any:
    """A plugin instance; a constructor's refusal becomes a UserError naming the plugin."""
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{kind} {cls.name!r}: bad options {kwargs}: {exc}") from exc
    except ValueError as exc:
        raise UserError(f"{kind} {cls.name!r}: {exc}") from exc


class RunSelection:
    """What a RunConfig selects, resolved and checked without loading a model."""

    def __init__(self, config: RunConfig, registry: Registry, out: Path,
                 name: str | None = None) -> None:
        self.config = config
        self.registry = registry
        check_config(config)
        self.explainer_names = registry.select("explainer", config.explainers)
        self.metric_names = select_metrics(registry, config.metrics)
        self.classes: dict[str, type] = {
            **{name: registry.explainer(name) for name in self.explainer_names},
            **{name: registry.metric(name) for name in self.metric_names},
            config.model: registry.model(config.model)}
        self.cli_options = command_line_options(config, self.classes)
        self.dataset: Dataset = open_dataset(config.data, config.labels, config.boxes).subset(
            config.limit, config.seed)
        self.metric_names = self._box_metrics(self.metric_names)
        self.profile = self._resolve_profile()
        self.device = resolve_device(config.device)
        for plugin, cls in self.classes.items():  # profile values too, before any loading
            cls.make_options(self.options_for(plugin))
        self.run_name = name or self._default_name()
        self.folder = RunFolder(out / self.run_name)
        inside = Path(os.path.normpath(self.folder.path))
        if Path(self.run_name).is_absolute() or inside.parent != Path(os.path.normpath(out)):
            raise UserError(f"--name {self.run_name!r}: a run name is one folder name inside "
                            f"--output {out} (no '/', '..' or absolute path); use --output to choose "
                            f"where runs go.")

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
        known = profile_names(self.registry_classes())
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

    def options_for(self, plugin: str) -> dict[str, Any]:
        """The plugin's options for this run: its profile values, then the command line's."""
        options = plugin_options(self.profile, self.classes[plugin])
        options.update(self.cli_options.get(plugin, {}))
        return options

    def resolved_config(self) -> dict[str, Any]:
        """The config as run.json records it: names resolved, each plugin's options."""
        config = dataclasses.asdict(self.config)
        config.update(explainers=self.explainer_names, metrics=self.metric_names,
                      profile=self.profile, options=list(self.config.options),
                      plugin_options={name: self.options_for(name)
                                      for name in [*self.explainer_names, *self.metric_names]})
        return config

    def batches(self) -> list[tuple[int, tuple[ImageItem, ...]]]:
        """(batch index, its images), in dataset order."""
        items = self.dataset.items
        size = self.config.batch_size
        return [(b, items[i:i + size]) for b, i in enumerate(range(0, len(items), size))]


@dataclass(frozen=True)
class ModelFacts:
    """What a plan needs to know of the model: sizes, layers and their channels. Built from a
    loaded :class:`~xbench.model.ClassifierHandle` (:meth:`of`) or written by hand in tests."""

    name: str
    input_size: int
    default_layer: str
    #: the layers ``--layers all`` sweeps
    block_layers: tuple[str, ...] = ()
    #: channels K of each layer with a (B, K, h, w) output
    channels: dict[str, int] = field(default_factory=dict)
    #: 'post-activation' or 'pre-activation' per layer (docs/protocol.md)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    resize_size: int | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    weights: str = ""
    call_sites: Any = None

    @classmethod
    def of(cls, handle: Any) -> ModelFacts:
        from xbench.model import block_layers

        loaded, layers = handle.loaded, handle.census.layers
        return cls(name=handle.name, input_size=loaded.input_size,
                   default_layer=loaded.default_layer, block_layers=tuple(block_layers(handle)),
                   channels={name: info.shape[1] for name, info in layers.items() if info.spatial},
                   layer_kinds={name: info.kind for name, info in layers.items()},
                   resize_size=loaded.resize_size, mean=tuple(loaded.mean),
                   std=tuple(loaded.std), weights=loaded.weights, call_sites=handle.call_sites)

    def facts(self, layer: str | None, batch_size: int, device: str) -> PassFacts:
        return PassFacts(batch_size=batch_size, input_size=(self.input_size, self.input_size),
                         layer=layer, channels=self.channels.get(layer) if layer else None,
                         device=device)


@dataclass(frozen=True)
class Cell:
    """One explainer at one layer (``NO_LAYER`` for an explainer that reads none)."""

    explainer: str
    layer: str
    passes: Passes | None

    @property
    def label(self) -> str:
        return self.explainer if self.layer == NO_LAYER else f"{self.explainer} @{self.layer}"


@dataclass(frozen=True)
class Unit:
    """One unit of work: a batch's data unit (``explainer`` '') or a batch x cell.

    ``forward``/``backward``: the passes the whole unit is expected to cost (explainer and
    metrics, all its images; the data unit classifies each image once), None when a plugin
    of it declares no count; ``bound`` as in :class:`~xbench.base.Passes`."""

    id: str
    batch: int
    images: int
    explainer: str = ""
    layer: str = ""
    forward: float | None = None
    backward: float | None = None
    bound: str = ""


def data_unit_id(batch: int) -> str:
    return f"batch{batch:06d}:data"


def unit_id(batch: int, explainer: str, layer: str) -> str:
    return f"batch{batch:06d}:{explainer}:{layer}"


def combine(parts: list[Passes | None]) -> Passes | None:
    """Passes of several plugins run on the same images; metrics sharing a key pay once.
    None when any part is unknown."""
    if any(part is None for part in parts):
        return None
    seen: set[str] = set()
    forward = backward = 0.0
    bounds = set()
    for part in parts:
        if part.shared:
            if part.shared in seen:
                continue
            seen.add(part.shared)
        forward += part.forward
        backward += part.backward
        bounds.add(part.bound)
    bound = "about" if "about" in bounds else "at most" if "at most" in bounds else ""
    return Passes(forward, backward, bound=bound)


def resolve_layers(spec: str | None, model: ModelFacts) -> list[str]:
    """``--layers``: None/'last' -> the default layer; 'all' -> the block layers; else names
    (checked against the loaded model by the runner, which knows why a layer is refused)."""
    if spec in (None, "", "last"):
        return [model.default_layer]
    if spec == "all":
        return list(model.block_layers)
    return [s.strip() for s in spec.split(",") if s.strip()]


@dataclass(frozen=True)
class RunPlan:
    """A run laid out: layers, cells, units in write order and their expected passes."""

    selection: RunSelection
    model: ModelFacts
    layers: tuple[str, ...]
    cells: tuple[Cell, ...]
    #: per-image passes of each explainer-scope metric, and of each model-scope metric
    metric_passes: dict[str, Passes | None]
    model_metric_passes: dict[str, Passes | None]
    units: tuple[Unit, ...]

    @classmethod
    def build(cls, selection: RunSelection, model: ModelFacts) -> RunPlan:
        config, registry = selection.config, selection.registry
        device = selection.device.type
        layers = resolve_layers(config.layers, model)

        def declared(name: str, layer: str | None) -> Passes | None:
            plugin = selection.classes[name]
            options = plugin.make_options(selection.options_for(name))
            return plugin.expected_passes(options, model.facts(layer, config.batch_size, device))

        cells = tuple(Cell(name, layer, declared(name, None if layer == NO_LAYER else layer))
                      for name in selection.explainer_names
                      for layer in (layers if registry.explainer(name).uses_layer else [NO_LAYER]))
        scoped = {name: declared(name, None) for name in selection.metric_names}
        metric_passes = {n: p for n, p in scoped.items() if registry.metric(n).kind != "model"}
        model_metric_passes = {n: p for n, p in scoped.items()
                               if registry.metric(n).kind == "model"}
        metrics = combine(list(metric_passes.values()))
        data = combine([Passes(1), *model_metric_passes.values()])  # classify each image once
        units: list[Unit] = []
        for index, items in selection.batches():
            n = len(items)
            units.append(_unit(data_unit_id(index), index, n, "", "", data))
            for cell in cells:
                units.append(_unit(unit_id(index, cell.explainer, cell.layer), index, n,
                                   cell.explainer, cell.layer, combine([cell.passes, metrics])))
        return cls(selection, model, tuple(layers), cells, metric_passes, model_metric_passes,
                   tuple(units))

    @property
    def units_total(self) -> int:
        return len(self.units)

    @property
    def order(self) -> list[str]:
        """Unit ids in the order a single process writes them."""
        return [unit.id for unit in self.units]

    def totals(self) -> tuple[float, float, int]:
        """(forward, backward, units of unknown cost) over the whole run."""
        known = [u for u in self.units if u.forward is not None]
        return (sum(u.forward for u in known), sum(u.backward for u in known),
                len(self.units) - len(known))

    def header(self, environment: dict[str, Any], plugins: dict[str, str]) -> RunHeader:
        """The run header (written before any row); the runner adds engine and host load."""
        selection, model, dataset = self.selection, self.model, self.selection.dataset
        config = selection.config
        return RunHeader(
            schema_version=SCHEMA_VERSION, run_name=selection.run_name,
            xbench_version=__version__, protocol=PROTOCOL_VERSION, profile=selection.profile,
            config=selection.resolved_config(),
            model={"name": config.model, "weights": model.weights,
                   "input_size": model.input_size, "resize_size": model.resize_size,
                   "mean": list(model.mean), "std": list(model.std),
                   "default_layer": model.default_layer,
                   # whether each target layer's output is an activation's (docs/protocol.md)
                   "layer_kinds": {layer: model.layer_kinds.get(layer)
                                   for layer in (self.layers or [model.default_layer])},
                   "split_call_sites": model.call_sites},
            dataset={"name": dataset.name, "layout": dataset.layout, "root": dataset.root,
                     "images": len(dataset.items), "subset_hash": dataset.subset_hash,
                     "limit": config.limit, "seed": config.seed,
                     "boxes": None if dataset.boxes is None else {
                         "source": dataset.boxes.source, "layout": dataset.boxes.layout}},
            environment=environment, plugins=plugins, units_total=self.units_total)


def _unit(uid: str, batch: int, images: int, explainer: str, layer: str,
          per_image: Passes | None) -> Unit:
    if per_image is None:
        return Unit(uid, batch, images, explainer, layer)
    return Unit(uid, batch, images, explainer, layer, per_image.forward * images,
                per_image.backward * images, per_image.bound)
