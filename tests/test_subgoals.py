"""Waypoints from a graph of trajectories: where greedy planning provably fails, and the graph gets there."""

import math

import numpy as np
import pytest
import torch

from planners.config import PlannerConfig
from planners.policy import MPCPolicy, PolicyConfig
from planners.subgoals import (SOLVE_MARGIN, Router, SubgoalConfig, cover, forget_routes, route, solve,
                               targets, waypoints)
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
    solve(graph, paths, latent([2.7, 2.7]))  # both arms start by the wall
    near_wall = graph.nearest(latent([2.7]))
    assert paths.dist.shape == (2, len(graph.nodes)) and torch.isfinite(paths.dist[:, near_wall]).all()
    angles = torch.atan2(graph.nodes[:, 1], graph.nodes[:, 0])
    # from just inside +LIMIT to -2.7 takes about 5.4 rad / SPEED chunks along the graph, not 0.9 / SPEED
    assert paths.dist[0, near_wall] > 4.0 / SPEED
    # the waypoints ahead of +2.7 on the way to -2.7 and to 0 turn away from the wall (smaller angles)
    target = targets(graph, paths, latent([2.7, 2.7]), cfg)
    waypoints = torch.atan2(target[:, 1], target[:, 0])
    assert (waypoints < 2.7 - 0.5).all() and (waypoints > 0).all()
    # no link joins the two sides of the wall (their angles would differ by about 2 pi - 2 LIMIT the long way)
    assert (angles[graph.src] - angles[graph.dst]).abs().max() < math.pi


def test_a_link_across_the_wall_has_no_detour_and_is_dropped():
    """An encoder that sees the two sides of the wall as alike puts them within a link's reach, and routes
    lead into the wall. Here: parallel episodes, 0.2 apart, along a band bent into a ring that almost
    closes (its ends 0.4 chunks apart, as the two folded arms look alike) while the arm moves only along
    the band. A link across the gap joins parts that nothing shorter joins within ``detour`` chunks; a true
    link's ends are joined by shorter ones (0.4 across two episodes: two links of 0.2), so only the
    gap's go."""
    length, gap = 30, 0.4  # chunks along the band, and between its ends
    radius = (length + gap) / (2 * math.pi)  # one chunk of arc per step
    angle = torch.arange(length + 1.0) / radius
    band = [torch.stack([radius * angle.cos(), radius * angle.sin(), torch.full_like(angle, 0.2 * j)], -1)
            for j in range(6)]  # (T=31, D=3) each

    def way_round(graph) -> float:  # chunks along the graph from one end of the band to the other
        return float(Router(graph).tree(0)[0][length])

    every_link = LatentGraph.from_trajectories(band, GraphConfig(radius=0.5, detour=0))
    checked = LatentGraph.from_trajectories(band, GraphConfig(radius=0.5, detour=8))
    across = (every_link.src % (length + 1) - every_link.dst % (length + 1)).abs() == length  # end to end
    assert across.sum() > 0 and way_round(every_link) < 1.0
    assert len(checked.src) == len(every_link.src) - across.sum()  # those links, and no other
    assert way_round(checked) > length - 1  # the long way, along the band


def test_goals_within_reach_are_planned_directly():
    cfg = SUBGOALS
    graph = LatentGraph.from_trajectories(trajectories(), cfg.graph)
    goal, start = latent([0.5, 0.5]), latent([0.3, -2.0])  # 0.2 rad away: the goal; 2.5 rad: a waypoint
    paths = route(graph, goal, cfg)
    with pytest.raises(RuntimeError, match="solve the route"):
        targets(graph, paths, start, cfg)
    solve(graph, paths, start)
    target = targets(graph, paths, start, cfg)
    assert torch.equal(target[0], goal[0]) and not torch.equal(target[1], goal[1])
    assert paths.to_goal.tolist() == [True, False]


def walk(graph: LatentGraph, goal: int, start: int, lookahead: float) -> int:
    """The waypoint by definition: hop along the shortest path from ``start`` until ``lookahead`` chunks are
    covered or the goal is reached (the paths of a whole solve, hop by hop)."""
    dist, nxt = Router(graph).tree(goal)
    node = start
    while dist[start] - dist[node] < lookahead - 1e-4 and nxt[node] != node:
        node = nxt[node]
    return int(node)


def test_a_solve_stops_near_the_start_and_agrees_with_the_whole_one():
    """A near goal is solved only a margin beyond the start; on every node solved, distances and waypoints
    (found by jumps on the device) are those of the whole solve, walked hop by hop."""
    graph = LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph)
    goals, starts = latent([0.0, 0.0, 2.0]), latent([0.3, -2.4, -2.0])  # near, far, far
    paths = route(graph, goals, SUBGOALS)
    solve(graph, paths, starts)
    whole = Router(graph)
    n = len(graph.nodes)
    for b in range(3):
        dist = whole.tree(int(paths.goal_node[b]))[0]
        solved = torch.isfinite(paths.dist[b]).numpy()
        assert np.allclose(paths.dist[b].numpy()[solved], dist[solved])
        start = int(graph.nearest(starts[b:b + 1]))
        assert dist[start] + SOLVE_MARGIN <= paths.solved[b] and np.all(dist[~solved] > paths.solved[b])
    assert 0 < torch.isfinite(paths.dist[0]).sum() < n and paths.solved[0] < np.inf  # the near goal's stopped early
    for b in range(3):
        for node in np.flatnonzero(torch.isfinite(paths.dist[b]).numpy())[::7]:
            at = torch.full((3,), int(node))
            ahead = int(waypoints(paths, at, SUBGOALS.lookahead)[b])
            assert ahead == walk(graph, int(paths.goal_node[b]), int(node), SUBGOALS.lookahead)


def test_an_arm_straying_beyond_the_solve_heads_for_its_goal_once_and_the_solve_grows():
    """Beyond what is solved, an arm plans to its goal for that plan only (not latched), and the next look
    solves its paths whole; one within the margin of the edge has them solved further before it gets there."""
    graph = LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph)
    goal, start = latent([0.0]), latent([0.3])
    paths = route(graph, goal, SUBGOALS)
    solve(graph, paths, start)
    assert np.isfinite(paths.solved[0])
    far_away = latent([-2.7])  # an arm that leapt far beyond what was solved
    assert not torch.isfinite(paths.dist[0, graph.nearest(far_away)])
    target = targets(graph, paths, far_away, SUBGOALS)
    assert torch.equal(target, goal) and paths.to_goal.all() and not paths.near.any()  # the goal, not latched
    cover(graph, paths)
    assert paths.strays == 1 and paths.solved[0] == np.inf  # solved whole: its distance there is unknown
    target = targets(graph, paths, far_away, SUBGOALS)
    assert not torch.equal(target, goal) and not paths.to_goal.any()  # a waypoint again
    forget_routes()  # the whole solve is cached: start over
    paths = route(graph, goal, SUBGOALS)
    solve(graph, paths, start)
    beyond = graph.nearest(latent([1.7]))
    assert not torch.isfinite(paths.dist[0, beyond])
    targets(graph, paths, latent([1.3]), SUBGOALS)  # an arm that moved away, to within the margin of the edge
    far = float(paths.far[0])
    assert np.isfinite(far) and far + SOLVE_MARGIN > paths.solved[0]
    cover(graph, paths)
    assert paths.solved[0] >= far + SOLVE_MARGIN and paths.strays == 0 and torch.isfinite(paths.dist[0, beyond])


def test_routes_are_cached_per_goal_node_until_forgotten(monkeypatch):
    from planners import subgoals

    graph = LatentGraph.from_trajectories(trajectories(), SUBGOALS.graph)
    solves = []
    real = subgoals.dijkstra
    monkeypatch.setattr(subgoals, "dijkstra", lambda *a, **k: solves.append(k["indices"]) or real(*a, **k))
    goals, starts = latent([-2.7, 0.0, -2.7]), latent([-2.6, 0.1, -2.5])  # two goals on one node
    first = route(graph, goals, SUBGOALS)
    assert not solves and not first.is_solved  # nothing is solved before the starts are known
    solve(graph, first, starts)
    assert len(solves) == 2 and first.dist[0].equal(first.dist[2])
    again = route(graph, goals, SUBGOALS)
    solve(graph, again, starts)
    assert len(solves) == 2  # cached
    subgoals.forget_routes()
    fresh = route(graph, goals, SUBGOALS)
    solve(graph, fresh, starts)
    assert len(solves) == 4 and fresh.dist.equal(first.dist)  # solved afresh, the same paths


def test_an_episodes_first_plan_takes_the_nearest_nodes_its_solve_found(monkeypatch):
    """At an episode's first chunk boundary the solve finds the starts' nearest nodes; the first plan's
    waypoints take them instead of searching again (one search per boundary), and are those a route solved
    and searched afresh gives."""
    model, start, goal = RingWithWall(), latent([2.7, -2.7, 0.5]), latent([-2.7, 2.7, 1.0])
    mpc = policy(model, subgoals=True)
    searches = []
    real = LatentGraph.nearest
    monkeypatch.setattr(LatentGraph, "nearest", lambda self, z: searches.append(len(z)) or real(self, z))
    mpc.reset_latent(goal)
    assert searches == [3]  # the goals' nodes
    mpc.act_latent(lambda: start, 3)
    assert searches == [3, 3] and len(mpc.plan_times) == 1  # the starts' nodes, for the solve and the plan
    fresh = route(mpc.graph, goal, SUBGOALS)
    found = solve(mpc.graph, fresh, start)
    assert torch.equal(found, real(mpc.graph, start))
    assert torch.equal(targets(mpc.graph, fresh, start, SUBGOALS), mpc.last_target)
    assert torch.equal(fresh.far, mpc._route.far) and torch.equal(fresh.near, mpc._route.near)
    searches.clear()
    mpc.act_latent(lambda: start, 3)
    assert searches == [3] and len(mpc.plan_times) == 2  # later boundaries: one search, the plan's
