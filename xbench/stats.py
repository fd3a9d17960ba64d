"""Uncertainty for the matrix: seeded bootstrap intervals and paired bootstrap tests.

Every cell is a mean over images; its 95% interval is the percentile bootstrap over images
(docs/protocol.md "Aggregation"). Two explainers are compared on the *same* images by resampling
the per-image differences (paired bootstrap), which is far tighter than comparing intervals.

Resamples are the rows of ``default_rng(seed).integers(0, n, size=(resamples, n))``: every
vector of the same length ``n`` under the same seed is resampled with the same draws, so a whole
matrix is bootstrapped with one set of draws per image count (:func:`bootstrap_cis`).
Up to :data:`EXACT_MAX_IMAGES` images a resample's mean is ``values[draw].mean()`` as it has
always been; above it the same draws are turned into per-resample counts and the means of every
vector come from one matrix product, ``counts @ values / n`` (the identical resamples summed in
another order: equal to the first way up to float rounding, ~1e-15 relative, tested), which
makes a cell of 50,000 images cost milliseconds instead of a second (docs/scale.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
#: largest image count bootstrapped by indexing the draws (the historical computation, kept
#: bit for bit); larger ones use the counts-matrix product on the same draws
EXACT_MAX_IMAGES = 1000
#: resamples drawn at a time on the counts path (bounds memory: chunk x n float64 counts)
_CHUNK = 100


def bootstrap_ci(values: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN, NaN when empty)."""
    return bootstrap_cis([values], seed=seed, resamples=resamples, confidence=confidence)[0]


def bootstrap_cis(vectors: Sequence[np.ndarray], seed: int = 0,
                  resamples: int = BOOTSTRAP_RESAMPLES,
                  confidence: float = CONFIDENCE) -> list[tuple[float, float]]:
    """:func:`bootstrap_ci` of every vector, sharing the draws of vectors of equal length.

    Identical to calling :func:`bootstrap_ci` on each vector alone (same seed, same draws)."""
    return [percentile_interval(means, confidence)
            for means in resampled_means(vectors, seed=seed, resamples=resamples)]


def percentile_interval(means: np.ndarray | None,
                        confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of resampled means; ``means`` None is an empty sample (NaN,
    NaN) and a 0-d array a single value (the interval is that value)."""
    if means is None:
        return float("nan"), float("nan")
    if means.ndim == 0:
        return float(means), float(means)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def resampled_means(vectors: Sequence[np.ndarray], seed: int = 0,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> list[np.ndarray | None]:
    """The (resamples,) bootstrap means of each vector under the seeded draws (module
    docstring); None for an empty vector, the 0-d value for a single one."""
    vectors = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    out: list[np.ndarray | None] = [None] * len(vectors)
    by_size: dict[int, list[int]] = defaultdict(list)
    for position, values in enumerate(vectors):
        if values.size == 1:
            out[position] = np.asarray(values[0])
        elif values.size > 1:
            by_size[values.size].append(position)
    for size, positions in by_size.items():
        if size <= EXACT_MAX_IMAGES:
            draws = np.random.default_rng(seed).integers(0, size, size=(resamples, size))
            for position in positions:
                out[position] = vectors[position][draws].mean(axis=1)
        else:
            stacked = np.stack([vectors[p] for p in positions], axis=1)  # (n, vectors)
            means = _resampled_means(stacked, seed, resamples)  # (resamples, vectors)
            for column, position in enumerate(positions):
                out[position] = means[:, column]
    return out


def _resampled_means(stacked: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """(resamples, k) means of the columns of ``stacked`` (n, k) under the seeded draws.

    Drawing the (resamples, n) index matrix chunk by chunk from one generator gives the same
    indices as drawing it at once (numpy's bounded integers consume the stream in order)."""
    size = stacked.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, stacked.shape[1]))
    for start in range(0, resamples, _CHUNK):
        stop = min(resamples, start + _CHUNK)
        draws = rng.integers(0, size, size=(stop - start, size))
        offsets = (np.arange(stop - start) * size)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=(stop - start) * size)
        means[start:stop] = (counts.reshape(stop - start, size).astype(np.float64)
                             @ stacked) / size
    return means


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
    return excludes_zero(low, high)


def excludes_zero(low: float, high: float) -> bool:
    """True when the interval [low, high] lies entirely above or below 0."""
    return low > 0 or high < 0
