"""Uncertainty for the matrix: seeded bootstrap intervals and paired bootstrap tests.

Every cell is a mean over images; its 95% interval is the percentile bootstrap over images
(docs/protocol.md "Aggregation"). Two explainers are compared on the *same* images by resampling
the per-image differences (paired bootstrap), which is far tighter than comparing intervals.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_ci(values: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN, NaN when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference_ci(a: np.ndarray, b: np.ndarray, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES,
                         confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Bootstrap interval of mean(a - b) over paired observations (same images, same order)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, seed=seed, resamples=resamples, confidence=confidence)


def significantly_different(a: np.ndarray, b: np.ndarray, seed: int = 0) -> bool:
    """True when the paired bootstrap interval of mean(a - b) excludes 0."""
    if len(a) < 2:
        return False
    low, high = paired_difference_ci(a, b, seed=seed)
    return low > 0 or high < 0
