"""One interval method for every success rate we report, respecting how episodes are drawn.

Episodes are not independent draws: several starts come from the same source episode (its target, its
stretch of the joint space), across seeds too, and pooled runs add their own source episodes. A plain
binomial interval over all episodes then overstates certainty. We take the Wilson score interval at the
effective sample size n / deff, where the design effect deff is the cluster-robust (between source
episodes) variance of the rate over the binomial variance, never below 1. When every outcome is the
same there is no evidence of clustering and deff = 1, so the interval of a perfect rate is never wider
than that of a lower rate from as many episodes.
"""

from __future__ import annotations

import math

import numpy as np

METHOD = ("95% Wilson score interval at the effective sample size n / deff, deff = cluster-robust variance "
          "(clusters: source episodes) / binomial variance, at least 1")
MIN_CLUSTERS = 10  # fewer source episodes than this behind a rate: a warning in every report


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a success rate (Wilson score), sound at 0% and 100% too; ``n`` may be an
    effective (fractional) sample size."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # contains p despite rounding


def design_effect(outcomes, clusters) -> float:
    """Cluster-robust variance of the mean of 0/1 ``outcomes`` (clusters: ``clusters``) over the binomial
    variance, at least 1; 1 when all outcomes agree or there is one cluster."""
    y = np.asarray(outcomes, dtype=np.float64)
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    n, c, p = len(y), len(ids), y.mean()
    binomial = p * (1 - p) / n
    if binomial == 0 or c < 2:
        return 1.0
    sums = np.bincount(inverse, weights=y, minlength=c)  # (C,) successes per cluster
    sizes = np.bincount(inverse, minlength=c).astype(np.float64)
    robust = c / (c - 1) * np.sum((sums - p * sizes) ** 2) / n**2
    return max(1.0, float(robust / binomial))


def success_interval(outcomes, clusters) -> tuple[float, float]:
    """The 95% interval of the success rate of ``outcomes`` (n,) drawn from source episodes ``clusters``
    (n,): Wilson at n / deff (``METHOD``)."""
    y = np.asarray(outcomes, dtype=np.float64)
    if len(y) == 0:
        return (0.0, 1.0)
    n_eff = len(y) / design_effect(y, clusters)
    return wilson_interval(y.mean() * n_eff, n_eff)


def cluster_warning(clusters) -> str | None:
    """A sentence when fewer than ``MIN_CLUSTERS`` source episodes back a rate, else None."""
    count = len(set(np.asarray(clusters).tolist()))
    if count < MIN_CLUSTERS:
        return (f"only {count} source episode(s) back this rate: its interval rests on few independent draws "
                f"(use more held-out episodes)")
    return None


def paired_counts(new, base) -> tuple[int, int]:
    """(better, worse): episodes only ``new`` succeeded in and episodes only ``base`` did, of two success
    sequences over the same episodes."""
    pairs = [(bool(n), bool(b)) for n, b in zip(new, base, strict=True)]
    return sum(n and not b for n, b in pairs), sum(b and not n for n, b in pairs)


def sign_test(better: int, worse: int) -> float:
    """Two-sided p-value of a paired comparison of two methods on the same episodes: ``better`` episodes
    only the candidate succeeded in, ``worse`` only the reference did (ties carry no information)."""
    from scipy.stats import binomtest

    n = better + worse
    return float(binomtest(better, n, 0.5).pvalue) if n else 1.0


def format_p(p: float, alpha: float | None = None) -> str:
    """A p-value as a table reads it: two significant digits (0.55, 0.049, 0.0012), ``< 0.001`` below 0.001;
    given the ``alpha`` a verdict compares it with, as many more digits as keep it on its side of ``alpha``
    (0.0498 at 0.05, not 0.050)."""
    if p < 0.001 and (alpha is None or alpha >= 0.001):
        return "< 0.001"
    shown = (f"{p:#.{digits}g}" for digits in range(2, 18))
    return next(text for text in shown if alpha is None or (float(text) < alpha) == (p < alpha))
