"""Confidence intervals that respect how evaluation episodes are drawn.

Episodes are not independent draws: several starts come from the same held-out source episode (its
target, its stretch of the joint space), across seeds too. A plain binomial interval over all
episodes then overstates certainty. We resample source episodes (clusters) with replacement, all of
a cluster's episodes together, and take the percentile interval of the success rate (the cluster
bootstrap). When every episode has the same outcome the bootstrap has no spread; the interval is then
the Wilson interval with one observation per source episode, the most conservative reading.
"""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a success rate (Wilson score): sound at 0% and 100% too."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # contains p despite rounding


def cluster_bootstrap_interval(outcomes, clusters, reps: int = 2000, level: float = 0.95,
                               seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``outcomes`` (n,) (0/1) resampling ``clusters`` (n,) ids."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    if outcomes.min() == outcomes.max():
        return wilson_interval(outcomes.sum() * len(ids) / len(outcomes), len(ids))
    sums = np.bincount(inverse, weights=outcomes, minlength=len(ids))  # (C,) per cluster
    sizes = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    draw = np.random.default_rng(seed).integers(len(ids), size=(reps, len(ids)))  # (reps, C)
    rates = sums[draw].sum(1) / sizes[draw].sum(1)
    lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    mean = outcomes.mean()
    return (float(min(lo, mean)), float(max(hi, mean)))
