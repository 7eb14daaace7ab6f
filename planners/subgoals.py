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

Routing solves shortest paths on the sparse graph (scipy's Dijkstra) from each goal node, only as far
from the goal as the arm is (plus a margin): a near goal's solve stops early. The solve happens at the
first chunk boundary of an episode, when the start is known, and grows when an arm strays towards the edge
of what was solved. Each replan then finds the waypoint on the model's device, without a host
synchronisation: a nearest-node search, and a walk along the path by jumps of 1, 2, 4, ... hops.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from torch import Tensor

from common.config import check_types, nested, option
from worldmodel.graph import MIN_LINK_COST, GraphConfig, LatentGraph


@dataclass
class SubgoalConfig:
    """Waypoints from a graph of training frames, for goals beyond the plan's reach."""

    enabled: bool = option(True, "chase waypoints along a graph of training frames while the goal is far")
    reach: float = option(1.0, "plan to the goal itself once it is at most this many chunks away along the graph")
    lookahead: float = option(3.0, "chunks along the path to the waypoint planned towards while the goal is far")
    graph: GraphConfig = nested(GraphConfig, "the graph of training frames", flat=True)

    def __post_init__(self):
        check_types(self, "subgoals.")
        if self.reach <= 0 or self.lookahead <= 0:
            raise ValueError(f"subgoals.reach and subgoals.lookahead must be positive, got {self.reach}, "
                             f"{self.lookahead}")
        # what only the waypoints read would be ignored with them off (the graph's settings are the model file's)
        unread = [f"--subgoals.{name}" for name in ("reach", "lookahead")
                  if getattr(self, name) != getattr(SubgoalConfig, name)]
        if unread and not self.enabled:
            it, sets = ("it", "sets") if len(unread) == 1 else ("them", "set")
            raise ValueError(f"{', '.join(unread)}: not read with --no-subgoals.enabled, which turns off what "
                             f"{'it' if len(unread) == 1 else 'they'} {sets}; leave {it} out")


SOLVE_MARGIN = 1.5  # chunks solved beyond where an arm is: its nearest node seldom moves further between plans
TREE_CACHE = 256  # shortest-path trees kept per graph (the most recently used goal nodes)


@dataclass
class Route:
    """Where each of B problems goes along the graph. The shortest paths are solved lazily: ``solve`` from
    where the arms start (once per episode, at the first plan), ``cover`` after each plan where an arm has
    come near the edge of what was solved."""

    goal: Tensor  # (B, D) the true goal latents
    goal_node: np.ndarray  # (B,) host: the node nearest each goal
    near: Tensor  # (B,) bool: came within reach of its goal once; from then on plans to the goal itself
    solved: np.ndarray  # (B,) host: chunks from the goal up to which each problem's paths are solved (inf: all)
    depth: int  # K: jumps of 1, 2, ..., 2^(K-1) hops walk far enough to cover ``lookahead`` (links cost >= MIN)
    dist: Tensor | None = None  # (B, N) chunks from node n to goal b along the graph (inf: beyond solved, no path)
    jump: Tensor | None = None  # (K, B, N) long: the node 2^k hops from n on its shortest path to goal b
    linked: Tensor | None = None  # (B, N) bool: node n has a path to goal b (solved or not)
    far: Tensor | None = None  # (B,) chunks to the goal from the node of the last plan
    to_goal: Tensor | None = None  # (B,) bool: the last plan headed for the goal itself (else a waypoint)
    strays: int = 0  # plans in which some arm was beyond what was solved (it headed for its goal that once)

    @property
    def is_solved(self) -> bool:
        return self.dist is not None


class Router:
    """Shortest paths to goal nodes on a graph, one Dijkstra solve per goal node (the graph is symmetric,
    so the tree of shortest paths FROM the goal gives every node's next hop TOWARDS it), each solved as far
    as asked and cached."""

    def __init__(self, graph: LatentGraph):
        self.graph = graph
        n = len(graph.nodes)
        src, dst, cost = (t.cpu().numpy() for t in (graph.src, graph.dst, graph.cost))
        order = np.lexsort((cost, dst, src))  # the cheapest of parallel links first
        src, dst, cost = src[order], dst[order], cost[order].astype(np.float64)
        first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]
        self.matrix = csr_matrix((cost[first], (src[first], dst[first])), shape=(n, n))
        self.component = connected_components(self.matrix, directed=False)[1]  # (N,) which island each node is on
        self._trees: OrderedDict[int, tuple] = OrderedDict()  # goal node -> (limit, dist (N,), next (N,))

    def tree(self, goal: int, limit: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """(dist (N,) chunks to ``goal``, exact up to ``limit`` and inf beyond; next (N,) hop towards it, a
        node beyond the limit or with no path being its own next). Dijkstra settles nodes in order of
        distance, so a solve stopped at ``limit`` agrees with the whole solve on every node it reached."""
        kept = self._trees.get(goal)
        if kept is None or kept[0] < limit:
            dist, pred = dijkstra(self.matrix, directed=True, indices=goal, return_predecessors=True, limit=limit)
            kept = (limit, dist, np.where(pred < 0, np.arange(len(dist)), pred))
            self._trees[goal] = kept
            while len(self._trees) > TREE_CACHE:
                self._trees.popitem(last=False)
        self._trees.move_to_end(goal)
        return kept[1], kept[2]

    def forget(self) -> None:
        """Drop the cached solves (the sparse matrix stays: it is the graph's)."""
        self._trees.clear()

    def route(self, z_goal: Tensor, lookahead: float) -> Route:
        """The routes of B goal latents (B, D), nothing solved yet."""
        goal_node = self.graph.nearest(z_goal).cpu().numpy()  # (B,)
        near = torch.zeros(len(goal_node), dtype=torch.bool, device=z_goal.device)
        hops = int(np.ceil(lookahead / MIN_LINK_COST)) + 1  # the longest walk to a waypoint
        return Route(z_goal, goal_node, near, np.zeros(len(goal_node)), int(np.ceil(np.log2(hops + 1))),
                     to_goal=near.clone())

    def solve(self, route: Route, rows: np.ndarray, limits: np.ndarray) -> None:
        """Solve the paths of problems ``rows`` as far as ``limits`` chunks from their goals (host work), and
        put them on the device: distances, and jumps of 2^k hops."""
        device, n, B = self.graph.nodes.device, len(self.graph.nodes), len(route.goal_node)
        rows = np.asarray(rows)
        if route.dist is None and not np.array_equal(rows, np.arange(B)):
            raise ValueError("a route's first solve covers every problem")
        if not len(rows):
            return
        trees = [self.tree(int(route.goal_node[b]), float(limit)) for b, limit in zip(rows, limits)]
        dist = torch.as_tensor(np.stack([d for d, _ in trees]), dtype=torch.float32, device=device)  # (R, N)
        jump = torch.empty((route.depth, len(rows), n), dtype=torch.long, device=device)  # (K, R, N)
        jump[0] = torch.as_tensor(np.stack([nxt for _, nxt in trees]), device=device)  # one hop
        for k in range(1, route.depth):
            torch.gather(jump[k - 1], 1, jump[k - 1], out=jump[k])  # 2^k hops: 2^(k-1), twice
        if route.dist is None:  # the first solve
            component = torch.as_tensor(self.component, device=device)
            route.linked = component[None] == component[torch.as_tensor(route.goal_node, device=device)][:, None]
            route.dist, route.jump = dist, jump
        else:
            at = torch.as_tensor(rows, device=device)
            route.dist.index_copy_(0, at, dist)
            route.jump.index_copy_(1, at, jump)
        route.solved[rows] = limits


_ROUTERS: "weakref.WeakKeyDictionary[LatentGraph, Router]" = weakref.WeakKeyDictionary()


def _router(graph: LatentGraph) -> Router:
    if graph not in _ROUTERS:
        _ROUTERS[graph] = Router(graph)
    return _ROUTERS[graph]


def route(graph: LatentGraph, z_goal: Tensor, cfg: SubgoalConfig) -> Route:
    """Routes of B goals (B, D) along ``graph``, solved by ``solve`` once the starts are known."""
    return _router(graph).route(z_goal, cfg.lookahead)


def solve(graph: LatentGraph, route: Route, z: Tensor) -> Tensor:
    """Solve the paths from where each arm is (latents z (B, D)) to its goal, with a margin beyond (host work
    when an episode starts: it reads the starts' nearest nodes). Not knowing how far a start is, each solve
    first stops at ``4 * SOLVE_MARGIN`` chunks from the goal; a start beyond that (a far goal) is solved
    again to its distance plus twice the margin, or whole if the first solve did not reach it. Returns the
    nearest nodes (B,) on the device: ``targets`` from the same latents takes them instead of searching again."""
    router = _router(graph)
    nearest = graph.nearest(z)  # (B,)
    start = nearest.cpu().numpy()
    probe = 4 * SOLVE_MARGIN
    limits = np.full(len(start), probe)
    for b, (goal, node) in enumerate(zip(route.goal_node.tolist(), start.tolist())):
        dist = router.tree(goal, probe)[0][node]  # inf: beyond the probe, or no path at all
        if not dist + SOLVE_MARGIN <= probe and router.component[node] == router.component[goal]:
            limits[b] = dist + 2 * SOLVE_MARGIN if np.isfinite(dist) else np.inf
    router.solve(route, np.arange(len(start)), limits)  # the device tables, once
    return nearest


def cover(graph: LatentGraph, route: Route) -> None:
    """After a plan (the device idle): solve further the paths of every problem whose arm was within the
    margin of the edge of what is solved at that plan, or beyond it, so the next plans find their nodes
    solved. Host work, seldom any: the arm mostly comes closer to its goal."""
    if route.far is None:
        return
    far, done = route.far.cpu().numpy(), route.near.cpu().numpy()
    short = ~done & np.isfinite(route.solved) & ~(far + SOLVE_MARGIN <= route.solved)  # inf far: beyond it
    if short.any():
        route.strays += int((~np.isfinite(far) & short).any())
        rows = np.flatnonzero(short)
        grown = far[rows] + 2 * SOLVE_MARGIN
        _router(graph).solve(route, rows, np.where(np.isfinite(grown), grown, np.inf))


def forget_routes() -> None:
    """Drop every cached shortest-path solve: the next routes are solved afresh (a benchmark times them cold).
    Each graph's sparse matrix stays, as it does over an evaluation's episodes."""
    for router in _ROUTERS.values():
        router.forget()


def waypoints(route: Route, node: Tensor, lookahead: float) -> Tensor:
    """The node (B,) reached from ``node`` (B,) by walking towards each goal until ``lookahead`` chunks are
    covered, or the goal is reached: the last node still short of it by jumps of 2^(K-1), ..., 2, 1 hops
    (distances fall along a path), then one hop more. The walk's length is a difference of distances,
    counted covered within 1e-4 chunks (rounding)."""
    dist = route.dist.gather(1, node[:, None])  # (B, 1)
    at = node[:, None]  # (B, 1)
    for k in reversed(range(route.depth)):
        ahead = route.jump[k].gather(1, at)
        short = dist - route.dist.gather(1, ahead) < lookahead - 1e-4
        at = torch.where(short, ahead, at)
    return route.jump[0].gather(1, at)[:, 0]


def targets(graph: LatentGraph, route: Route, z: Tensor, cfg: SubgoalConfig, node: Tensor | None = None) -> Tensor:
    """What each of B problems plans towards from its current latent z (B, D): the goal once it has
    come within ``reach`` chunks along the graph (or if it is not connected to it), else the waypoint
    ``lookahead`` chunks ahead on the shortest path. Coming near latches: an arm holding its goal is never
    sent back to a waypoint because its nearest node lies a little off the path. An arm beyond what is
    solved (``cover`` makes that rare) heads for its goal this once, without latching. No host
    synchronisation: a nearest-node search (none when ``node``, z's nearest nodes (B,), is given: ``solve``
    found them from the same latents), gathers and the jumps."""
    if not route.is_solved:
        raise RuntimeError("solve the route from where the arms are (subgoals.solve) before asking for targets")
    node = graph.nearest(z) if node is None else node  # (B,)
    far = route.dist.gather(1, node[:, None])[:, 0]  # (B,)
    known = torch.isfinite(far)
    stray = ~known & route.linked.gather(1, node[:, None])[:, 0]  # beyond what is solved
    route.near |= (far <= cfg.reach) | (~known & ~stray)
    route.far, route.to_goal = far, route.near | stray
    return torch.where(route.to_goal[:, None], route.goal, graph.nodes[waypoints(route, node, cfg.lookahead)])
