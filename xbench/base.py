"""The three plugin contracts: Explainer, Model and Metric.

Each is a small abstract base class with metadata class attributes and one method to implement.
Plugins hand their classes (not instances) to the ``register`` callback of a registration hook
(see :mod:`xbench.hookspecs`); the harness instantiates them with the options of a run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from xbench.options import Configurable, Options, RecordsVariant, option

if TYPE_CHECKING:
    from xbench.model import ClassifierHandle

Direction = Literal["lower", "higher"]


@dataclass(frozen=True)
class Passes:
    """Forward (F) and backward (B) passes a plugin expects to spend per image, declared before
    a run (``xbench run --dry-run``, progress weights); counted like the harness counts them
    (docs/protocol.md "Cost": a batch of 64 masked inputs is 64 forwards).

    ``bound``: '' when the count is exact, "at most" for an upper bound (Score-CAM skips
    constant channels, found only while running), "about" when it depends on the image (SLIC
    segments). ``shared``: metrics that read the same passes (Average Drop and Increase) name
    the same key, so a run that selects both pays them once.
    """

    forward: float
    backward: float = 0
    bound: Literal["", "at most", "about"] = ""
    shared: str = ""

    def text(self) -> str:
        """"12 F + 12 B", "<=129 F", "~26 F", "0"."""
        mark = {"": "", "at most": "<=", "about": "~"}[self.bound]
        parts = [f"{mark}{_count(n)} {letter}" for n, letter in ((self.forward, "F"),
                                                                  (self.backward, "B")) if n]
        return " + ".join(parts) or "0"


def _count(n: float) -> str:
    return f"{n:g}" if n != int(n) else str(int(n))


@dataclass(frozen=True)
class PassFacts:
    """What a pass count may depend on, known before anything is explained: images per
    explainer call (``--batch-size``), the input size, and the target layer with its channels
    (None for a plugin that reads no layer)."""

    batch_size: int
    input_size: tuple[int, int]
    layer: str | None = None
    channels: int | None = None
    device: str = "cpu"

    @classmethod
    def of(cls, model: ClassifierHandle, layer: str | None, batch_size: int = 1) -> PassFacts:
        """The facts of a loaded model at ``layer`` (None: a plugin that reads no layer)."""
        info = model.census.layers.get(layer) if layer is not None else None
        channels = info.shape[1] if info is not None and info.spatial else None
        size = model.input_size
        return cls(batch_size=batch_size, input_size=(size, size), layer=layer,
                   channels=channels, device=model.device.type)


class Explainer(Configurable, RecordsVariant, ABC):
    """Maps (model, batch of images, target classes) to one non-negative saliency map per image.

    Contract of :meth:`explain`:
    - ``images``: float tensor (B, 3, H, W) in pixel space [0, 1] on ``model.device``;
      ``targets``: long tensor (B,) of class indices.
    - returns a float tensor (B, h, w) on the same device, finite and >= 0, at any resolution
      (the harness upsamples and min-max normalises it, docs/protocol.md "Saliency maps").
    - all forward passes go through ``model`` (a :class:`~xbench.model.ClassifierHandle`),
      so the harness can count them; the method leaves no hooks or modified modules behind.
    - deterministic for a fixed ``seed``.
    """

    #: registry name, used on the command line (``--explainers NAME``)
    name: ClassVar[str]
    #: whether :meth:`explain` back-propagates (the harness enables autograd only then)
    needs_gradients: ClassVar[bool] = True
    #: whether the method reads a target layer (``--layer``); gradient-only methods ignore it
    uses_layer: ClassVar[bool] = True
    #: one-line description shown by ``xbench plugins``
    summary: ClassVar[str] = ""
    #: the library an adapter calls to compute the maps ("captum"); empty when the plugin's own
    #: code does (``xbench plugins`` then shows the plugin's distribution)
    library: ClassVar[str] = ""
    #: passes per image when they do not depend on options or the layer (see
    #: :meth:`expected_passes`); None: not declared
    passes: ClassVar[Passes | None] = None

    plugin_kind: ClassVar[str] = "explainer"

    class Options(Options):
        """No options; a plugin declares its own as ``class Options(xbench.Options)``."""

    def __init__(self, layer: str | None = None, seed: int = 0, **options: Any) -> None:
        # layer and seed are harness arguments, not options: they never reach ``variant``
        self.options = self.make_options(options)
        self.layer = layer
        self.seed = seed

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-image facts about the last :meth:`explain` call that results must report, as
        {name: tensor (B,)} (Score-CAM's skipped constant channels). Each becomes a row with
        metric ``<explainer>:<name>`` and no better direction. Default: none."""
        return {}

    @classmethod
    def expected_passes(cls, options: Options, facts: PassFacts) -> Passes | None:
        """The passes :meth:`explain` spends per image with these resolved ``options`` (an
        instance of the class's ``Options``) and ``facts``; tests compare it with the counted
        passes. Default: the class's constant :attr:`passes`, None (unknown: ``xbench run
        --dry-run`` prints "?") when it declares none. Override it when options or the layer
        change the count."""
        return cls.passes

    def expected_forward_passes(self, model: ClassifierHandle) -> int:
        """Forward passes per image for progress and ETA weights: the declared count
        (:meth:`expected_passes`, rounded up), 1 when none is declared."""
        layer = (self.layer or model.default_layer) if self.uses_layer else None
        passes = type(self).expected_passes(self.options, PassFacts.of(model, layer))
        return 1 if passes is None else max(1, math.ceil(passes.forward))

    def prepare(self, model: ClassifierHandle, image_shape: tuple[int, int, int]) -> None:
        """Optional one-time set-up (e.g. RISE's shared masks), called once per run before any
        timed explanation so its cost is not billed to the first image. Default: nothing."""

    @abstractmethod
    def explain(self, model: ClassifierHandle, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return saliency maps (B, h, w), >= 0, for ``targets`` on ``images``.

        ``model(x)`` is the eager network (autograd, hooks); ``model.predict(x)`` the fast
        black-box forward through the run's engine (no hooks run): use it for masked copies."""


@dataclass(frozen=True)
class LoadedModel:
    """What a Model plugin builds: the network plus everything needed to feed and explain it.

    ``module`` takes *normalised* input; the harness wraps it in a
    :class:`~xbench.model.ClassifierHandle` that applies ``(x - mean) / std`` to pixel-space
    images, so masks and substrates mean the same thing for every model (docs/protocol.md "Inputs").
    """

    module: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    default_layer: str
    #: short side the image is resized to before the center crop
    resize_size: int | None = None
    #: where the weights came from (package file, local path, hub URL), recorded in the run header
    weights: str = ""
    #: block outputs a CAM can be computed on, in forward order (``--layers all``); empty means
    #: "find them by probing" (see :func:`xbench.model.block_layers`)
    block_layers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resize_size is None:
            # 224 -> 256 as in docs/protocol.md; the same 0.875 crop ratio for other input sizes.
            object.__setattr__(self, "resize_size", int(round(self.input_size / 0.875)))


class Model(Configurable, ABC):
    """Builds a classifier with its preprocessing, class names and default target layer."""

    #: registry name (``--model NAME``)
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    plugin_kind: ClassVar[str] = "model"

    class Options(Options):
        """Every model takes ``weights`` (``--weights``); subclass this to add options."""

        weights: str | None = option(None, "local weights file (default: the model's own)")

    def __init__(self, **options: Any) -> None:
        self.options = self.make_options(options)

    @property
    def weights(self) -> str | None:
        return self.options.weights

    @abstractmethod
    def load(self) -> LoadedModel:
        """Build the network in eval mode on the CPU, with weights loaded (no downloads unless
        the user asked for them); raise :class:`xbench.errors.UserError` saying how to supply
        weights when they cannot be found."""


@dataclass
class MetricBatch:
    """Everything a metric may read for one batch of explained images.

    ``saliency`` is already upsampled to the input size and min-max normalised to [0, 1];
    degenerate maps (constant, NaN or Inf) are all zeros here and flagged in ``degenerate``.
    A model-scope metric (``kind = "model"``) is scored once per image, before any explainer:
    its batch has no maps, so ``saliency``, ``degenerate`` and the ``explain_*`` fields are None.
    ``cache`` is shared by all metrics of this batch, so that metrics computed from the same
    masked forward passes (Average Drop and Average Increase) pay for them once.
    """

    model: ClassifierHandle
    images: torch.Tensor  # (B, 3, H, W) pixel space
    targets: torch.Tensor  # (B,)
    saliency: torch.Tensor | None  # (B, H, W) in [0, 1]
    degenerate: torch.Tensor | None  # (B,) bool
    clean_probs: torch.Tensor  # (B,) softmax p_c(x) on the clean images
    explain_forward: torch.Tensor | None  # (B,) forward passes spent by the explainer per image
    explain_backward: torch.Tensor | None  # (B,) backward passes spent by the explainer per image
    explain_seconds: torch.Tensor | None  # (B,) explanation wall time per image
    cache: dict[Any, Any] = field(default_factory=dict)
    #: per-image object boxes, (K_i, 5) long: x0, y0, x1, y1 as 0-based inclusive pixel indices
    #: of the input (after the image's resize and crop, :mod:`xbench.boxes`) and the object's
    #: class index (-1 unknown); (0, 5) for an image without boxes; None when the dataset has none
    boxes: list[torch.Tensor] | None = None
    #: per-image curves a metric wants kept: {(metric name, variant): tensor (B, T)}
    curves: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


class Metric(Configurable, RecordsVariant, ABC):
    """Scores explanations. ``score`` returns {variant: per-image values (B,)}.

    A metric may produce several variants (for example one per retention level); each becomes
    its own column of the matrix, named ``name@variant`` (just ``name`` when variant is '').
    The variant a row records is that key followed by the metric's changed options
    (:meth:`row_variant`); a metric whose keys already name its options overrides
    :meth:`format_variant` to return ''.
    """

    name: ClassVar[str]
    direction: ClassVar[Direction]
    #: "faithfulness" metrics read the maps; "cost" metrics read what the explainer spent;
    #: "model" metrics score the model itself on each image, once per run and not per explainer
    #: (rows with an empty explainer); they are costly, so ``--metrics all`` leaves them out
    kind: ClassVar[Literal["faithfulness", "cost", "model"]] = "faithfulness"
    #: the family ``--metrics`` accepts as a name and tables group by ("localisation",
    #: "complexity", ...); '' means the metric's ``kind``
    family: ClassVar[str] = ""
    #: reads ``MetricBatch.boxes``: left out of ``--metrics all`` on data without boxes, an
    #: error when named; NaN for an image without a box it can use, and that image gets no row
    needs_boxes: ClassVar[bool] = False
    #: the unit shown in tables ("%", "AUC", "passes", "s")
    unit: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: passes per image when they do not depend on the options (see :meth:`expected_passes`)
    passes: ClassVar[Passes | None] = None

    plugin_kind: ClassVar[str] = "metric"

    @classmethod
    def metric_family(cls) -> str:
        return cls.family or cls.kind

    @classmethod
    def expected_passes(cls, options: Options, facts: PassFacts) -> Passes | None:
        """The passes :meth:`score` spends per image with these resolved ``options`` and
        ``facts`` (a layer-free PassFacts). Default: the constant :attr:`passes`, None
        (unknown, "?" in ``--dry-run``) when the class declares none."""
        return cls.passes

    class Options(Options):
        """No options; a plugin declares its own as ``class Options(xbench.Options)``."""

    def __init__(self, **options: Any) -> None:
        self.options = self.make_options(options)

    def row_variant(self, key: str) -> str:
        """The variant recorded in a row: the score key, then the changed options."""
        return ",".join(part for part in (key, self.variant) if part)

    @abstractmethod
    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        """Return {variant: tensor (B,) of per-image values} for ``batch``."""


PLUGIN_KINDS: dict[str, type] = {"explainer": Explainer, "model": Model, "metric": Metric}
