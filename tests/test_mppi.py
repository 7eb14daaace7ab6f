"""MPPI: reaches reachable goals, beats random shooting, profits from warm starts; its weights."""

import pytest
import torch
from planner_fixtures import check_beats_random_shooting, check_reaches_goal, check_warm_start_helps, planner


@pytest.mark.parametrize("h", [1, 2])
def test_reaches_goal(h):
    check_reaches_goal("mppi", h, tol=1e-3, samples=100, iterations=10)


def test_beats_random_shooting():
    check_beats_random_shooting("mppi", samples=64, iterations=8)


def test_fixed_noise_beats_random_shooting():
    check_beats_random_shooting("mppi", samples=64, iterations=8, adapt_std=False)


def test_warm_start_helps():
    check_warm_start_helps("mppi", samples=32, iterations=2)


def test_weights():
    cost = torch.tensor([[3.0, 1.0, 2.0, 1e4], [5.0, 5.0, 5.0, 5.0]])  # (B=2, N=4)
    for normalize in (True, False):
        w = planner("mppi", normalize=normalize, temperature=1e-3).weights(cost)
        assert torch.allclose(w.sum(1), torch.ones(2)) and torch.isfinite(w).all()
        assert torch.allclose(w[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # cold: all weight on the best
        assert torch.allclose(w[1], torch.full((4,), 0.25))  # equal costs: equal weights
    hot = planner("mppi", normalize=False, temperature=1e6).weights(cost[:, :3])
    assert torch.allclose(hot, torch.full((2, 3), 1 / 3))  # hot: plain average


def test_normalized_weights_ignore_cost_scale_and_offset():
    p = planner("mppi", temperature=0.5)
    cost = torch.rand(3, 16)
    assert torch.allclose(p.weights(cost), p.weights(1e3 * cost + 7.0), atol=1e-6)


def test_rejects_nonpositive_temperature():
    with pytest.raises(ValueError):
        planner("mppi", temperature=0.0)
