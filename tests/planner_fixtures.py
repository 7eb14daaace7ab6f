"""Known dynamics and shared checks for the planner tests.

``LinearDynamics`` honours the world model's ``rollout`` contract, so planners are tested on a
problem whose goal is known to be reachable in H steps.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange, repeat
from torch import Tensor

from common.config import apply_overrides
from planners.base import shift_plan
from planners.cem import CEMPlanner
from planners.config import PlannerConfig
from planners.mppi import MPPIPlanner

D, A, H = 4, 4, 5  # latent dim, action chunk dim, horizon
PLANNERS = {"cem": CEMPlanner, "mppi": MPPIPlanner}
SHARED = {f.name for f in dataclasses.fields(PlannerConfig)} - set(PLANNERS)  # the settings every planner has


def planner_config(name: str, **settings) -> PlannerConfig:
    """A ``PlannerConfig`` of planner ``name`` from flat keywords: the shared settings by their names, the
    planner's own (``elites``, ``temperature``) under its prefix (``cem.elites``); no gradient steps unless
    ``grad_steps`` is given."""
    settings = {"grad_steps": 0} | settings  # the search alone unless a test asks for gradient steps
    named = {(k if k in SHARED else f"{name}.{k}"): v for k, v in settings.items()}
    return apply_overrides(PlannerConfig(planner=name), named)


class LinearDynamics:
    """``z' = M z + G a``: a rotation by ``spin`` (norm-preserving) and a well-conditioned input matrix.

    With ``spin=0`` every latent is a fixed point under zero action, like a reacher arm at rest.
    Rollout uses only the last history latent and asserts the shapes of the contract.
    """

    action_dim = A

    def __init__(self, seed: int = 0, spin: float = 0.3):
        g = torch.Generator().manual_seed(seed)
        skew = torch.randn(D, D, generator=g)
        self.M = torch.linalg.matrix_exp(spin * (skew - skew.T))  # (D, D)
        self.G = 0.4 * torch.eye(D, A) + 0.1 * torch.randn(D, A, generator=g)  # (D, A)

    def rollout(self, z_hist: Tensor, a_hist: Tensor | None, actions: Tensor) -> Tensor:
        M, h, _ = z_hist.shape
        assert actions.shape[0] == M and actions.shape[2] == A
        assert (a_hist is None) == (h == 1) and (a_hist is None or a_hist.shape == (M, h - 1, A))
        z, out = z_hist[:, -1], []  # (M, D)
        for t in range(actions.shape[1]):
            z = z @ self.M.T + actions[:, t] @ self.G.T
            out.append(z)
        return torch.stack(out, dim=1)  # (M, H, D)


class CountingModel:
    """Wraps a model and counts ``rollout`` calls and the rows (sequences) they scored."""

    def __init__(self, model):
        self.model, self.action_dim, self.calls, self.rows = model, model.action_dim, 0, 0

    def rollout(self, z_hist, a_hist, actions):
        self.calls, self.rows = self.calls + 1, self.rows + actions.shape[0]
        return self.model.rollout(z_hist, a_hist, actions)


def make_problems(model: LinearDynamics, B: int, h: int = 1, seed: int = 0):
    """B problems whose goal is reached in H steps by actions in [-0.7, 0.7]: (z_hist, z_goal, a_hist)."""
    g = torch.Generator().manual_seed(seed)
    z_hist = torch.randn(B, h, D, generator=g)
    a_hist = None if h == 1 else torch.rand(B, h - 1, A, generator=g) * 2 - 1
    target = (torch.rand(B, H, A, generator=g) * 2 - 1) * 0.7
    z_goal = model.rollout(z_hist, a_hist, target)[:, -1]
    return z_hist, z_goal, a_hist


def planner(name: str, model=None, **overrides):
    """A small, fast planner of the given kind (``cem`` or ``mppi``) on the linear model."""
    small = dict(samples=64, iterations=8, cost="final") | (dict(elites=8) if name == "cem" else {})
    return PLANNERS[name](model or LinearDynamics(), planner_config(name, **(small | overrides)))


def random_shooting_cost(model, z_hist, z_goal, a_hist, n: int, seed: int = 0) -> Tensor:
    """Best final cost of ``n`` uniform random sequences per problem: ``(B,)``."""
    B = z_hist.shape[0]
    acts = torch.rand(B * n, H, A, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B*n, H, A)
    rep = lambda x: None if x is None else repeat(x, "b h d -> (b n) h d", n=n)  # noqa: E731
    z = rearrange(model.rollout(rep(z_hist), rep(a_hist), acts)[:, -1], "(b n) d -> b n d", b=B)
    return (z - z_goal[:, None]).square().sum(-1).min(1).values


def initial_cost(z_hist: Tensor, z_goal: Tensor) -> Tensor:
    """Squared distance from the current latent to the goal: ``(B,)``, the scale for tolerances."""
    return (z_hist[:, -1] - z_goal).square().sum(-1)


def check_reaches_goal(name: str, h: int, tol: float, **cfg):
    """The plan's predicted final latent is within ``tol`` (relative squared distance) of the goal."""
    model = LinearDynamics()
    z, g, a = make_problems(model, 8, h)
    res = planner(name, model, **cfg).plan(z, g, a)
    reached = (model.rollout(z, a, res.actions)[:, -1] - g).square().sum(-1)  # (B,)
    assert torch.allclose(reached, res.cost, rtol=1e-4, atol=1e-6)
    assert (res.cost / initial_cost(z, g)).max() < tol


def check_beats_random_shooting(name: str, **cfg):
    """Same rollout budget (samples x iterations): the planner ends lower on every problem."""
    model = LinearDynamics()
    z, g, a = make_problems(model, 8, 1, seed=1)
    p = planner(name, model, **cfg)
    res = p.plan(z, g, a)
    rs = random_shooting_cost(model, z, g, a, p.cfg.samples * p.cfg.iterations)
    assert (res.cost < rs).all(), (res.cost, rs)


def check_warm_start_helps(name: str, **small_budget):
    """After executing one chunk, the shifted previous plan beats a cold start on a small budget.

    The goal is a fixed point (``spin=0``), so the zero-padded shifted plan still ends on it.
    """
    model = LinearDynamics(spin=0.0)
    z, g, _ = make_problems(model, 8, 1, seed=2)
    prev = planner(name, model, samples=200, iterations=15).plan(z, g)
    z1 = model.rollout(z, None, prev.actions[:, :1])  # (B, 1, D): the state after the executed chunk
    cold = planner(name, model, **small_budget).plan(z1, g)
    warm = planner(name, model, **small_budget).plan(z1, g, init=shift_plan(prev.actions, 1))
    assert warm.cost.mean() < 0.5 * cold.cost.mean(), (warm.cost, cold.cost)
