"""Waypoints from data: a graph over latents of training frames guides the MPC towards far goals.

A plan of H chunks sees only H chunks ahead, and the latent distance to a far goal can be a poor guide:
the wrist joint stops at +-160 degrees, so a goal on the other side of the limit looks near (the images
of the two folded arms are alike) while the only way there is the long way round. Greedy planning then
presses the arm against the limit.

The graph (``worldmodel.graph.LatentGraph``: nodes are latents of training frames, edges are moves the
arm really made) knows the way round. Shortest paths to the goal's nearest node follow real motion. At
every replan, while the goal is more than ``reach`` chunks away along the graph, the policy plans towards
the node ``lookahead`` chunks ahead on the path (a waypoint) instead of the goal; close to the goal it
plans to the goal itself, so near goals are planned exactly as without it.

Routing is batched tensor code (Bellman-Ford relaxation with ``scatter_reduce``), on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.config import nested, option
from worldmodel.graph import MIN_LINK_COST, GraphConfig, LatentGraph


@dataclass
class SubgoalConfig:
    """Waypoints from a graph of training frames, for goals beyond the plan's reach."""

    enabled: bool = option(True, "chase waypoints along a graph of training frames while the goal is far")
    reach: float = option(1.0, "plan to the goal itself once it is at most this many chunks away along the graph")
    lookahead: float = option(3.0, "chunks along the path to the waypoint planned towards while the goal is far")
    graph: GraphConfig = nested(GraphConfig, "the graph of training frames", flat=True)

    def __post_init__(self):
        if self.reach <= 0 or self.lookahead <= 0:
            raise ValueError(f"subgoals.reach and subgoals.lookahead must be positive, got {self.reach}, "
                             f"{self.lookahead}")


@dataclass
class Route:
    """Shortest paths from every node to each of B goals, and which problems have come near their goal."""

    goal: Tensor  # (B, D) the true goal latents
    dist: Tensor  # (B, N) chunks from node n to goal b along the graph (inf: no path)
    next: Tensor  # (B, N) the neighbour of node n on a shortest path to goal b (n itself at the goal)
    next_cost: Tensor  # (B, N) the cost of that edge in chunks
    near: Tensor  # (B,) bool: came within reach of its goal once; from then on plans to the goal itself


def route(graph: LatentGraph, z_goal: Tensor, max_iterations: int = 100000) -> Route:
    """Shortest paths from every node to each goal's nearest node: Bellman-Ford relaxation of all
    edges for all goals at once, then each node's next hop."""
    goal_node = graph.nearest(z_goal)  # (B,)
    B, N = len(z_goal), len(graph.nodes)
    src = graph.src.expand(B, -1)  # (B, E)
    dist = torch.full((B, N), float("inf"), device=graph.nodes.device)
    dist[torch.arange(B), goal_node] = 0.0
    for _ in range(max_iterations):
        through = dist[:, graph.dst] + graph.cost  # (B, E): from src, via this edge, then on to the goal
        new = dist.scatter_reduce(1, src, through, reduce="amin")
        if torch.equal(new, dist):
            break
        dist = new
    through = dist[:, graph.dst] + graph.cost  # (B, E)
    best = dist.scatter_reduce(1, src, through, reduce="amin", include_self=False)  # (B, N)
    on_path = through <= best.gather(1, src)  # (B, E) edges that realise their source's best
    edge = torch.full((B, N), -1, dtype=torch.long, device=dist.device)
    index = torch.arange(len(graph.src), device=dist.device).expand(B, -1)
    edge = edge.scatter_reduce(1, src, torch.where(on_path, index, -1), reduce="amax")  # (B, N), -1: none
    nodes = torch.arange(N, device=dist.device).expand(B, -1)
    has = (edge >= 0) & (dist > 0)
    nxt = torch.where(has, graph.dst[edge.clamp_min(0)], nodes)
    cost = torch.where(has, graph.cost[edge.clamp_min(0)], torch.zeros_like(dist))
    return Route(z_goal, dist, nxt, cost, torch.zeros(B, dtype=torch.bool, device=dist.device))


def targets(graph: LatentGraph, route: Route, z: Tensor, cfg: SubgoalConfig) -> Tensor:
    """What each of B problems plans towards from its current latent z (B, D): the goal once it has
    come within ``reach`` chunks along the graph (or if it is not connected to it), else the node
    ``lookahead`` chunks ahead on the shortest path (a waypoint). Coming near latches: an arm holding
    its goal is never sent back to a waypoint because its nearest node lies a little off the path."""
    node = graph.nearest(z)  # (B,)
    far = route.dist.gather(1, node[:, None])[:, 0]  # (B,)
    walked = torch.zeros_like(far)
    for _ in range(int(np.ceil(cfg.lookahead / MIN_LINK_COST)) + 1):  # links may cost as little as MIN_LINK_COST
        hop = route.next.gather(1, node[:, None])[:, 0]
        cost = route.next_cost.gather(1, node[:, None])[:, 0]
        move = (walked < cfg.lookahead) & (hop != node)
        if not move.any():
            break
        node = torch.where(move, hop, node)
        walked = walked + torch.where(move, cost, torch.zeros_like(cost))
    route.near |= (far <= cfg.reach) | ~torch.isfinite(far)
    return torch.where(route.near[:, None], route.goal, graph.nodes[node])
