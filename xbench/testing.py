"""Conformance kit: the checks every Explainer, Model and Metric plugin must pass.

Third-party authors call these from their own tests::

    from xbench.testing import check_explainer, toy_model

    def test_my_explainer_conforms():
        check_explainer(MyExplainer)                 # on the built-in toy CNN
        check_explainer(MyExplainer, model=my_handle, layer="layer4")

Each check raises AssertionError with a message that names the plugin and what is wrong.
xbench's built-in plugins are tested with the same functions (tests/test_conformance.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from xbench.base import ExplainAgain, Explainer, LoadedModel, Metric, MetricBatch, Model
from xbench.engine import auto_engine
from xbench.model import ClassifierHandle
from xbench.options import OptionError, OptionSpec, check_value
from xbench.saliency import normalize_maps

TOY_CLASSES = 10
TOY_SIZE = 32


class ToyCNN(nn.Module):
    """A small CNN with the awkward parts of real models: a ReLU6 module shared by two call
    sites (as in EfficientNet-Lite), batch norm and a plain ReLU."""

    def __init__(self, classes: int = TOY_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()  # shared: used twice per forward
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.act(self.head(self.block(x)))
        return self.fc(self.pool(x).flatten(1))


def toy_model(seed: int = 0, device: str | torch.device = "cpu") -> ClassifierHandle:
    """A seeded ToyCNN (32x32 input, 10 classes, default layer 'head') in a ClassifierHandle."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = ToyCNN()
    with torch.no_grad():  # non-trivial batch-norm statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    torch.random.set_rng_state(generator_state)
    loaded = LoadedModel(module=net.eval(), input_size=TOY_SIZE, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25),
                         class_names=tuple(f"class{i}" for i in range(TOY_CLASSES)),
                         default_layer="head")
    return ClassifierHandle(loaded, device, name="toy-cnn")


def random_resnet18(size: int = 64, seed: int = 0) -> ClassifierHandle:
    """torchvision's ResNet-18 with seeded random weights (10 classes, in-place ReLUs, default
    layer ``layer4``) at ``size`` px: the second architecture explainers are checked on against
    their reference libraries (residual blocks, batch norm, real depth, no download)."""
    import torchvision

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    torch.random.set_rng_state(generator_state)
    loaded = LoadedModel(module=net, input_size=size, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225), class_names=tuple("abcdefghij"),
                         default_layer="layer4")
    return ClassifierHandle(loaded, name="resnet18-random")


class ToyGradient(Explainer):
    """|d logit_target / d x| summed over channels: the explainer ``check_metric`` hands to
    metrics that re-explain (``MetricBatch.explain``)."""

    name = "toy-gradient"
    uses_layer = False

    def explain(self, model, images, targets):
        x = images.detach().requires_grad_(True)
        model(x).gather(1, targets[:, None]).sum().backward()
        return x.grad.abs().sum(dim=1)


def toy_images(batch: int = 2, seed: int = 0, size: int = TOY_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


def toy_boxes(targets: torch.Tensor, size: int = TOY_SIZE) -> list[torch.Tensor]:
    """Per-image (K, 5) boxes for ``check_metric``: two boxes of the target's class and one
    of another class, at seeded places of a ``size`` x ``size`` input."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for target in targets.tolist():
        corners = torch.randint(0, size // 2, (3, 2), generator=generator)
        extent = torch.randint(2, size // 2, (3, 2), generator=generator)
        classes = torch.tensor([target, target, (target + 1) % TOY_CLASSES])
        out.append(torch.cat([corners, corners + extent, classes[:, None]], dim=1))
    return out


def _hook_count(module: nn.Module) -> int:
    total = 0
    for m in module.modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                          "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            total += len(getattr(m, attribute, {}) or {})
    return total


def _structure(module: nn.Module) -> list[tuple[str, int]]:
    return [(name, id(m)) for name, m in module.named_modules()]


def engine_twin(model: ClassifierHandle, batch_size: int = 4) -> ClassifierHandle | None:
    """The same network with its hook-free forwards (``predict``) run by ONNX Runtime, the
    default CPU engine of runs; None where that engine is not installed or the model is not on
    CPU. Plugins must give the same results through it: an explainer that expects a hook to
    fire inside ``predict``, or a metric that bypasses it, shows up here."""
    if auto_engine(model.device, "fp32")[0] != "onnxruntime":
        return None
    twin = ClassifierHandle(model.loaded, model.device, channels_last=model.channels_last,
                            name=model.name)
    twin.use_engine("onnxruntime", batch_size)
    return twin


def _explain(explainer: Explainer, model: ClassifierHandle, images: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    grad = torch.enable_grad() if explainer.needs_gradients else torch.no_grad()
    with grad:
        return explainer.explain(model, images, targets)


def check_explainer(cls: type[Explainer], model: ClassifierHandle | None = None,
                    layer: str | None = None, options: dict[str, Any] | None = None,
                    batch: int = 2, seed: int = 0, atol: float = 1e-5) -> torch.Tensor:
    """Assert the Explainer contract on ``model`` (default: the toy CNN); returns the maps.

    Checks: metadata; output type, shape (B, h, w), float dtype, device; finite and >= 0;
    identical output for a second instance with the same seed; the batch gives the same maps
    as the images one by one, and as the model's ONNX Runtime twin (:func:`engine_twin`); no
    hooks, modules, parameters or modes left changed.
    """
    name = getattr(cls, "name", cls.__name__)
    where = f"explainer {name!r}"
    assert isinstance(cls, type) and issubclass(cls, Explainer), f"{where}: not an Explainer"
    assert isinstance(cls.needs_gradients, bool), f"{where}: needs_gradients must be a bool"
    model = model or toy_model()
    options = options or {}
    size = model.input_size
    images = toy_images(batch, seed=seed, size=size).to(model.device)
    targets = model.probabilities(images).argmax(dim=1)
    hooks, structure = _hook_count(model), _structure(model)
    params = [p.detach().clone() for p in model.parameters()]
    grads_before = [p.requires_grad for p in model.parameters()]
    training = model.training

    explainer = cls(layer=layer, seed=seed, **options)
    with model.counting() as counts:
        maps = _explain(explainer, model, images, targets)
    check_declared_passes(cls, explainer.options, model, layer, batch, counts)

    assert isinstance(maps, torch.Tensor), f"{where}: returned {type(maps).__name__}, not a tensor"
    assert maps.dim() == 3 and maps.shape[0] == batch, (
        f"{where}: returned shape {tuple(maps.shape)}, expected ({batch}, h, w)")
    assert maps.dtype.is_floating_point, f"{where}: returned dtype {maps.dtype}, expected float"
    assert maps.device == model.device, f"{where}: maps on {maps.device}, model on {model.device}"
    assert torch.isfinite(maps).all(), f"{where}: maps contain NaN or Inf"
    assert (maps >= 0).all(), f"{where}: maps have negative values (min {maps.min().item():g})"
    assert _hook_count(model) == hooks, f"{where}: left hooks registered on the model"
    assert _structure(model) == structure, f"{where}: replaced or added modules in the model"
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters())), (
        f"{where}: changed the model's parameters")
    assert [p.requires_grad for p in model.parameters()] == grads_before, (
        f"{where}: changed requires_grad of parameters")
    assert model.training == training, f"{where}: changed the model's train/eval mode"

    again = _explain(cls(layer=layer, seed=seed, **options), model, images, targets)
    assert torch.allclose(maps, again, atol=atol), f"{where}: not deterministic for a fixed seed"

    singles = torch.cat([_explain(cls(layer=layer, seed=seed, **options), model,
                                  images[i:i + 1], targets[i:i + 1]) for i in range(batch)])
    size_hw = tuple(images.shape[-2:])
    batched_n, _ = normalize_maps(maps, size_hw)
    single_n, _ = normalize_maps(singles, size_hw)
    assert torch.allclose(batched_n, single_n, atol=1e-4), (
        f"{where}: maps of a batch differ from the same images explained one by one")

    twin = engine_twin(model)
    if twin is not None:
        engine_maps = _explain(cls(layer=layer, seed=seed, **options), twin, images, targets)
        engine_n, _ = normalize_maps(engine_maps, size_hw)
        assert torch.allclose(batched_n, engine_n, atol=1e-3), (
            f"{where}: maps differ when the model's hook-free forwards (model.predict) run "
            f"through ONNX Runtime; use model(...) where you need hooks or gradients")
    check_options_reach_variant(cls, options)
    return maps


def check_declared_passes(cls: type[Explainer], options: Any, model: ClassifierHandle,
                          layer: str | None, batch: int, counts: dict[str, int]) -> None:
    """Assert that the passes ``cls`` declares (:meth:`Explainer.expected_passes`) are the
    passes counted for ``batch`` images (``counts``): equal when exact, not above an "at
    most" bound; an "about" count and an undeclared one are not checked."""
    from xbench.base import PassFacts

    facts = PassFacts.of(model, (layer or model.default_layer) if cls.uses_layer else None,
                         batch_size=batch)
    declared = cls.expected_passes(options, facts)
    if declared is None or declared.bound == "about":
        return
    counted = (counts["forward"] / batch, counts["backward"] / batch)
    expected = (declared.forward, declared.backward)
    where = f"explainer {getattr(cls, 'name', cls.__name__)!r}"
    if declared.bound == "at most":
        assert all(c <= e for c, e in zip(counted, expected)), (
            f"{where}: counted {counted} passes per image (forward, backward), above the "
            f"declared bound {expected}")
    else:
        assert counted == expected, (
            f"{where}: counted {counted} passes per image (forward, backward), declared "
            f"{expected} by expected_passes")


def check_model(cls: type[Model], options: dict[str, Any] | None = None) -> LoadedModel:
    """Assert the Model contract: load() gives an eval-mode network whose default layer is
    called once per forward with a 4-D output, and whose logits match the class names."""
    where = f"model {getattr(cls, 'name', cls.__name__)!r}"
    assert isinstance(cls, type) and issubclass(cls, Model), f"{where}: not a Model"
    loaded = cls(**(options or {})).load()
    assert isinstance(loaded, LoadedModel), f"{where}: load() must return xbench.LoadedModel"
    assert not loaded.module.training, f"{where}: load() must return the network in eval mode"
    assert len(loaded.mean) == 3 and len(loaded.std) == 3, f"{where}: mean/std need 3 values"
    handle = ClassifierHandle(loaded)
    layer = handle.layer(loaded.default_layer)
    outputs: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        logits = handle.probabilities(toy_images(1, size=loaded.input_size))
    finally:
        hook.remove()
    assert logits.shape == (1, len(loaded.class_names)), (
        f"{where}: output shape {tuple(logits.shape)} != (1, {len(loaded.class_names)} classes)")
    assert len(outputs) == 1, (f"{where}: default layer {loaded.default_layer!r} ran "
                               f"{len(outputs)} times per forward; CAM methods need exactly one")
    assert outputs[0].dim() == 4, f"{where}: default layer output is not a (B, K, h, w) map"
    return loaded


def check_metric(cls: type[Metric], model: ClassifierHandle | None = None,
                 options: dict[str, Any] | None = None, batch: int = 2) -> dict[str, torch.Tensor]:
    """Assert the Metric contract: {variant: finite (B,) tensor}, deterministic, the model's
    parameters untouched, and the same values when the batch is scored image by image.
    A model-scope metric (``kind = "model"``) gets batches without maps, as in a run; the
    same values (to float rounding) with the model's ONNX Runtime twin (:func:`engine_twin`)."""
    where = f"metric {getattr(cls, 'name', cls.__name__)!r}"
    assert isinstance(cls, type) and issubclass(cls, Metric), f"{where}: not a Metric"
    assert cls.direction in ("lower", "higher"), f"{where}: direction must be lower or higher"
    model = model or toy_model()
    images = toy_images(batch, seed=1, size=model.input_size).to(model.device)
    probs = model.probabilities(images)
    targets = probs.argmax(dim=1)
    generator = torch.Generator().manual_seed(2)
    raw = torch.rand(batch, 7, 7, generator=generator).to(model.device)
    saliency, degenerate = normalize_maps(raw, tuple(images.shape[-2:]))
    boxes = toy_boxes(targets, model.input_size) if cls.needs_boxes else None

    def make_batch(sel: slice, model: ClassifierHandle = model) -> MetricBatch:
        n = len(range(*sel.indices(batch)))
        if cls.kind == "model":
            return MetricBatch(model=model, images=images[sel], targets=targets[sel],
                               saliency=None, degenerate=None,
                               clean_probs=probs[sel].gather(1, targets[sel, None])[:, 0],
                               explain_forward=None, explain_backward=None, explain_seconds=None)
        return MetricBatch(model=model, images=images[sel], targets=targets[sel],
                           explain=ExplainAgain(ToyGradient(), model),
                           saliency=saliency[sel], degenerate=degenerate[sel],
                           clean_probs=probs[sel].gather(1, targets[sel, None])[:, 0],
                           explain_forward=torch.ones(n, dtype=torch.float64),
                           explain_backward=torch.ones(n, dtype=torch.float64),
                           explain_seconds=torch.full((n,), 0.5, dtype=torch.float64),
                           boxes=None if boxes is None else boxes[sel])

    hooks = _hook_count(model)
    with torch.no_grad():
        scores = cls(**(options or {})).score(make_batch(slice(None)))
        again = cls(**(options or {})).score(make_batch(slice(None)))
        singles = [cls(**(options or {})).score(make_batch(slice(i, i + 1))) for i in range(batch)]
    assert _hook_count(model) == hooks, f"{where}: left hooks registered on the model"
    assert isinstance(scores, dict) and scores, f"{where}: score() must return a non-empty dict"
    for variant, values in scores.items():
        assert isinstance(variant, str), f"{where}: variant keys must be strings"
        assert isinstance(values, torch.Tensor) and values.shape == (batch,), (
            f"{where}: variant {variant!r} has shape {getattr(values, 'shape', None)}, "
            f"expected ({batch},)")
        assert torch.isfinite(values).all(), f"{where}: variant {variant!r} has NaN/Inf values"
        assert torch.equal(values, again[variant]), f"{where}: not deterministic"
        joined = torch.cat([s[variant] for s in singles])
        assert torch.allclose(values.double(), joined.double(), atol=1e-5), (
            f"{where}: variant {variant!r} changes with the batch size")
    if cls.needs_boxes:  # a dataset without boxes: every image excluded (NaN), no error
        with torch.no_grad():
            unboxed = cls(**(options or {})).score(
                dataclasses.replace(make_batch(slice(None)), boxes=None))
        for variant, values in unboxed.items():
            assert torch.isnan(values).all(), (
                f"{where}: variant {variant!r} must be NaN (image excluded) without boxes")
    twin = engine_twin(model)
    if twin is not None:
        with torch.no_grad():
            through_engine = cls(**(options or {})).score(make_batch(slice(None), twin))
        for variant, values in scores.items():
            assert torch.allclose(values.double(), through_engine[variant].double(),
                                  atol=1e-3, rtol=1e-3), (
                f"{where}: variant {variant!r} differs when the model's hook-free forwards run "
                f"through ONNX Runtime")
    check_options_reach_variant(cls, options, lambda metric: {
        metric.row_variant(key) for key in metric.score(make_batch(slice(None)))})
    return scores


def _other_value(spec: OptionSpec, current: Any) -> Any:
    """A valid value different from ``current`` for ``spec``, or _SKIP when none can be made
    without knowing the plugin (free text, paths)."""
    if spec.choices is not None:
        if isinstance(current, tuple):
            return current[:1] if len(current) > 1 else tuple(c for c in spec.choices
                                                               if c not in current)[:1] or _SKIP
        return next((c for c in spec.choices if c != current), _SKIP)
    if isinstance(current, bool):
        return not current
    if isinstance(current, tuple):
        return current[:1] if len(current) > 1 else _SKIP
    number = spec.type
    if current is None:
        for candidate in (int, float):
            if candidate in getattr(spec.type, "__args__", ()):
                number = candidate
        if number not in (int, float):
            return _SKIP
        low = spec.minimum if spec.minimum is not None else 1
        value = number(max(low, 16))
        return value if spec.maximum is None or value <= spec.maximum else number(low)
    if isinstance(current, (int, float)):
        # the lower bound first: the value most likely to change the output on a small model
        for value in (spec.minimum if spec.minimum is not None else current,
                      current + 1 if isinstance(current, int) else current * 2,
                      current - 1 if isinstance(current, int) else current / 2):
            try:
                if value != current:
                    return check_value(spec, value, "kit")
            except OptionError:
                continue
    return _SKIP


_SKIP = object()


def check_options_reach_variant(cls: type[Explainer] | type[Metric],
                                options: dict[str, Any] | None = None,
                                variants: Any = None) -> None:
    """Assert that changing any option declared to change the output changes what the rows
    record: the explainer's ``variant``, or the metric's row variants (``variants(metric)``).
    Options without a value the kit can make up (free text, paths) are left out."""
    where = f"{cls.plugin_kind} {getattr(cls, 'name', cls.__name__)!r}"
    options = dict(options or {})
    variants = variants or (lambda plugin: plugin.variant)
    with torch.no_grad():
        baseline = variants(cls(**options))
        for spec in cls.option_specs():
            if not spec.in_variant:
                continue
            value = _other_value(spec, options.get(spec.name, spec.default))
            if value is _SKIP:
                continue
            changed = variants(cls(**{**options, spec.name: value}))
            assert changed != baseline, (
                f"{where}: option {spec.name}={value!r} changes the output but not the recorded "
                f"variant ({baseline!r}); derive variant from the options (do not override it) or "
                "declare the option in_variant=False if it never changes the output")
