"""Waypoints from data: a graph over latents of dataset frames guides the MPC towards far goals.

A plan of H chunks sees only H chunks ahead, and the latent distance to a far goal can be a poor guide:
the wrist joint stops at +-160 degrees, so a goal on the other side of the limit looks near (the images
of the two folded arms are alike) while the only way there is the long way round. Greedy planning then
presses the arm against the limit.

The graph knows the way round because its edges are moves the arm really made. Its nodes are the
latents of training frames, one per action chunk. Each node is linked to the frame one chunk later in
its own episode (cost 1), and to latents of other episodes that are nearer than ``radius`` times a
typical one-chunk move (cost: their distance in chunks). Shortest paths to the goal's nearest node then
follow real motion. At every replan, while the goal is more than ``reach`` chunks away along the graph,
the policy plans towards the node ``lookahead`` chunks ahead on the path (a waypoint) instead of the
goal; close to the goal it plans to the goal itself, so near goals are planned exactly as without it.

Everything is batched tensor code (kNN by blocks, Bellman-Ford relaxation with ``scatter_reduce``), on
the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from worldmodel.config import option

MIN_LINK_COST = 0.05  # chunks: every link costs something, so next hops strictly shorten the way left


@dataclass
class SubgoalConfig:
    """Waypoints from a graph of training frames, for goals beyond the plan's reach."""

    enabled: bool = option(True, "chase waypoints along a graph of training frames while the goal is far")
    neighbours: int = option(8, "latent neighbours linked across episodes, per node")
    radius: float = option(0.5, "link two frames of different episodes when their latents are closer than this "
                                "times a typical one-chunk move")
    reach: float = option(1.0, "plan to the goal itself once it is at most this many chunks away along the graph")
    lookahead: float = option(3.0, "chunks along the path to the waypoint planned towards while the goal is far")
    max_nodes: int = option(20000, "at most this many training frames in the graph (spread over episodes)")

    def __post_init__(self):
        if self.neighbours < 1 or self.radius <= 0 or self.reach <= 0 or self.lookahead <= 0 or self.max_nodes < 2:
            raise ValueError(f"subgoal settings must be positive, got {self}")


@dataclass
class Route:
    """Shortest paths from every node to each of B goals, and which problems have come near their goal."""

    goal: Tensor  # (B, D) the true goal latents
    dist: Tensor  # (B, N) chunks from node n to goal b along the graph (inf: no path)
    next: Tensor  # (B, N) the neighbour of node n on a shortest path to goal b (n itself at the goal)
    next_cost: Tensor  # (B, N) the cost of that edge in chunks
    near: Tensor  # (B,) bool: came within reach of its goal once; from then on plans to the goal itself


class SubgoalGraph:
    """Nodes (N, D), directed edges src -> dst with costs in chunks (both directions of every link)."""

    def __init__(self, nodes: Tensor, src: Tensor, dst: Tensor, cost: Tensor, step: float):
        self.nodes, self.src, self.dst, self.cost, self.step = nodes, src, dst, cost, step

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model, store, episode_ids, cfg: SubgoalConfig) -> "SubgoalGraph":
        """The graph of ``model``'s latents of the frames of ``episode_ids`` (training episodes: never the
        held-out ones an evaluation draws goals from), one frame per chunk."""
        fs = model.frameskip
        per_episode = [np.arange(0, store.episodes[i].steps + 1, fs) for i in episode_ids]
        keep = max(1, -(-sum(map(len, per_episode)) // cfg.max_nodes))  # thin episodes if there are too many
        was_training = model.training
        model.eval()  # the projector's BatchNorm must use (and keep) its running statistics
        try:
            latents = [model.encode(torch.from_numpy(store.frames(i, t)).to(model.device)).float()  # (T_i, D)
                       for k, (i, t) in enumerate(zip(episode_ids, per_episode)) if k % keep == 0]
        finally:
            model.train(was_training)
        return cls.from_trajectories(latents, cfg)

    @classmethod
    def from_trajectories(cls, latents: list[Tensor], cfg: SubgoalConfig) -> "SubgoalGraph":
        """The graph of trajectories of latents, each (T_i, D) one chunk apart."""
        nodes = torch.cat(latents)  # (N, D)
        starts = np.cumsum([0] + [len(z) for z in latents])
        src = torch.cat([torch.arange(a, b - 1) for a, b in zip(starts[:-1], starts[1:])]).to(nodes.device)
        step = float((nodes[src + 1] - nodes[src]).norm(dim=-1).median())  # a typical one-chunk move
        episode = torch.repeat_interleave(torch.arange(len(latents)), torch.tensor([len(z) for z in latents]))
        near_src, near_dst, near_d = _neighbours(nodes, episode.to(nodes.device), cfg.neighbours, cfg.radius * step)
        links_src = torch.cat([src, near_src])
        links_dst = torch.cat([src + 1, near_dst])
        links_cost = torch.cat([torch.ones(len(src), device=nodes.device), (near_d / step).clamp_min(MIN_LINK_COST)])
        both = (torch.cat([links_src, links_dst]), torch.cat([links_dst, links_src]), torch.cat([links_cost] * 2))
        return cls(nodes, *both, step)

    # --- querying -------------------------------------------------------------------------------------
    def nearest(self, z: Tensor) -> Tensor:
        """Index (B,) of the node nearest each latent z (B, D)."""
        return torch.cdist(z.float(), self.nodes).argmin(1)

    def route(self, z_goal: Tensor, max_iterations: int = 100000) -> Route:
        """Shortest paths from every node to each goal's nearest node: Bellman-Ford relaxation of all
        edges for all goals at once, then each node's next hop."""
        goal_node = self.nearest(z_goal)  # (B,)
        B, N = len(z_goal), len(self.nodes)
        src = self.src.expand(B, -1)  # (B, E)
        dist = torch.full((B, N), float("inf"), device=self.nodes.device)
        dist[torch.arange(B), goal_node] = 0.0
        for _ in range(max_iterations):
            through = dist[:, self.dst] + self.cost  # (B, E): from src, via this edge, then on to the goal
            new = dist.scatter_reduce(1, src, through, reduce="amin")
            if torch.equal(new, dist):
                break
            dist = new
        through = dist[:, self.dst] + self.cost  # (B, E)
        best = dist.scatter_reduce(1, src, through, reduce="amin", include_self=False)  # (B, N)
        on_path = through <= best.gather(1, src)  # (B, E) edges that realise their source's best
        edge = torch.full((B, N), -1, dtype=torch.long, device=dist.device)
        index = torch.arange(len(self.src), device=dist.device).expand(B, -1)
        edge = edge.scatter_reduce(1, src, torch.where(on_path, index, -1), reduce="amax")  # (B, N), -1: none
        nodes = torch.arange(N, device=dist.device).expand(B, -1)
        has = (edge >= 0) & (dist > 0)
        nxt = torch.where(has, self.dst[edge.clamp_min(0)], nodes)
        cost = torch.where(has, self.cost[edge.clamp_min(0)], torch.zeros_like(dist))
        return Route(z_goal, dist, nxt, cost, torch.zeros(B, dtype=torch.bool, device=dist.device))

    def targets(self, route: Route, z: Tensor, cfg: SubgoalConfig) -> Tensor:
        """What each of B problems plans towards from its current latent z (B, D): the goal once it has
        come within ``reach`` chunks along the graph (or if it is not connected to it), else the node
        ``lookahead`` chunks ahead on the shortest path (a waypoint). Coming near latches: an arm holding
        its goal is never sent back to a waypoint because its nearest node lies a little off the path."""
        node = self.nearest(z)  # (B,)
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
        return torch.where(route.near[:, None], route.goal, self.nodes[node])


def _neighbours(nodes: Tensor, episode: Tensor, k: int, radius: float, block: int = 2048):
    """Links (src, dst, distance) from each node to its k nearest nodes of OTHER episodes within ``radius``."""
    srcs, dsts, ds = [], [], []
    for start in range(0, len(nodes), block):
        d = torch.cdist(nodes[start:start + block], nodes)  # (b, N)
        own = episode[start:start + block, None] == episode[None, :]
        d = torch.where(own, torch.full_like(d, float("inf")), d)
        dist, idx = d.topk(min(k, len(nodes)), dim=1, largest=False)  # (b, k)
        ok = dist < radius
        rows = torch.arange(start, start + len(d), device=nodes.device)[:, None].expand_as(idx)
        srcs.append(rows[ok])
        dsts.append(idx[ok])
        ds.append(dist[ok])
    return torch.cat(srcs), torch.cat(dsts), torch.cat(ds)


def graph_for_checkpoint(model, checkpoint, cfg: SubgoalConfig, data: str = "") -> SubgoalGraph:
    """The subgoal graph of a trained model over its own training episodes, read from the dataset its
    checkpoint records (or ``data``, whose episodes the model trained on are used)."""
    from worldmodel.datasplit import held_out, open_data
    from worldmodel.model import read_model_meta

    meta = read_model_meta(checkpoint)
    store, _ = open_data(model, meta, checkpoint, data, "subgoals need its training frames")
    return SubgoalGraph.build(model, store, complement(store, held_out(store, meta)[0]), cfg)


def complement(store, held_out_ids) -> list[int]:
    """The episodes of ``store`` not held out: the graph's frames (never an evaluation's goals)."""
    test = set(held_out_ids)
    train = [i for i in range(len(store)) if i not in test]
    if not train:
        raise ValueError(f"{store.paths}: holds none of the model's training episodes, which subgoals need; plan "
                         f"without them (--no-subgoals.enabled) or give the training data")
    return train
