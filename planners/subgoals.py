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

Routing solves shortest paths on the sparse graph (scipy's Dijkstra, once per goal node, cached) when an
episode starts; each replan then finds the waypoint with a nearest-node search and two gathers on the
model's device, without a host synchronisation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
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
    """Where each of B problems goes along the graph: its distance to the goal from every node, the
    waypoint ``lookahead`` chunks ahead of every node, and whether it has come near its goal."""

    goal: Tensor  # (B, D) the true goal latents
    dist: Tensor  # (B, N) chunks from node n to goal b along the graph (inf: no path)
    ahead: Tensor  # (B, N) long: the node ``lookahead`` chunks from n on its shortest path to goal b
    near: Tensor  # (B,) bool: came within reach of its goal once; from then on plans to the goal itself


class Router:
    """Shortest paths to goal nodes on a graph, one Dijkstra solve per goal node (the graph is symmetric,
    so the tree of shortest paths FROM the goal gives every node's next hop TOWARDS it), cached."""

    def __init__(self, graph: LatentGraph):
        self.graph = graph
        n = len(graph.nodes)
        src, dst, cost = (t.cpu().numpy() for t in (graph.src, graph.dst, graph.cost))
        order = np.lexsort((cost, dst, src))  # the cheapest of parallel links first
        src, dst, cost = src[order], dst[order], cost[order].astype(np.float64)
        first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]
        self.matrix = csr_matrix((cost[first], (src[first], dst[first])), shape=(n, n))
        self._trees: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # goal node -> (dist (N,), next (N,))
        self._ahead: dict[tuple[int, float], np.ndarray] = {}  # (goal node, lookahead) -> waypoint (N,)

    def tree(self, goal: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist (N,) chunks to ``goal``, next (N,) hop towards it; a node with no path is its own next)."""
        if goal not in self._trees:
            dist, pred = dijkstra(self.matrix, directed=True, indices=goal, return_predecessors=True)
            nodes = np.arange(len(dist))
            self._trees[goal] = (dist, np.where(pred < 0, nodes, pred))
        return self._trees[goal]

    def ahead(self, goal: int, lookahead: float) -> np.ndarray:
        """For every node, the node reached by walking towards ``goal`` until ``lookahead`` chunks are
        covered (or the goal is reached): the waypoint planned towards from there."""
        key = (goal, lookahead)
        if key not in self._ahead:
            dist, nxt = self.tree(goal)
            node, walked = np.arange(len(dist)), np.zeros(len(dist))
            for _ in range(int(np.ceil(lookahead / MIN_LINK_COST)) + 1):  # links cost at least MIN_LINK_COST
                hop = nxt[node]
                move = (walked < lookahead) & (hop != node)
                if not move.any():
                    break
                with np.errstate(invalid="ignore"):  # inf - inf where there is no path (and no move)
                    walked = walked + np.where(move, dist[node] - dist[hop], 0.0)  # the link's cost, on the path
                node = np.where(move, hop, node)
            self._ahead[key] = node
        return self._ahead[key]

    def forget(self) -> None:
        """Drop the cached solves (the sparse matrix stays: it is the graph's)."""
        self._trees.clear()
        self._ahead.clear()

    def route(self, z_goal: Tensor, cfg: SubgoalConfig) -> Route:
        """The routes of B goal latents (B, D) to their nearest nodes (host work, once per episode)."""
        goals = self.graph.nearest(z_goal).tolist()  # (B,)
        device = self.graph.nodes.device
        dist = torch.as_tensor(np.stack([self.tree(g)[0] for g in goals]), dtype=torch.float32, device=device)
        ahead = torch.as_tensor(np.stack([self.ahead(g, cfg.lookahead) for g in goals]), device=device)
        return Route(z_goal, dist, ahead, torch.zeros(len(goals), dtype=torch.bool, device=device))


_ROUTERS: "weakref.WeakKeyDictionary[LatentGraph, Router]" = weakref.WeakKeyDictionary()


def route(graph: LatentGraph, z_goal: Tensor, cfg: SubgoalConfig) -> Route:
    """Routes of B goals (B, D) along ``graph``; solves are cached per graph and goal node."""
    if graph not in _ROUTERS:
        _ROUTERS[graph] = Router(graph)
    return _ROUTERS[graph].route(z_goal, cfg)


def forget_routes() -> None:
    """Drop every cached shortest-path solve: the next routes are solved afresh (a benchmark times them cold).
    Each graph's sparse matrix stays, as it does over an evaluation's episodes."""
    for router in _ROUTERS.values():
        router.forget()


def targets(graph: LatentGraph, route: Route, z: Tensor, cfg: SubgoalConfig) -> Tensor:
    """What each of B problems plans towards from its current latent z (B, D): the goal once it has
    come within ``reach`` chunks along the graph (or if it is not connected to it), else the waypoint
    ``lookahead`` chunks ahead on the shortest path. Coming near latches: an arm holding its goal is never
    sent back to a waypoint because its nearest node lies a little off the path. No host synchronisation:
    a nearest-node search and two gathers."""
    node = graph.nearest(z)[:, None]  # (B, 1)
    far = route.dist.gather(1, node)[:, 0]  # (B,)
    waypoint = route.ahead.gather(1, node)[:, 0]  # (B,)
    route.near |= (far <= cfg.reach) | ~torch.isfinite(far)
    return torch.where(route.near[:, None], route.goal, graph.nodes[waypoint])
