"""Python entry points for notebooks, thin over the runner (docs/python-api.md).

- :func:`run` scores the explainer x metric matrix on a model and a folder (or tensors) with
  :class:`xbench.runner.Runner`, exactly as ``xbench run`` does, and returns the records as a
  pandas DataFrame (one row per image x explainer x layer x metric variant).
- :func:`explain` returns one image's normalised saliency map as a tensor.
- :func:`load_model` builds a :class:`~xbench.model.ClassifierHandle` once, for reuse.

A model is a registered name (``"efficientnet-lite0"``, ``"resnet50"``), a ClassifierHandle, a
LoadedModel, or a plain ``nn.Module`` with its preprocessing given as keywords (``input_size``,
``mean``, ``std``, ``layer``; normalisation happens inside xbench, so images stay in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xbench.base import LoadedModel, Model
from xbench.errors import UserError, did_you_mean
from xbench.model import ClassifierHandle
from xbench.runner import RunConfig, Runner

if TYPE_CHECKING:
    import pandas as pd

    from xbench.plugins import Registry

#: RunConfig fields :func:`run` takes as keywords (the ones it sets itself are left out)
RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig)
                     if f.name not in ("explainers", "metrics", "model", "data", "labels",
                                       "options"))
IN_MEMORY_MODEL = "in-memory"


def load_model(model: Any = "efficientnet-lite0", *, weights: str | None = None,
               device: str = "cpu", **preprocessing: Any) -> ClassifierHandle:
    """A ClassifierHandle for ``model``: a registered name (with optional ``weights``), a
    LoadedModel, an ``nn.Module`` with ``input_size``, ``mean``, ``std`` and ``layer`` (and
    optionally ``class_names``) as keywords, or a ClassifierHandle (returned as is)."""
    from xbench.environment import resolve_device
    from xbench.plugins import build_registry

    if isinstance(model, ClassifierHandle):
        return model
    if isinstance(model, str):
        if preprocessing:
            raise UserError(f"load_model({model!r}): a registered model brings its own "
                            f"preprocessing; drop {', '.join(sorted(preprocessing))}")
        registry = build_registry()
        registry.info("model", model)  # unknown names: error with "did you mean"
        loaded = registry.model(model)(weights=weights).load()
        return ClassifierHandle(loaded, resolve_device(device), name=model)
    loaded = _loaded(model, preprocessing)
    return ClassifierHandle(loaded, resolve_device(device), name=IN_MEMORY_MODEL)


def _loaded(model: Any, preprocessing: dict[str, Any]) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a registered model name, a ClassifierHandle, a "
                        f"LoadedModel or an nn.Module, got {type(model).__name__}")
    required = ("input_size", "mean", "std", "layer")
    missing = [key for key in required if key not in preprocessing]
    unknown = sorted(set(preprocessing) - {*required, "class_names"})
    if missing or unknown:
        raise UserError(
            "an nn.Module needs its preprocessing as keywords: input_size=224, "
            "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), layer='layer4' (the CAM "
            "target layer), optionally class_names=[...]"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    size = int(preprocessing["input_size"])
    names = preprocessing.get("class_names")
    if names is None:
        with torch.no_grad():
            classes = model.eval()(torch.zeros(1, 3, size, size)).shape[-1]
        names = [f"class{i}" for i in range(classes)]
    return LoadedModel(module=model.eval(), input_size=size,
                       mean=tuple(float(v) for v in preprocessing["mean"]),
                       std=tuple(float(v) for v in preprocessing["std"]),
                       class_names=tuple(names), default_layer=str(preprocessing["layer"]),
                       weights="in memory")


def _registry_with(model: Any, preprocessing: dict[str, Any]) -> tuple[Registry, str]:
    """The plugin registry, plus an in-memory Model plugin when ``model`` is not a name."""
    from xbench.plugins import build_registry, hookimpl

    if isinstance(model, str):
        if preprocessing:
            raise UserError(f"run(model={model!r}): a registered model brings its own "
                            f"preprocessing; drop {', '.join(sorted(preprocessing))}")
        return build_registry(), model
    loaded = model.loaded if isinstance(model, ClassifierHandle) else _loaded(model, preprocessing)
    name = (model.name if isinstance(model, ClassifierHandle) and model.name else IN_MEMORY_MODEL)

    class InMemoryModel(Model):
        summary = "a model handed to xbench.api from Python"

        def load(self) -> LoadedModel:
            return loaded

    InMemoryModel.name = name

    class InMemoryPlugin:
        @hookimpl
        def register_models(self, register):
            register(InMemoryModel)

    registry = build_registry(extra_plugins=[("xbench-api-model", InMemoryPlugin())])
    if registry.get("model", name) is not InMemoryModel:
        raise UserError(f"model name {name!r} is taken by an installed model plugin; give the "
                        "handle another name (ClassifierHandle(..., name='my-model'))")
    return registry, name


def _option_strings(options: Mapping[str, Any] | Iterable[str] | None) -> tuple[str, ...]:
    """{'rise.n_masks': 500} or ['rise.n_masks=500'] -> ('rise.n_masks=500',)."""
    if options is None:
        return ()
    if isinstance(options, Mapping):
        return tuple(f"{key}={value!r}" for key, value in options.items())
    return tuple(options)


def _tensor_folder(images: torch.Tensor, labels: Sequence[int] | None, root: Path) -> Path:
    """Write (N, 3, H, W) images in [0, 1] as 8-bit PNGs (with labels.csv) under root/tensors."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"data: a tensor of images must have shape (N, 3, H, W), got "
                        f"{tuple(images.shape)}")
    if not bool(((images >= 0) & (images <= 1)).all()):
        raise UserError("data: tensor images must be in pixel space [0, 1] (xbench normalises "
                        "for the model itself)")
    if labels is not None and len(labels) != len(images):
        raise UserError(f"labels: {len(labels)} labels for {len(images)} images")
    folder = root / "tensors"
    folder.mkdir(parents=True)
    pixels = (images.detach().cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = [f"image{i:05d}.png" for i in range(len(images))]
    for name, array in zip(names, pixels):
        Image.fromarray(array).save(folder / name)
    if labels is not None:
        lines = ["file,label"] + [f"{n},{int(label)}" for n, label in zip(names, labels)]
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def run(model: Any = "efficientnet-lite0", data: Any = "sample", *,
        explainers: str | Sequence[str] = "all", metrics: str | Sequence[str] = "all",
        labels: str | Sequence[int] | None = None,
        options: Mapping[str, Any] | Iterable[str] | None = None,
        out: str | Path | None = None, name: str | None = None, resume: bool = False,
        overwrite: bool = False, preprocessing: Mapping[str, Any] | None = None,
        **settings: Any) -> pd.DataFrame:
    """Score ``explainers`` x ``metrics`` on ``model`` and ``data``; the records as a DataFrame.

    ``data``: ``"sample"``, a folder (any layout of docs/data.md, ``labels`` a labels file), or
    a tensor (N, 3, H, W) in [0, 1] (``labels`` a sequence of class indices or None), which goes
    through the protocol's resize and crop like an image file (it is saved as 8-bit PNG).
    ``options``: plugin options, ``{"rise.n_masks": 500}``. ``settings``: the other ``xbench
    run`` settings by their RunConfig names (``limit``, ``seed``, ``device``, ``batch_size``,
    ``profile``, ``layers``, ``target_rule``, ``engine``, ...). ``preprocessing``: for an
    ``nn.Module``, ``dict(input_size=..., mean=..., std=..., layer=...)``.

    Records go to ``out/<run name>/`` when ``out`` is given (draw them with ``xbench report``);
    without ``out`` they are written to a temporary folder, read, and removed. The frame's
    ``attrs`` hold the run header (``frame.attrs["header"]``) and the folder (``"folder"``).
    """
    from xbench import leaderboard

    unknown = sorted(set(settings) - set(RUN_SETTINGS))
    if unknown:
        hint = did_you_mean(unknown[0], RUN_SETTINGS)
        raise UserError(f"run(): unknown setting(s) {', '.join(unknown)}.{hint} Settings: "
                        f"{', '.join(RUN_SETTINGS)}")
    registry, model_name = _registry_with(model, dict(preprocessing or {}))
    join = lambda spec: spec if isinstance(spec, str) else ",".join(spec)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="xbench-api-") as scratch:
        if isinstance(data, torch.Tensor):
            if isinstance(labels, str):
                raise UserError("labels: with tensor data give a sequence of class indices")
            data = _tensor_folder(data, labels, Path(scratch) / "data")
            labels = None
        elif labels is not None and not isinstance(labels, (str, Path)):
            raise UserError("labels: with a folder give a labels file path (docs/data.md)")
        if out is None:
            settings.setdefault("save_maps", False)
        config = RunConfig(explainers=join(explainers), metrics=join(metrics), model=model_name,
                           data=str(data), labels=None if labels is None else str(labels),
                           options=_option_strings(options), **settings)
        root = Path(out) if out is not None else Path(scratch) / "results"
        runner = Runner(config, registry, root, name=name)
        summary = runner.run(resume=resume, overwrite=overwrite)
        frame = leaderboard.run_frame(summary.folder)
        frame.attrs["header"] = dataclasses.asdict(summary.header)
        frame.attrs["folder"] = str(summary.folder.path) if out is not None else None
    return frame


def explain(image: str | Path | torch.Tensor, explainer: str = "gradcam",
            model: Any = "efficientnet-lite0", *, target: int | None = None,
            layer: str | None = None, seed: int = 0, options: Mapping[str, Any] | None = None,
            device: str = "cpu", **preprocessing: Any) -> torch.Tensor:
    """One image's saliency map (H, W) at the model's input size, min-max normalised to [0, 1]
    as the metrics see it (all zeros when the map is degenerate).

    ``image``: a file (resized and cropped as the protocol says) or a (3, H, W) tensor in
    [0, 1] (used as given). ``target``: a class index (default: the top-1 prediction).
    ``options``: the explainer's options, ``{"n_masks": 500}`` for RISE. ``model``: as
    :func:`load_model` (pass a handle from it to load the model once for many images).
    """
    from xbench.data import load_image
    from xbench.plugins import build_registry
    from xbench.saliency import normalize_maps

    registry = build_registry()
    registry.info("explainer", explainer)
    handle = load_model(model, device=device, **preprocessing)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise UserError(f"image: expected a (3, H, W) tensor in [0, 1], got shape "
                            f"{tuple(image.shape)}")
        pixels = image.float()
    else:
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path}: no such file")
        pixels = load_image(path, handle.loaded.resize_size, handle.input_size)
    pixels = pixels[None].to(handle.device)
    if target is None:
        with torch.no_grad():
            target = int(handle.predict(pixels).argmax(dim=1)[0])
    if not 0 <= target < handle.num_classes:
        raise UserError(f"target {target}: must be a class index in [0, {handle.num_classes})")
    cls = registry.explainer(explainer)
    try:
        instance = cls(layer=(layer or handle.default_layer) if cls.uses_layer else None,
                       seed=seed, **dict(options or {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"explainer {explainer!r}: {exc}") from exc
    grad = torch.enable_grad() if instance.needs_gradients else torch.no_grad()
    with grad:
        maps = instance.explain(handle, pixels, torch.tensor([target], device=handle.device))
    handle.zero_grad(set_to_none=True)
    saliency, _ = normalize_maps(maps, tuple(pixels.shape[-2:]))
    return saliency[0]
