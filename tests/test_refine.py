"""Gradient refinement: Adam steps on a plan's actions lower its cost, never raise it, stay in the action
range, treat problems independently, and run inside a planner under no_grad or inference mode."""

import pytest
import torch
from planner_fixtures import PLANNERS, CountingModel, LinearDynamics, make_problems, planner

from planners.config import PlannerConfig
from planners.refine import descend

NAMES = sorted(PLANNERS)


def quadratic(target):
    """Cost ``|a - target|^2`` per problem: ``(B, H, A) -> (B,)``."""
    return lambda a: (a - target).square().sum((-1, -2))


def test_descend_lowers_the_cost_towards_the_minimum_and_keeps_the_range():
    target = torch.tensor([0.3, -0.5, 2.0]).expand(2, 4, 3)  # (B, H, A); the last action's minimum lies beyond 1
    start = torch.zeros(2, 4, 3)
    cost = quadratic(target)
    a, c = descend(cost, start, cost(start), steps=200, lr=0.05)
    assert torch.allclose(c, cost(a))  # the cost returned is the actions'
    assert a.abs().max() <= 1
    assert torch.allclose(a[..., :2], target[..., :2], atol=0.02) and torch.allclose(a[..., 2], torch.ones(2, 4))


def test_descend_never_returns_a_worse_plan_and_zero_steps_change_nothing():
    target = torch.zeros(3, 2, 2)
    start = torch.full((3, 2, 2), 0.01)
    cost = quadratic(target)
    a, c = descend(cost, start, cost(start), steps=3, lr=0.5)  # steps far too large: every step overshoots
    assert bool((c <= cost(start)).all()) and torch.equal(a, start)
    a0, c0 = descend(cost, start, cost(start), steps=0, lr=0.05)
    assert torch.equal(a0, start) and torch.equal(c0, cost(start))


def test_descend_treats_problems_independently():
    g = torch.Generator().manual_seed(0)
    target, start = torch.rand(4, 3, 2, generator=g), torch.rand(4, 3, 2, generator=g) - 0.5
    cost = quadratic(target)
    together, _ = descend(cost, start, cost(start), steps=5, lr=0.1)
    for b in range(4):
        alone, _ = descend(quadratic(target[b:b + 1]), start[b:b + 1], cost(start)[b:b + 1], steps=5, lr=0.1)
        assert torch.allclose(alone, together[b:b + 1])


@pytest.mark.parametrize("name", NAMES)
def test_gradient_steps_refine_a_small_search(name):
    """The same search and noise, then gradient steps: every problem's plan costs no more, most less, and
    each step is one rollout of B rows (plus one for the last step's result)."""
    model = CountingModel(LinearDynamics())
    z, g, a = make_problems(model.model, 6, h=2)
    plain = planner(name, model, samples=8, iterations=2).plan(z, g, a)
    model.calls, model.rows = 0, 0
    refined = planner(name, model, samples=8, iterations=2, grad_steps=10).plan(z, g, a)
    assert model.calls == 2 + 1 + 10 + 1 and model.rows == 2 * 6 * 8 + 6 + 11 * 6
    assert bool((refined.cost <= plain.cost + 1e-6).all()) and bool((refined.cost < 0.5 * plain.cost).all())
    reached = (model.model.rollout(z, a, refined.actions)[:, -1] - g).square().sum(-1)
    assert torch.allclose(reached, refined.cost, rtol=1e-4, atol=1e-6) and refined.actions.abs().max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_gradient_steps_run_under_inference_mode(name):
    z, g, a = make_problems(LinearDynamics(), 2, h=2)
    p = planner(name, samples=8, iterations=2, grad_steps=3)
    expected = p.plan(z, g, a)
    p.reset()
    with torch.inference_mode():
        got = p.plan(z.clone(), g.clone(), a.clone())
    assert torch.equal(got.actions, expected.actions)


def test_gradient_step_settings_are_checked():
    with pytest.raises(ValueError, match="grad_steps"):
        PlannerConfig(grad_steps=-1)
    with pytest.raises(ValueError, match="grad_lr"):
        PlannerConfig(grad_lr=0.0)
    assert PlannerConfig().budget() == "20 x 4 + 8 gradient steps"
    assert PlannerConfig(grad_steps=0).budget() == "20 x 4"
