"""Waypoints from a graph of trajectories: where greedy planning provably fails, and the graph gets there."""

import math

import numpy as np
import torch

from planners.config import PlannerConfig
from planners.policy import MPCPolicy, PolicyConfig
from planners.subgoals import SubgoalConfig, route, targets
from worldmodel.graph import GraphConfig, LatentGraph

LIMIT = math.pi - 0.35  # a joint that stops short of +-pi, like the reacher's wrist (+-160 degrees)
SPEED = 0.3  # rad per chunk at full action


class RingWithWall:
    """A joint angle seen as (cos, sin), as an image shows an arm: the latent wraps around while the
    joint does not. An angle beyond +-LIMIT is unreachable, so from 2.7 to -2.7 the only way is 5.4 rad
    the long way round, though the two latents are 0.86 apart across the wall."""

    action_dim, frameskip, history = 1, 1, 1
    device = torch.device("cpu")

    def rollout(self, z_hist, a_hist, actions):
        theta = torch.atan2(z_hist[:, -1, 1], z_hist[:, -1, 0])  # (M,)
        out = []
        for k in range(actions.shape[1]):
            theta = (theta + SPEED * actions[:, k, 0].clamp(-1, 1)).clamp(-LIMIT, LIMIT)
            out.append(torch.stack([theta.cos(), theta.sin()], -1))
        return torch.stack(out, 1)  # (M, H, 2)


def latent(theta) -> torch.Tensor:
    theta = torch.as_tensor(theta, dtype=torch.float32)
    return torch.stack([theta.cos(), theta.sin()], -1)


def trajectories(n: int = 60, steps: int = 40, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random motion under the true dynamics: it never crosses the wall."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        theta, a, path = rng.uniform(-LIMIT, LIMIT), 0.0, []
        for _ in range(steps):
            a = float(np.clip(0.8 * a + 0.6 * rng.standard_normal(), -1, 1))
            theta = float(np.clip(theta + SPEED * a, -LIMIT, LIMIT))
            path.append(theta)
        out.append(latent(path))
    return out


def run(policy: MPCPolicy, model: RingWithWall, start: torch.Tensor, goal: torch.Tensor, steps: int) -> torch.Tensor:
    """Closed loop from angles ``start`` (B,) to goals (B,); returns the final angles."""
    theta = start.clone()
    policy.reset_latent(latent(goal))
    for _ in range(steps):
        action = torch.from_numpy(policy.act_latent(lambda: latent(theta), len(theta)))  # (B, 1)
        theta = (theta + SPEED * action[:, 0].clamp(-1, 1)).clamp(-LIMIT, LIMIT)
    return theta


PLAN = PlannerConfig(samples=64, iterations=6, horizon=3, cost="sum")
SUBGOALS = SubgoalConfig(enabled=True, reach=3.0, lookahead=3.0, graph=GraphConfig(radius=0.5))


def policy(model, subgoals: bool):
    cfg = PolicyConfig(plan=PLAN, subgoals=SUBGOALS if subgoals else SubgoalConfig(enabled=False))
    return MPCPolicy(model, cfg, LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph) if subgoals else None)


def test_graph_summary_says_whether_every_node_can_be_reached():
    one = LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph).summary()
    assert one["components"] == 1 and one["largest_component"] == 1.0 and one["links_per_node"] > 2
    steps = torch.arange(5.0)[:, None].expand(5, 3)  # (T=5, D=3), one chunk apart
    far_apart = [steps, steps + 100.0]
    two = LatentGraph.from_trajectories(far_apart, SUBGOALS.graph).summary()
    assert two == {"nodes": 10, "links_per_node": 1.6, "components": 2, "largest_component": 0.5}  # 4 links each way


def test_greedy_planning_is_stuck_at_the_wall_and_waypoints_go_round():
    model = RingWithWall()
    start, goal = torch.tensor([2.7, -2.7, 0.5]), torch.tensor([-2.7, 2.7, 1.0])  # two far goals, one near
    greedy = run(policy(model, subgoals=False), model, start, goal, steps=40)
    assert (greedy[:2] - start[:2]).abs().max() < 0.2 + 1e-4  # pressed against the wall it started by
    assert abs(greedy[2] - goal[2]) < 0.05  # a near goal is no problem
    guided = run(policy(model, subgoals=True), model, start, goal, steps=40)
    assert (guided - goal).abs().max() < 0.05, guided


def test_paths_follow_the_trajectories_and_never_cross_the_wall():
    cfg = SUBGOALS
    graph = LatentGraph.from_trajectories(trajectories(), cfg.graph)
    paths = route(graph, latent([-2.7, 0.0]), cfg)  # (B=2, N)
    assert paths.dist.shape == (2, len(graph.nodes)) and torch.isfinite(paths.dist).all()
    angles = torch.atan2(graph.nodes[:, 1], graph.nodes[:, 0])
    near_wall = graph.nearest(latent([2.7]))
    # from just inside +LIMIT to -2.7 takes about 5.4 rad / SPEED chunks along the graph, not 0.9 / SPEED
    assert paths.dist[0, near_wall] > 4.0 / SPEED
    # the waypoints ahead of +2.7 on the way to -2.7 and to 0 turn away from the wall (smaller angles)
    target = targets(graph, paths, latent([2.7, 2.7]), cfg)
    waypoints = torch.atan2(target[:, 1], target[:, 0])
    assert (waypoints < 2.7 - 0.5).all() and (waypoints > 0).all()
    # no link joins the two sides of the wall (their angles would differ by about 2 pi - 2 LIMIT the long way)
    assert (angles[graph.src] - angles[graph.dst]).abs().max() < math.pi


def test_goals_within_reach_are_planned_directly():
    cfg = SUBGOALS
    graph = LatentGraph.from_trajectories(trajectories(), cfg.graph)
    goal = latent([0.5, 0.5])
    target = targets(graph, route(graph, goal, cfg), latent([0.3, -2.0]), cfg)  # 0.2 rad away: the goal; 2.5 rad: a waypoint
    assert torch.equal(target[0], goal[0]) and not torch.equal(target[1], goal[1])


def test_routes_are_cached_per_goal_node_until_forgotten(monkeypatch):
    from planners import subgoals

    graph = LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph)
    solves = []
    real = subgoals.dijkstra
    monkeypatch.setattr(subgoals, "dijkstra", lambda *a, **k: solves.append(k["indices"]) or real(*a, **k))
    goals = latent([-2.7, 0.0, -2.7])  # two goals on one node
    first = route(graph, goals, SUBGOALS)
    assert len(solves) == 2 and first.dist[0].equal(first.dist[2])
    route(graph, goals, SUBGOALS)
    assert len(solves) == 2  # cached
    subgoals.forget_routes()
    again = route(graph, goals, SUBGOALS)
    assert len(solves) == 4 and again.dist.equal(first.dist)  # solved afresh, the same paths
