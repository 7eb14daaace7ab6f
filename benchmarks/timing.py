"""Ratios of two timings that a shared machine's drift does not decide.

The speed of these machines drifts by 10-25% within minutes (six identical runs in one process took 0.27
to 0.34 s), more than many of the differences measured. Runs of the two settings alternate (a, b, b, a,
a, b, ...), so run r of each is adjacent in time to the other's run r and shares its drift; the ratio
reported is the median over those pairs.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")


def alternating(run_a: Callable[[], T], run_b: Callable[[], T], repeats: int) -> tuple[list[T], list[T]]:
    """``repeats`` results of each, run in the order a, b, b, a, a, b, ...; result r of a and of b are
    adjacent in time."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    a, b = [], []
    for r in range(repeats):
        for run, out in ((run_a, a), (run_b, b)) if r % 2 == 0 else ((run_b, b), (run_a, a)):
            out.append(run())
    return a, b


def paired_ratio(numerator, denominator) -> str:
    """The median (min-max) of the ratios of paired times: ``1.23x (1.10-1.31)``; one pair: ``1.23x``."""
    ratios = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"
