"""Building result rows: one constructor per row kind (xbench.records.ROW_KINDS).

Every row of a run repeats the run's provenance (run name, protocol, profile, model, dataset
hash, seed, device, dtype, engine, batch size, versions); :class:`RowFactory` holds it with the
position of each image, and each method makes one kind of row with its ``kind`` set, so that
readers never have to guess a row's meaning from empty fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xbench.data import ImageItem
from xbench.records import ResultRow

#: the metric of an image's confidence row (p_c of its target on the clean image)
CONFIDENCE = "confidence"


@dataclass(frozen=True)
class Subject:
    """The image a row is about, with the class predicted and the class explained."""

    item: ImageItem
    predicted: int | None = None
    target: int | None = None


@dataclass(frozen=True)
class Source:
    """Who made the row's map: an explainer (its variant) at a layer; empty for image rows
    and model-scope metrics."""

    explainer: str = ""
    variant: str = ""
    layer: str = ""


NO_SOURCE = Source()


class RowFactory:
    """Makes the rows of one run; ``provenance`` are the fields every row repeats."""

    def __init__(self, provenance: dict[str, Any], positions: dict[str, int]) -> None:
        self.provenance = provenance
        self.positions = positions

    def _row(self, kind: str, subject: Subject, source: Source, metric: str, value: float | None,
             *, variant: str = "", direction: str = "", error: str = "",
             degenerate: bool = False, curve: tuple[float, ...] | None = None,
             timing: dict[str, Any] | None = None) -> ResultRow:
        item = subject.item
        return ResultRow(
            image=item.id, index=self.positions[item.id], label=item.label,
            predicted=subject.predicted, target=subject.target, explainer=source.explainer,
            explainer_variant=source.variant, layer=source.layer, metric=metric,
            variant=variant, direction=direction, value=value,
            status="failed" if kind == "failure" else "ok", degenerate=degenerate, error=error,
            curve=curve, kind=kind, **self.provenance, **(timing or {}))

    # -- one per image, written with its batch's data unit -------------------------------

    def confidence(self, subject: Subject, value: float) -> ResultRow:
        """p_c(x) of the image's target on the clean image."""
        return self._row("confidence", subject, NO_SOURCE, CONFIDENCE, value, direction="higher")

    def image_failure(self, subject: Subject, error: str) -> ResultRow:
        """The image could not be read, or has no target under the run's target rule."""
        return self._row("failure", subject, NO_SOURCE, CONFIDENCE, None, direction="higher",
                         error=error)

    # -- metrics -------------------------------------------------------------------------

    def score(self, subject: Subject, source: Source, metric: Any, variant: str, value: float,
              degenerate: bool = False, curve: tuple[float, ...] | None = None,
              timing: dict[str, Any] | None = None) -> ResultRow:
        """A metric's value for the map of ``source`` ("score"), or for the model itself when
        ``source`` is empty ("model-score")."""
        kind = "score" if source.explainer else "model-score"
        return self._row(kind, subject, source, metric.name, value, variant=variant,
                         direction=metric.direction, degenerate=degenerate, curve=curve,
                         timing=timing)

    def metric_failure(self, subject: Subject, source: Source, metric: Any, variant: str,
                       error: str, degenerate: bool = False,
                       timing: dict[str, Any] | None = None) -> ResultRow:
        return self._row("failure", subject, source, metric.name, None, variant=variant,
                         direction=metric.direction, error=error, degenerate=degenerate,
                         timing=timing)

    # -- explainers ----------------------------------------------------------------------

    def explainer_failure(self, subject: Subject, source: Source, error: str) -> ResultRow:
        """The explainer raised or returned an unusable map for this image: no metric ran."""
        return self._row("failure", subject, source, "", None, error=error)

    def diagnostic(self, subject: Subject, source: Source, key: str, value: float) -> ResultRow:
        """A fact an explainer reports about its map (``<explainer>:<key>``), no better side."""
        return self._row("diagnostic", subject, source, f"{source.explainer}:{key}", value)
