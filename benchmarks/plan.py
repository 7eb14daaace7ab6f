"""``wm bench --what plan``: time per plan of CEM and MPPI with the world model's predictor.

The model is the ``demo`` preset's architecture (weights do not change the time). Each row's time is
the median of repeated plans after a warm-up. The naive reference (one candidate of one problem at a
time, ``benchmarks.naive``) is timed in the same run where that takes seconds, not hours; the speed-up
column is only ever a ratio of two times measured here.
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from benchmarks.naive import NaiveCEMPlanner
from common.config import apply_overrides
from common.device import resolve_device, synchronize
from planners.config import PlannerConfig
from planners.policy import make_planner


def demo_model(device: torch.device):
    import dataclasses

    from worldmodel.model import WorldModel
    from worldmodel.train import preset_config

    torch.manual_seed(0)
    return WorldModel(dataclasses.replace(preset_config("demo").model, image_size=64)).to(device).eval()


def time_plan(planner, model, batch: int, repeats: int) -> float:
    """Median seconds of one ``plan`` call for ``batch`` problems."""
    g = torch.Generator().manual_seed(1)
    d, h, dev = model.cfg.latent_dim, model.history, model.device
    z_hist = torch.randn(batch, h, d, generator=g).to(dev)
    a_hist = (torch.rand(batch, h - 1, model.action_dim, generator=g) * 2 - 1).to(dev)
    z_goal = torch.randn(batch, d, generator=g).to(dev)
    planner.plan(z_hist, z_goal, a_hist)  # warm up (allocations, kernels)
    times = []
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        planner.plan(z_hist, z_goal, a_hist)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: str = "auto", samples=(100, 300, 1000), iterations=(10, 30), horizons=(5, 10), batches=(1, 50),
        naive_budget_s: float = 60.0) -> str:
    dev = resolve_device(device)
    model = demo_model(dev)
    lines = [f"Model: demo preset (conv encoder, MLP predictor {model.cfg.predictor.hidden} wide x "
             f"{model.cfg.predictor.depth}, latent {model.cfg.latent_dim}, history {model.history}, "
             f"action chunk {model.action_dim}); device {dev}; torch threads {torch.get_num_threads()}.", "",
             "| planner | samples | iterations | horizon | batch | ms per plan | ms per problem |",
             "|---|---|---|---|---|---|---|"]
    headline = {}
    for name, n, it, hz, b in itertools.product(("cem", "mppi"), samples, iterations, horizons, batches):
        planner = make_planner(model, apply_overrides(PlannerConfig(), {"planner": name, "samples": n, "iterations": it,
                                                                         "horizon": hz}))
        repeats = 3 if n * it * hz * b <= 300 * 30 * 5 * 50 else 1
        t = time_plan(planner, model, b, repeats)
        headline[(name, n, it, hz, b)] = t
        lines.append(f"| {name} | {n} | {it} | {hz} | {b} | {1000 * t:.1f} | {1000 * t / b:.2f} |")

    lines += ["", "Batched CEM against the naive reference (one candidate at a time), same settings, batch 1:", "",
              "| samples | iterations | horizon | naive ms | batched ms | speed-up |", "|---|---|---|---|---|---|"]
    for n, it, hz in itertools.product(samples, iterations, horizons):
        batched = headline.get(("cem", n, it, hz, 1))
        # The naive time grows with n * it * hz: skip settings whose estimate exceeds the budget.
        probe = NaiveCEMPlanner(model, PlannerConfig(samples=n, iterations=1, horizon=hz))
        one_iteration = time_plan(probe, model, 1, 1)
        if batched is None or one_iteration * it > naive_budget_s:
            lines.append(f"| {n} | {it} | {hz} | not run (about {one_iteration * it:.0f} s) | - | - |")
            continue
        naive = time_plan(NaiveCEMPlanner(model, PlannerConfig(samples=n, iterations=it, horizon=hz)), model, 1, 1)
        lines.append(f"| {n} | {it} | {hz} | {1000 * naive:.0f} | {1000 * batched:.1f} | {naive / batched:.0f}x |")
    return "\n".join(lines)
