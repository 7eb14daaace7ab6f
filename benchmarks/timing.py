"""Timings and their ratios that a shared machine's drift does not decide.

The speed of these machines drifts by 10-25% within minutes (six identical runs in one process took 0.27
to 0.34 s), more than many of the differences measured. Runs of two settings alternate (a, b, b, a, a,
b, ...), so run r of each is adjacent in time to the other's run r and shares its drift; the ratio
reported is the median over those pairs. A table of many settings is timed in rounds, each round one run
of every setting. For the same reason absolute times and rates are printed only on a GPU machine
(``absolute_shown``); on a CPU the tables hold the ratios alone.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import numpy as np
import torch

from common.device import available_cores

T = TypeVar("T")


def round_robin(runs: dict, repeats: dict) -> dict:
    """``repeats[key]`` results of each ``runs[key]()``, taken in rounds: round r runs every key with more
    than r repeats, in the given order on even rounds and reversed on odd ones. The r-th runs of all keys are
    neighbours in time, so no one setting takes all of a slow minute."""
    if any(n < 1 for n in repeats.values()):
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = {key: [] for key in runs}
    for r in range(max(repeats.values(), default=0)):
        keys = [k for k in runs if repeats[k] > r]
        for key in keys if r % 2 == 0 else keys[::-1]:
            out[key].append(runs[key]())
    return out


def alternating(run_a: Callable[[], T], run_b: Callable[[], T], repeats: int) -> tuple[list[T], list[T]]:
    """``repeats`` results of each, run in the order a, b, b, a, a, b, ...; result r of a and of b are
    adjacent in time."""
    out = round_robin({"a": run_a, "b": run_b}, {"a": repeats, "b": repeats})
    return out["a"], out["b"]


def paired_ratio(numerator, denominator) -> str:
    """The median (min-max) of the ratios of paired times: ``1.23x (1.10-1.31)``; one pair: ``1.23x``."""
    ratios = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    digits = 2 if ratios.min() >= 0.1 else 3  # 0.012x, not 0.01x
    if len(ratios) == 1:
        return f"{ratios[0]:.{digits}f}x"
    return f"{np.median(ratios):.{digits}f}x ({ratios.min():.{digits}f}-{ratios.max():.{digits}f})"


def busy_machine_note(per_core: float = 0.5) -> str:
    """A warning for a report whose timing begins while other work runs (the 1-minute load average at least
    ``per_core`` per core this process may use): alternating runs share a steady load, not one that comes
    and goes, so the ratios may be off too. Empty on a quiet machine, or where the load is unknown."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    cores = available_cores()
    if load < per_core * cores:
        return ""
    return (f"**Warning**: the load average was {load:.1f} on {cores} core(s) when this benchmark began: other work "
            f"was running, and its timings, ratios included, may be off. Run it again on a quiet machine.")


def absolute_shown(device: torch.device | None = None) -> bool:
    """Whether absolute times and rates are printed: on a GPU (``device``, or this machine when None), where
    they are the numbers to report; not on a shared CPU, where they move between runs and days."""
    return device.type == "cuda" if device is not None else torch.cuda.is_available()


def markdown_table(columns: list[tuple[str, bool]], rows: list[list[str]], absolute: bool) -> list[str]:
    """A Markdown table of ``columns`` (name, whether it is an absolute time or rate) and ``rows`` of cells;
    the absolute columns are left out unless ``absolute``."""
    keep = [i for i, (_, is_absolute) in enumerate(columns) if absolute or not is_absolute]
    lines = ["| " + " | ".join(columns[i][0] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
