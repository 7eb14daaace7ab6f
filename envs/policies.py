"""Exploration policies for offline data collection.

I.i.d. uniform actions average out over a few steps, so the arm jitters in place. Temporally
correlated actions (a clipped AR(1) / discretised Ornstein-Uhlenbeck process) keep pushing the
same way and carry the arm across its joint range: ``wm bench collect`` measures the difference.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

POLICIES = ("random", "smooth", "mixed", "varied")

Policy = Callable[[], np.ndarray]  # called once per step, returns float32 (2,) in [-1, 1]


def random_policy(rng: np.random.Generator) -> Policy:
    return lambda: rng.uniform(-1.0, 1.0, size=2).astype(np.float32)


def smooth_policy(rng: np.random.Generator, correlation: float = 0.9, scale: float = 0.8) -> Policy:
    """AR(1) noise with unit stationary variance, scaled and clipped: ``x' = c x + sqrt(1 - c^2) e``."""
    x = rng.standard_normal(2)
    innovation = math.sqrt(1.0 - correlation**2)

    def act() -> np.ndarray:
        nonlocal x
        x = correlation * x + innovation * rng.standard_normal(2)
        return np.clip(scale * x, -1.0, 1.0).astype(np.float32)

    return act


def make_policy(name: str, rng: np.random.Generator) -> tuple[Policy, str]:
    """The policy for one episode, and the name of what was drawn (``mixed`` draws one per episode)."""
    if name == "random":
        return random_policy(rng), "random"
    if name == "smooth":
        return smooth_policy(rng), "smooth"
    if name == "mixed":  # half i.i.d., half smooth with a correlation time of 3 to 50 steps
        if rng.uniform() < 0.5:
            return random_policy(rng), "random"
        correlation = float(np.exp(-1.0 / rng.uniform(3.0, 50.0)))
        return smooth_policy(rng, correlation), f"smooth(c={correlation:.3f})"
    if name == "varied":  # smooth at a speed drawn per episode: slow, fine motion as well as fast sweeps
        scale = float(rng.uniform(0.15, 1.0))
        return smooth_policy(rng, scale=scale), f"smooth(scale={scale:.2f})"
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
