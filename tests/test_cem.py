"""CEM: reaches reachable goals, beats random shooting, profits from warm starts, matches the naive CEM."""

import dataclasses

import pytest
from planner_fixtures import (
    CountingModel,
    LinearDynamics,
    planner_config,
    check_beats_random_shooting,
    check_reaches_goal,
    check_warm_start_helps,
    initial_cost,
    make_problems,
)

import torch

from benchmarks.naive import NaiveCEMPlanner
from planners.cem import CEMPlanner
from planners.config import CEMConfig


@pytest.mark.parametrize("h", [1, 2])
def test_reaches_goal(h):
    check_reaches_goal("cem", h, tol=2e-2, samples=100, iterations=20, elites=10)


def test_beats_random_shooting():
    check_beats_random_shooting("cem", samples=64, iterations=8)


def test_warm_start_helps():
    check_warm_start_helps("cem", samples=32, iterations=2)


def test_elites_carried():
    assert CEMConfig(elites=30).n_kept(100) == 9 and CEMConfig(elites=2).n_kept(100) == 1
    assert CEMConfig(keep_elites=False).n_kept(100) == 0 and CEMConfig(keep_elites=False).n_carry(100) == 1
    assert CEMConfig().n_elites(300) == 30 and CEMConfig().n_elites(16) == 2 and CEMConfig().n_elites(100) == 10
    cem = CEMPlanner(LinearDynamics(), dataclasses.replace(planner_config("cem"), samples=300))
    assert cem.n_elites == 30  # derived from the samples, not frozen at construction
    with pytest.raises(ValueError):
        planner_config("cem", samples=10, elites=20)


def test_without_kept_elites_still_reaches_goal():
    check_reaches_goal("cem", 1, tol=2e-2, samples=100, iterations=20, elites=10, keep_elites=False)


def test_naive_cem_agrees_in_quality():
    model = CountingModel(LinearDynamics())
    z, g, a = make_problems(model.model, 6, h=2)
    cfg = planner_config("cem", samples=50, iterations=8, elites=8, cost="final")
    naive = NaiveCEMPlanner(model, cfg).plan(z, g, a)
    assert model.calls == 6 * (50 * 8 + 1)  # one rollout per candidate and problem
    batched = CEMPlanner(model.model, cfg).plan(z, g, a)
    assert naive.actions.shape == batched.actions.shape and naive.actions.abs().max() <= 1
    gain_naive = (naive.cost / initial_cost(z, g)).log10()  # (B,) decades gained
    gain_batched = (batched.cost / initial_cost(z, g)).log10()
    assert gain_naive.max() < -1 and gain_batched.max() < -1  # both cut the distance to the goal 10-fold
    assert (gain_naive.mean() - gain_batched.mean()).abs() < 0.5  # and agree within half a decade


def test_lewm_variant_returns_the_final_mean():
    """LeWM's CEM: no momentum, the current mean as candidate 0, the final mean executed."""
    model = LinearDynamics()
    z, g, a = make_problems(model, 4, h=1)
    cfg = planner_config("cem", samples=100, iterations=15, elites=10, momentum=0.0, keep_elites=False, min_std=0.0,
                         plan_from="mean", cost="final")
    res = CEMPlanner(model, cfg).plan(z, g, a)
    reached = (model.rollout(z, a, res.actions)[:, -1] - g).square().sum(-1)
    assert torch.allclose(reached, res.cost, rtol=1e-4, atol=1e-6)
    assert (res.cost / initial_cost(z, g)).max() < 0.05
