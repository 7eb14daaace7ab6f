"""``wm bench --what plan``: time per plan of CEM and MPPI with the world model's predictor.

The model is the ``demo`` preset's architecture (weights do not change the time). Each row's time is the
median of repeated plans after a warm-up, the grid timed in rounds (one plan of every setting per round), so a
slow minute of a shared machine falls on every row, not on a few. Two references from ``benchmarks.naive``,
timed in the same run: the fair one plans the problems of a call one after another with their candidates
batched; the naive one also scores one candidate per rollout call (where that takes seconds, not hours). A
third table times the model's matrix products in bf16 against float32. A speed-up is only ever a ratio of two
times measured here, next to each other: the fair one's and bf16's from runs alternated with the batched
planner's (``benchmarks.timing``), the naive one's from one plan and a batched plan right after it: on a shared
machine one setting's time moves by tens of percent within minutes.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time

import torch

from benchmarks.naive import NaiveCEMPlanner, ProblemLoopCEMPlanner
from benchmarks.timing import absolute_shown, alternating, markdown_table, paired_ratio, round_robin
from common.config import apply_overrides
from common.device import resolve_device, synchronize
from common.text import counted
from evaluation.protocols import LEWM_POLICY
from planners.config import PlannerConfig
from planners.noise import problem_keys
from planners.policy import make_planner

# LeWM's CEM search (its budget, elites and noise, no gradient steps), taken from its planner as the lewm protocol
# runs it so that the two cannot drift apart; its other settings stay at the defaults here, as they always have.
LEWM_SEARCH = {k: LEWM_POLICY[k]
               for k in ("samples", "iterations", "horizon", "cem.elites", "grad_steps", "noise_beta")}


def demo_model(device: torch.device):
    from worldmodel.model import WorldModel
    from worldmodel.train import preset_config

    torch.manual_seed(0)
    return WorldModel(dataclasses.replace(preset_config("demo").model, image_size=64)).to(device).eval()


def time_plan(planner, model, batch: int, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of one ``plan`` call for ``batch`` problems; inputs and noise keys are built before
    the clock starts (an evaluation builds its keys once per episode, not per plan)."""
    g = torch.Generator().manual_seed(1)
    d, h, dev = model.cfg.latent_dim, model.history, model.device
    z_hist = torch.randn(batch, h, d, generator=g).to(dev)
    a_hist = (torch.rand(batch, h - 1, model.action_dim, generator=g) * 2 - 1).to(dev)
    z_goal = torch.randn(batch, d, generator=g).to(dev)
    keys = problem_keys(0, range(batch), dev)
    if warm_up:
        planner.plan(z_hist, z_goal, a_hist, keys=keys)  # allocations, kernels
    times = []
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        planner.plan(z_hist, z_goal, a_hist, keys=keys)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timer(planner, model, batch: int):
    """A function timing one plan of ``planner`` per call, the first call warmed up (outside the clock)."""
    calls = []

    def run() -> float:
        calls.append(1)
        return time_plan(planner, model, batch, 1, warm_up=len(calls) == 1)
    return run


def _config(name: str, n: int, it: int, hz: int) -> PlannerConfig:
    """A search of n samples x it iterations x hz chunks alone: no gradient steps after it."""
    return apply_overrides(PlannerConfig(), {"planner": name, "samples": n, "iterations": it, "horizon": hz,
                                             "grad_steps": 0})


def default_against_lewm(model, batches, repeats: int, absolute: bool) -> list[str]:
    """The default planner (its search and gradient steps) against CEM at LeWM's setting: alternating plans,
    the ratio the median (min-max) over adjacent pairs, per batch size."""
    ours, lewm = PlannerConfig(), apply_overrides(PlannerConfig(), LEWM_SEARCH)
    rows = []
    for b in batches:
        lewm_s, ours_s = alternating(_timer(make_planner(model, lewm), model, b),
                                     _timer(make_planner(model, ours), model, b), repeats)
        rows.append([str(b), f"{1000 * statistics.median(lewm_s):.1f}", f"{1000 * statistics.median(ours_s):.1f}",
                     paired_ratio(ours_s, lewm_s)])
    head = [f"The default planner (CEM {ours.budget()}, horizon {ours.horizon}) against CEM 300 x 30 x 5, top 30 "
            f"(LeWM's setting): {counted(repeats, 'plan')} of each, alternating, the time per plan the median "
            f"(min-max) of the ratios over pairs of plans adjacent in time:", ""]
    return head + markdown_table([("batch", False), ("LeWM's setting ms", True), ("default ms", True),
                                  ("default vs LeWM's setting", False)], rows, absolute)


def run(device: str = "auto", samples=(100, 300, 1000), iterations=(10, 30), horizons=(5, 10), batches=(1, 50),
        naive_budget_s: float = 60.0, repeats: int = 3, bf16_settings=((100, 10, 5), (300, 30, 5))) -> str:
    """The tables of the module docstring; ``bf16_settings``: the CEM (samples, iterations, horizon) timed with
    bf16 matrix products against float32 (CEM 100 x 10, the default search before gradient steps, and LeWM's
    setting)."""
    dev = resolve_device(device)
    absolute = absolute_shown(dev)
    model = demo_model(dev)
    lines = [f"Model: demo preset (conv encoder, MLP predictor {model.cfg.predictor.hidden} wide x "
             f"{model.cfg.predictor.depth}, latent {model.cfg.latent_dim}, history {model.history}, "
             f"action chunk {model.action_dim}); device {dev}; torch threads {torch.get_num_threads()}.", "",
             f"Each row the median of {counted(repeats, 'plan')} (1 for settings beyond CEM 300 x 30 x 5 for 50 "
             f"problems), timed in rounds of one plan of every setting:", ""]
    grid = list(itertools.product(("cem", "mppi"), samples, iterations, horizons, batches))
    runs = {key: _timer(make_planner(model, _config(*key[:4])), model, key[-1]) for key in grid}
    plans = {(name, n, it, hz, b): repeats if n * it * hz * b <= 300 * 30 * 5 * 50 else 1
             for name, n, it, hz, b in grid}
    timed = {key: statistics.median(times) for key, times in round_robin(runs, plans).items()}
    first, first_b = timed[grid[0]], grid[0][-1]
    lines += markdown_table(
        [("planner", False), ("samples", False), ("iterations", False), ("horizon", False), ("batch", False),
         ("ms per plan", True), ("ms per problem", True), ("per plan vs row 1", False),
         ("per problem vs row 1", False)],
        [[name, str(n), str(it), str(hz), str(b), f"{1000 * t:.1f}", f"{1000 * t / b:.2f}", f"{t / first:.2f}x",
          f"{t / b / (first / first_b):.3f}x"] for (name, n, it, hz, b), t in timed.items()], absolute)

    lines += ["", *default_against_lewm(model, batches, repeats, absolute)]

    most = max(batches)
    lines += ["", f"What planning problems together buys: CEM for {most} problems in one call, against the fair "
                  f"reference that plans them one after another, each with its candidates batched (same algorithm, "
                  f"same noise, the same plans); {counted(repeats, 'plan')} of each, alternating, times their median, "
                  f"the speed-up the median (min-max) over pairs of plans adjacent in time:", ""]
    rows = []
    for n, it, hz in itertools.product(samples, iterations, horizons) if most > 1 else ():
        cfg = _config("cem", n, it, hz)
        loop_s, batched_s = alternating(_timer(ProblemLoopCEMPlanner(model, cfg), model, most),
                                        _timer(make_planner(model, cfg), model, most), repeats)
        rows.append([str(n), str(it), str(hz), f"{1000 * statistics.median(loop_s):.0f}",
                     f"{1000 * statistics.median(batched_s):.0f}", paired_ratio(loop_s, batched_s)])
    lines += markdown_table([("samples", False), ("iterations", False), ("horizon", False),
                             ("one problem at a time ms", True), ("batched ms", True), ("speed-up", False)],
                            rows, absolute)

    lines += ["", f"The model's matrix products in bf16 (`--bf16`, torch autocast; latents and costs stay float32) "
                  f"against float32: the same CEM, problems and noise; {counted(repeats, 'plan')} of each, "
                  f"alternating, the speed-up the median (min-max) over adjacent pairs (above 1: bf16 is faster):", ""]
    rows = []
    for (n, it, hz), b in itertools.product(bf16_settings, batches):
        cfg = _config("cem", n, it, hz)
        f32_s, bf16_s = alternating(_timer(make_planner(model, cfg), model, b),
                                    _timer(make_planner(model, dataclasses.replace(cfg, bf16=True)), model, b), repeats)
        rows.append([str(n), str(it), str(hz), str(b), f"{1000 * statistics.median(f32_s):.1f}",
                     f"{1000 * statistics.median(bf16_s):.1f}", paired_ratio(f32_s, bf16_s)])
    lines += markdown_table([("samples", False), ("iterations", False), ("horizon", False), ("batch", False),
                             ("float32 ms", True), ("bf16 ms", True), ("speed-up", False)], rows, absolute)

    lines += ["", "Against a straightforward loop (one candidate per rollout call, each cost read on the host), "
                  f"batch 1, one plan of each, the batched one right after the naive one (settings whose naive plan "
                  f"would take over {naive_budget_s:.0f} s are not run):", ""]
    rows = []
    for n, it, hz in itertools.product(samples, iterations, horizons):
        # The naive time grows with n * it * hz: skip settings whose estimate exceeds the budget.
        one_iteration = time_plan(NaiveCEMPlanner(model, _config("cem", n, 1, hz)), model, 1, 1)
        if ("cem", n, it, hz, 1) not in timed or one_iteration * it > naive_budget_s:
            rows.append([str(n), str(it), str(hz), "-", "-", "not run"])
            continue
        cfg = _config("cem", n, it, hz)
        (naive,), (batched,) = alternating(_timer(NaiveCEMPlanner(model, cfg), model, 1),
                                           _timer(make_planner(model, cfg), model, 1), 1)
        rows.append([str(n), str(it), str(hz), f"{1000 * naive:.0f}", f"{1000 * batched:.1f}",
                     f"{naive / batched:.0f}x"])
    lines += markdown_table([("samples", False), ("iterations", False), ("horizon", False), ("naive ms", True),
                             ("batched ms", True), ("speed-up", False)], rows, absolute)
    return "\n".join(lines)
