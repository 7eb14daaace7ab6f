"""The methods an evaluation compares the world model with, on the same episodes: random actions, and
CEM on the true simulator state (a strong reference controller)."""

from __future__ import annotations

import dataclasses

import numpy as np

from common.config import apply_overrides
from evaluation.simulator import JOINT_COSTS, SimulatorModel
from planners.cem import CEMPlanner
from planners.config import CEMConfig
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig


def random_controller(n: int, seed: int):
    """I.i.d. uniform actions for n environments."""
    rng = np.random.default_rng([seed, 7])
    return lambda: rng.uniform(-1, 1, (n, 2)).astype(np.float32)


def simulator_controller(batch, pcfg: PolicyConfig, frameskip: int, eps: dict, seed: int,
                         samples: int | None = None, iterations: int | None = None):
    """CEM on the true MuJoCo dynamics (it sees the true state, velocity included): the reference
    controller. It plans with the world model's planner settings (all of CEM's; with MPPI, the shared
    ones and CEM's defaults) and cost, on the joint angles instead of latents; ``samples``/``iterations``
    set its budget apart (its elites then a tenth of the samples). Returns (act, policy)."""
    plan = pcfg.plan if pcfg.plan.planner == "cem" else dataclasses.replace(pcfg.plan, planner="cem", cem=CEMConfig())
    overrides = {"samples": samples or plan.samples, "iterations": iterations or plan.iterations, "seed": seed,
                 "compile": False}
    if samples:
        overrides["cem.elites"] = None  # a budget of its own: the elites are a tenth of it
    plan = dataclasses.replace(apply_overrides(plan, overrides), cost=JOINT_COSTS[plan.cost])
    sim = SimulatorModel(batch.physics, frameskip, batch.action_repeat)
    cfg = dataclasses.replace(pcfg, plan=plan, context=None, subgoals=dataclasses.replace(pcfg.subgoals, enabled=False))
    policy = MPCPolicy(sim, cfg, planner=CEMPlanner(sim, plan))
    policy.reset_latent(sim.goal_states(eps["goal_qpos"]), keys=problem_keys(seed, eps["index"]))
    return (lambda: policy.act_latent(lambda: sim.states(batch.datas), len(eps["index"]))), policy
