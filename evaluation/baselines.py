"""The methods an evaluation compares the world model with, on the same episodes: random actions, the
data's own exploration policy (the floor a world model must beat: it moves the arm as the data did), and
CEM on the true simulator state with a hand-made joint cost (a strong reference controller, not an upper
bound on what a world model can do)."""

from __future__ import annotations

import dataclasses

import numpy as np

from common.config import apply_overrides
from envs.policies import POLICIES, make_policy
from evaluation.simulator import JOINT_COSTS, SimulatorModel
from planners.cem import CEMPlanner
from planners.config import CEMConfig, MPPIConfig
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig


def random_controller(indices, seed: int):
    """I.i.d. uniform actions, episode j of the batch drawing from (seed, 7, index j): its own actions whatever
    the batch holds (as the exploration baseline's)."""
    rngs = [np.random.default_rng([seed, 7, int(j)]) for j in indices]
    return lambda: np.stack([rng.uniform(-1, 1, 2) for rng in rngs]).astype(np.float32)


def exploration_policies(store, episodes) -> list[str]:
    """The exploration policy that collected each of ``episodes`` (dataset indices), what the exploration
    baseline replays from their starts; a ValueError names the files that record none of ours."""
    policies = [store.policy(int(i)) for i in episodes]
    bad = sorted({f"{store.episodes[int(i)].shard} ({p!r})" for i, p in zip(episodes, policies) if p not in POLICIES})
    if bad:
        raise ValueError(f"the exploration baseline replays the policy that collected the data, and "
                         f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} records none of ours {list(POLICIES)} "
                         f"(its 'policy' attribute); leave exploration out of --baselines (e.g. --baselines "
                         f"random,simulator)")
    return policies


def exploration_controller(indices, seed: int, policies: list[str]):
    """The policy that collected each start's episode (``envs.policies``; ``mixed`` draws its kind per
    episode) from the same starts, with fresh noise per episode: episode j of the batch draws from (seed, 11,
    index j)."""
    acts = [make_policy(policy, np.random.default_rng([seed, 11, int(j)]))[0] for j, policy in zip(indices, policies)]
    return lambda: np.stack([act() for act in acts]).astype(np.float32)


# The least CEM budget (samples, iterations) of the simulator reference: the search the world model's
# planner did before gradient steps let it sample less, so the reference is not starved by that change.
SIMULATOR_BUDGET = (100, 10)


def simulator_controller(batch, pcfg: PolicyConfig, frameskip: int, eps: dict, seed: int,
                         samples: int | None = None, iterations: int | None = None, sees_velocity: bool = True):
    """CEM on the true MuJoCo dynamics (it sees the true state, velocity included unless ``sees_velocity`` is
    False: then the joint angles only, as one frame shows them) with a hand-made joint cost: the reference
    controller. It plans with the world model's planner settings (all of CEM's; with MPPI, the shared
    ones and CEM's defaults) and cost, on the joint angles instead of latents, without gradient steps (the
    simulator is not differentiable) and so with a budget of at least ``SIMULATOR_BUDGET``;
    ``samples``/``iterations`` set its budget apart (its elites then a tenth of the samples). Returns
    (act, policy)."""
    plan = pcfg.plan
    if plan.planner != "cem":  # CEM's defaults; MPPI's settings are not CEM's to read
        plan = dataclasses.replace(plan, planner="cem", cem=CEMConfig(), mppi=MPPIConfig())
    least_samples, least_iterations = SIMULATOR_BUDGET
    overrides = {"samples": samples or max(plan.samples, least_samples),
                 "iterations": iterations or max(plan.iterations, least_iterations), "seed": seed,
                 "compile": False, "grad_steps": 0}
    if overrides["samples"] != plan.samples:
        overrides["cem.elites"] = None  # a budget of its own: the elites are a tenth of it
    # warm-started replans refine in fewer iterations, never more than its own budget (--sim-iterations)
    overrides["warm_iterations"] = min(plan.warm_iterations, overrides["iterations"])
    plan = dataclasses.replace(apply_overrides(plan, overrides), cost=JOINT_COSTS[plan.cost])
    sim = SimulatorModel(batch.physics, frameskip, batch.action_repeat, sees_velocity)
    cfg = dataclasses.replace(pcfg, plan=plan, context=None, subgoals=dataclasses.replace(pcfg.subgoals, enabled=False))
    policy = MPCPolicy(sim, cfg, planner=CEMPlanner(sim, plan))
    policy.reset_latent(sim.goal_states(eps["goal_qpos"]), keys=problem_keys(seed, eps["index"]))
    return (lambda: policy.act_latent(lambda: sim.states(batch.datas), len(eps["index"]))), policy
