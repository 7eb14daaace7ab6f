"""A graph over the latents of a model's training frames: the map the planner's subgoals follow.

Its nodes are the latents of training frames, one per action chunk. Each node is linked to the frame
one chunk later in its own episode (cost 1), and to latents of other episodes that are nearer than
``radius`` times a typical one-chunk move (cost: their distance in chunks). Paths along it follow
motion the arm really made (``planners.subgoals`` routes on it). It is a property of a trained model
and its training data, so it lives with the model.

A weaker encoder can see two arms folded against the wrist's limit from either side as alike: a link
between them is a shortcut the arm cannot take, and a route through it presses the arm against the limit.
Such a link has no detour: nothing else joins its ends within a few chunks, where a true link's ends are
joined by shorter links too. ``detour`` drops the longer links that have none.

The kNN is batched tensor code (by blocks), on the model's device; the detours are scipy's Dijkstra.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.config import check_types, option
from envs.storage import DatasetError
from worldmodel.latents import encode_episodes, every

MIN_LINK_COST = 0.05  # chunks: every link costs something, so next hops strictly shorten the way left
TRUSTED_LINK = 0.6  # of radius: links of other episodes shorter than this are kept without a detour
GRAPH_VERSION = 1  # of the graph a model file keeps
BEFORE_SETTINGS = {"detour": 0.0}  # what a graph saved before a setting existed was built with
log = logging.getLogger(__name__)


@dataclass
class GraphConfig:
    """How the graph of training frames is built."""

    neighbours: int = option(8, "latent neighbours linked across episodes, per node")
    radius: float = option(0.5, "link two frames of different episodes when their latents are closer than this "
                                "times a typical one-chunk move")
    max_nodes: int = option(20000, "at most this many training frames in the graph (spread over episodes)")
    detour: float = option(8.0, f"keep a link to another episode longer than {TRUSTED_LINK} x radius only when "
                                "shorter links join its ends within this many chunks (a link with no detour jumps "
                                "where the arm cannot go); 0: keep every link")

    def __post_init__(self):
        check_types(self)
        bad = [f"{name} {value} (must be {bound})" for name, value, ok, bound in (
            ("neighbours", self.neighbours, self.neighbours >= 1, ">= 1"),
            ("radius", self.radius, self.radius > 0, "> 0"), ("max_nodes", self.max_nodes, self.max_nodes >= 2, ">= 2"),
            ("detour", self.detour, self.detour >= 0, ">= 0"))
            if not ok]
        if bad:  # --graph.<name> to wm train and wm export, --subgoals.<name> to wm eval and wm demo
            raise ValueError(f"invalid subgoal graph settings: {', '.join(bad)} (--graph.* or --subgoals.*)")


class LatentGraph:
    """Nodes (N, D), directed edges src -> dst with costs in chunks (both directions of every link), and
    ``step``, the typical latent distance of one chunk of motion."""

    def __init__(self, nodes: Tensor, src: Tensor, dst: Tensor, cost: Tensor, step: float):
        self.nodes, self.src, self.dst, self.cost, self.step = nodes, src, dst, cost, step
        self._half_sq = 0.5 * nodes.float().square().sum(1)  # (N,) for nearest-node searches

    @classmethod
    @torch.no_grad()
    def build(cls, model, store, episode_ids, cfg: GraphConfig) -> "LatentGraph":
        """The graph of ``model``'s latents of the frames of ``episode_ids`` (training episodes: never the
        held-out ones an evaluation draws goals from), one frame per chunk."""
        if not len(episode_ids):
            raise ValueError("no training episodes to build the subgoal graph from")
        steps = sum(store.episodes[i].steps // model.frameskip + 1 for i in episode_ids)
        keep = max(1, -(-steps // cfg.max_nodes))  # thin episodes if there are too many frames
        encoded = encode_episodes(model, store, list(episode_ids)[::keep], every(model.frameskip))
        return cls.from_trajectories(list(encoded["z"].split(encoded["counts"])), cfg)

    @classmethod
    def from_trajectories(cls, latents: list[Tensor], cfg: GraphConfig) -> "LatentGraph":
        """The graph of trajectories of latents, each (T_i, D) one chunk apart."""
        nodes = torch.cat(latents)  # (N, D)
        starts = np.cumsum([0] + [len(z) for z in latents])
        src = torch.cat([torch.arange(a, b - 1) for a, b in zip(starts[:-1], starts[1:])]).to(nodes.device)
        step = float((nodes[src + 1] - nodes[src]).norm(dim=-1).median())  # a typical one-chunk move
        episode = torch.repeat_interleave(torch.arange(len(latents)), torch.tensor([len(z) for z in latents]))
        near_src, near_dst, near_d = _neighbours(nodes, episode.to(nodes.device), cfg.neighbours, cfg.radius * step)
        near_cost = (near_d / step).clamp_min(MIN_LINK_COST)
        if cfg.detour > 0:
            keep = _with_detour(len(nodes), src, near_src, near_dst, near_cost, TRUSTED_LINK * cfg.radius, cfg.detour)
            near_src, near_dst, near_cost = near_src[keep], near_dst[keep], near_cost[keep]
        links_src = torch.cat([src, near_src])
        links_dst = torch.cat([src + 1, near_dst])
        links_cost = torch.cat([torch.ones(len(src), device=nodes.device), near_cost])
        both = (torch.cat([links_src, links_dst]), torch.cat([links_dst, links_src]), torch.cat([links_cost] * 2))
        return cls(nodes, *both, step)

    def nearest(self, z: Tensor) -> Tensor:
        """Index (B,) of the node nearest each latent z (B, D): the least |n|^2 / 2 - z.n, one matrix product
        (half the time of the distances themselves)."""
        return torch.addmm(self._half_sq, z.float(), self.nodes.T, alpha=-1).argmin(1)  # (B, N) -> (B,)

    def summary(self) -> dict:
        """Nodes, links per node (each direction counted) and connected components: whether a goal anywhere
        can be routed to from anywhere (one component) or some lie on islands of their own."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.nodes)
        links = coo_matrix((np.ones(len(self.src)), (self.src.cpu().numpy(), self.dst.cpu().numpy())), shape=(n, n))
        count, labels = connected_components(links, directed=False)
        return {"nodes": n, "links_per_node": len(self.src) / n, "components": int(count),
                "largest_component": float(np.bincount(labels).max() / n)}

    def to(self, device) -> "LatentGraph":
        return LatentGraph(self.nodes.to(device), self.src.to(device), self.dst.to(device), self.cost.to(device),
                           self.step)

    def state(self, cfg: GraphConfig) -> dict:
        """What a model file keeps (tensors and plain values only: it is loaded with ``weights_only``)."""
        return {"version": GRAPH_VERSION, "config": dataclasses.asdict(cfg), "nodes": self.nodes.float().cpu(),
                "src": self.src.int().cpu(), "dst": self.dst.int().cpu(), "cost": self.cost.float().cpu(),
                "step": float(self.step)}

    @classmethod
    def from_state(cls, state: dict, latent_dim: int, where: str = "") -> "LatentGraph":
        """The graph a model file keeps; a ValueError naming ``where`` when it does not fit the model."""
        try:
            nodes, src, dst, cost = (state[k] for k in ("nodes", "src", "dst", "cost"))
            n = len(nodes)
            ok = (state.get("version") == GRAPH_VERSION and nodes.ndim == 2 and nodes.shape[1] == latent_dim
                  and src.shape == dst.shape == cost.shape and len(src) > 0 and int(src.min()) >= 0
                  and int(dst.min()) >= 0 and int(max(src.max(), dst.max())) < n and bool(torch.isfinite(cost).all())
                  and bool((cost > 0).all()) and float(state["step"]) > 0)
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{where}: its subgoal graph is malformed ({exc})") from None
        if not ok:
            raise ValueError(f"{where}: its subgoal graph does not fit the model (version, shapes or values)")
        return cls(nodes.float(), src.long(), dst.long(), cost.float(), float(state["step"]))


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


def _with_detour(n: int, own: Tensor, near_src: Tensor, near_dst: Tensor, near_cost: Tensor, trusted: float,
                 detour: float, block: int = 512) -> Tensor:
    """Which links near_src -> near_dst (costs in chunks) to keep (bool, like near_cost): those shorter than
    ``trusted``, and the others whose ends are joined within ``detour`` chunks by own-episode links (own ->
    own + 1, cost 1) and trusted ones."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    device = near_cost.device
    own, near_src, near_dst, near_cost = (t.cpu().numpy() for t in (own, near_src, near_dst, near_cost))
    keep = near_cost < trusted
    src, dst = np.concatenate([own, near_src[keep]]), np.concatenate([own + 1, near_dst[keep]])
    links = csr_matrix((np.concatenate([np.ones(len(own)), near_cost[keep]]), (src, dst)), shape=(n, n))
    check = np.flatnonzero(~keep)
    ends = np.sort(np.stack([near_src[check], near_dst[check]], 1), 1)
    pairs, which = np.unique(ends, axis=0, return_inverse=True)  # a link found from both ends is checked once
    joined = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), block):  # (block, n) distances at a time
        a, b = pairs[start:start + block, 0], pairs[start:start + block, 1]
        sources, row = np.unique(a, return_inverse=True)
        far = dijkstra(links, directed=False, indices=sources, limit=detour)  # inf beyond the limit
        joined[start:start + block] = np.isfinite(far[row, b])
    keep[check] = joined[which.ravel()]
    return torch.from_numpy(keep).to(device)


def graph_settings(cfg: GraphConfig) -> dict:
    """The planner settings, by name, that plan with a graph built with ``cfg``: those other than the defaults.
    A model whose file holds such a graph records them (model.json's ``planner``), so it plans with it."""
    default = dataclasses.asdict(GraphConfig())
    return {f"subgoals.{k}": v for k, v in dataclasses.asdict(cfg).items() if v != default[k]}


def held_graph_config(model) -> dict | None:
    """The settings the graph a loaded model's file holds was built with (None: it holds none); a graph saved
    before a setting existed was built as that setting's ``BEFORE_SETTINGS`` value builds."""
    state = getattr(model, "extras", {}).get("graph")
    if state is None:
        return None
    config = _recorded(state)
    return {**config, **{k: v for k, v in BEFORE_SETTINGS.items() if k not in config}} if config else {}


def _recorded(state: dict) -> dict:
    """The settings a saved graph records ({} when it records none: a damaged or hand-made file)."""
    config = state.get("config")
    return config if isinstance(config, dict) else {}


def holds_graph(model, cfg: GraphConfig) -> bool:
    """Whether a loaded model's file holds a graph built with the settings ``cfg`` (nothing is built)."""
    return held_graph_config(model) == dataclasses.asdict(cfg)


def saved_graph(model, cfg: GraphConfig, where: str = "") -> LatentGraph | None:
    """The graph a loaded model's file holds, if it was built with the settings ``cfg``; else None."""
    if not holds_graph(model, cfg):
        return None
    return LatentGraph.from_state(model.extras["graph"], model.cfg.latent_dim, where).to(model.device)


def graph_for_checkpoint(model, checkpoint, cfg: GraphConfig, data: str = "", replace: bool = False) -> LatentGraph:
    """The subgoal graph of a trained model: the one its file holds when built with ``cfg`` (``data``, a path
    that must exist, is then not read: a message says so); else built from its own training episodes (of
    the dataset its checkpoint records, or ``data``) and saved into its file, so the next load needs no
    data (with a message), when it holds none or an older one (``keep_graph``), or with ``replace``."""
    from worldmodel.datasplit import open_data, training_episodes
    from worldmodel.model import read_model_meta

    if data and not os.path.exists(data):
        raise DatasetError(f"{data}: no such dataset (given for the subgoal graph of {checkpoint})")
    graph = saved_graph(model, cfg, str(checkpoint))
    if graph is not None:
        if data:
            log.info("%s not read: %s holds its subgoal graph, built with these settings", data, checkpoint)
        return graph
    meta = read_model_meta(checkpoint)
    held = held_graph_config(model)
    asked = dataclasses.asdict(cfg)
    differ = " ".join(f"--subgoals.{k.replace('_', '-')} {v}" for k, v in (held or {}).items() if v != asked.get(k))
    other = f", or plan with the graph its file holds ({differ})" if differ else ""
    store, _ = open_data(model, meta, checkpoint, data, f"subgoals need its training frames: pass --data with the "
                                                       f"dataset it was trained on{other}; once saved in the model "
                                                       f"file by `wm export`, the graph needs no data")
    graph = LatentGraph.build(model, store, training_episodes(store, meta), cfg)
    keep_graph(checkpoint, model, graph, cfg, replace)
    return graph


def _predates(state: dict, cfg: GraphConfig) -> bool:
    """Whether a saved graph predates some setting of ``cfg`` and was built as ``cfg`` in every other."""
    saved, asked = _recorded(state), dataclasses.asdict(cfg)
    return bool(saved) and set(saved) < set(asked) and all(asked[k] == v for k, v in saved.items())


def keep_graph(checkpoint, model, graph: LatentGraph, cfg: GraphConfig, replace: bool = False) -> bool:
    """Save a graph built for a model into its file, so the next load finds it (a message says so), when the
    file holds none, or one saved before some setting existed and built as ``cfg`` in every other, or with
    ``replace`` (a graph built with other settings for one evaluation leaves the model's own alone);
    model.json then records the settings that plan with it. Whether it was saved."""
    from worldmodel.model import planner_record, read_model_meta, save_extras

    if "graph" in getattr(model, "extras", {}) and not (replace or _predates(model.extras["graph"], cfg)):
        return False
    try:
        meta = read_model_meta(checkpoint)
        names = {f"subgoals.{f.name}" for f in dataclasses.fields(GraphConfig)}  # the record's graph settings go
        planner = {k: v for k, v in planner_record(meta).items() if k.replace("-", "_") not in names}
        save_extras(checkpoint, {"graph": graph.state(cfg)}, planner={**planner, **graph_settings(cfg)})
        model.extras = {**getattr(model, "extras", {}), "graph": graph.state(cfg)}
        log.info("%s: built its subgoal graph from the training frames and saved it in the model file", checkpoint)
        return True
    except OSError as exc:
        log.warning("%s: built its subgoal graph but could not save it in the model file (%s); it will be built "
                    "again next time", checkpoint, exc.strerror or exc)
        return False
