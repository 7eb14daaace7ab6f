"""Receding-horizon MPC with a world model: goal image in, one env action per call out.

The model thinks in chunks of ``frameskip`` env steps. At every chunk boundary the policy encodes the
frame, appends it to its latent history, and (every ``receding_horizon`` chunks) replans from the
shifted previous plan; between boundaries it plays the current chunk's actions one by one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from planners.base import Planner, PlannerConfig, shift_plan
from planners.cem import CEMConfig, CEMOptions, CEMPlanner
from planners.mppi import MPPIConfig, MPPIOptions, MPPIPlanner
from planners.subgoals import SubgoalConfig, SubgoalGraph
from worldmodel.config import nested, option
from worldmodel.model import synchronize

PLANNERS = {"cem": (CEMPlanner, CEMConfig), "mppi": (MPPIPlanner, MPPIConfig)}


@dataclass
class PolicyConfig:
    """How the MPC policy plans: the planner, its search settings, and how often it replans."""

    planner: str = option("cem", "cem or mppi", choices=tuple(PLANNERS))
    search: PlannerConfig = nested(PlannerConfig, "settings every planner has", flat=True)
    cem: CEMOptions = nested(CEMOptions, "CEM only")
    mppi: MPPIOptions = nested(MPPIOptions, "MPPI only")
    receding_horizon: int = option(1, "chunks executed between replans (the plan's first chunks)")
    context: int | None = option(None, "latest frames the planner conditions on (default: the model's history; "
                                       "1: the current frame only, as LeWM plans)")
    subgoals: SubgoalConfig = nested(SubgoalConfig, "waypoints for far goals")

    def __post_init__(self):
        if not 1 <= self.receding_horizon <= self.search.horizon:
            raise ValueError(f"--receding-horizon must be in [1, --horizon={self.search.horizon}], "
                             f"got {self.receding_horizon}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"--context must be >= 1, got {self.context}")
        self.planner_config()  # the chosen planner's own checks (elites <= samples, ...), before any data loads

    def planner_config(self, **overrides) -> PlannerConfig:
        """The chosen planner's full config (``CEMConfig`` or ``MPPIConfig``)."""
        _, cfg_cls = PLANNERS[self.planner]
        own = dataclasses.asdict(getattr(self, self.planner))
        return cfg_cls(**{**dataclasses.asdict(self.search), **own, **overrides})


class MPCPolicy:
    """``reset(goal_image)``, then ``act(obs_image) -> (2,)``; or the batched ``reset``/``act_batch``
    over B environments in lock-step (one planning call for all of them)."""

    def __init__(self, model, planner: Planner, receding_horizon: int = 1, context: int | None = None,
                 subgoals: tuple[SubgoalGraph, SubgoalConfig] | None = None):
        """``model`` is put in eval mode: the projector's BatchNorm must use its running statistics.
        ``context`` caps the frames the planner conditions on (default: the model's history).
        ``subgoals`` (a graph of training frames and its settings) makes far goals planned via waypoints."""
        if not 1 <= receding_horizon <= planner.cfg.horizon:
            raise ValueError(f"receding_horizon must be in [1, horizon={planner.cfg.horizon}], got {receding_horizon}")
        if hasattr(model, "eval"):
            model.eval()
        self.model, self.planner, self.receding_horizon = model, planner, receding_horizon
        self.frameskip, self.device = model.frameskip, model.device
        self.history = model.history if context is None else min(context, model.history)
        self.subgoals = subgoals
        self.plan_times: list[float] = []  # seconds per planning call (all B problems together)
        self.route_times: list[float] = []  # seconds to find the paths to the goals (subgoals only)
        self._z_goal = None

    # --- episode ------------------------------------------------------------------------------------
    def reset(self, goal_image: np.ndarray, keys=None) -> None:
        """Start an episode towards ``goal_image`` (H, W, 3), or B of them (B, H, W, 3).

        ``keys`` (B,) give each problem its own planner noise stream (``planners.noise.problem_keys``);
        by default problem b gets the key of (planner seed, b).
        """
        self.reset_latent(self._encode(self._frames(goal_image, "goal image")), keys)

    def reset_latent(self, z_goal: torch.Tensor, keys=None) -> None:
        """Start B episodes towards goal latents ``z_goal`` (B, D)."""
        B = z_goal.shape[0]
        self._z_goal = z_goal
        self.planner.reset()
        self._keys = (self.planner.default_keys(B, z_goal.device) if keys is None
                      else torch.as_tensor(keys, dtype=torch.int32).to(z_goal.device))
        if self._keys.shape != (B,):
            raise ValueError(f"keys must be ({B},) for {B} goals, got {tuple(self._keys.shape)}")
        self._route = None
        if self.subgoals is not None:
            start = time.perf_counter()
            self._route = self.subgoals[0].route(z_goal)
            self.route_times.append(time.perf_counter() - start)
        self._z_hist: torch.Tensor | None = None  # (B, h, D)
        self._a_hist: torch.Tensor | None = None  # (B, h-1, A)
        self._plan: torch.Tensor | None = None  # (B, H, A)
        self._chunk = None  # (B, frameskip, 2): the chunk being played
        self._chunk_host = None  # the same on the host, copied once per chunk
        self._t = 0  # env steps since reset
        self._chunks_since_plan = 0
        self._planned_from = None  # (z_hist, a_hist) the current plan was made from
        self._prediction = None  # its predicted final latent, computed on demand

    def set_history(self, frames: np.ndarray, chunks: np.ndarray) -> None:
        """Start from the history the episode would have had, instead of as if the arm had been at rest.

        After ``reset`` and before the first ``act``: ``frames`` (B, k, H, W, 3) uint8 are the k frames
        seen before the first observation, one every ``frameskip`` env steps, oldest first, and
        ``chunks`` (B, k, frameskip * 2) the actions played after each of them (chunk j leads from frame
        j to frame j+1, the last one to the first observation), as in training windows. Only the last
        ``history - 1`` frames matter to the model. Pad a shorter history as training does: repeat the
        oldest frame with zero chunks (``pad_history``).
        """
        if self._z_goal is None or self._t != 0:
            raise RuntimeError("call set_history after reset and before the first act")
        frames = self._frames(np.asarray(frames).reshape(-1, *np.shape(frames)[-3:]), "history frame")
        B, A = self._z_goal.shape[0], self.model.action_dim
        chunks = torch.as_tensor(np.asarray(chunks, np.float32), device=self.device)
        if chunks.ndim != 3 or chunks.shape[0] != B or chunks.shape[2] != A or len(frames) != B * chunks.shape[1]:
            raise ValueError(f"history: frames (B={B}, k, H, W, 3) and chunks (B, k, {A}) must agree, got "
                             f"{len(frames)} frames and chunks {tuple(chunks.shape)}")
        k = chunks.shape[1]
        if k == 0:
            return
        keep = min(k, self.history - 1)
        z = rearrange(self._encode(frames), "(b k) d -> b k d", b=B)[:, k - keep:]  # (B, keep, D)
        self._z_hist = z
        self._a_hist = chunks[:, k - keep:k - 1] if keep > 1 else None
        self._chunk = rearrange(chunks[:, -1], "b (f a) -> b f a", f=self.frameskip)

    def act(self, obs_image: np.ndarray) -> np.ndarray:
        """One env action (2,) for one environment (after ``reset`` with one goal)."""
        return self.act_batch(np.asarray(obs_image)[None])[0]

    def act_batch(self, obs_images: np.ndarray) -> np.ndarray:
        """Env actions (B, 2) for B environments. Frames are checked at every step but copied to the
        device and encoded only at chunk boundaries (every ``frameskip`` steps)."""
        images = self._check_frames(obs_images, "observation")
        return self.act_latent(lambda: self._encode(self._to_device(images)), len(images))

    @torch.no_grad()
    def act_latent(self, observe, n: int) -> np.ndarray:
        """Env actions (B, 2); ``observe()`` gives the current latents (B, D), called only at chunk boundaries."""
        if self._z_goal is None:
            raise RuntimeError("call reset(goal_image) before act")
        if n != self._z_goal.shape[0]:
            raise ValueError(f"{n} observations for {self._z_goal.shape[0]} goals")
        k = self._t % self.frameskip
        if k == 0:
            self._observe(observe())
        self._t += 1
        return self._chunk_host[:, k]

    @property
    @torch.no_grad()
    def last_prediction(self) -> torch.Tensor | None:
        """(B, D): the latent the model predicts at the end of the current plan (None before the first)."""
        if self._plan is not None and self._prediction is None:  # once per plan, on demand
            self._prediction = self.model.rollout(*self._planned_from, self._plan)[:, -1]
        return self._prediction

    # --- internals ----------------------------------------------------------------------------------
    def _observe(self, z: torch.Tensor) -> None:
        """A chunk boundary: extend the history with the chunk just played, replan if due, pick the next chunk."""
        if self._z_hist is None:
            self._z_hist, self._a_hist = z[:, None], None
        else:
            played = rearrange(self._chunk, "b k a -> b (k a)")[:, None]  # (B, 1, A)
            a = played if self._a_hist is None else torch.cat([self._a_hist, played], 1)
            self._z_hist = torch.cat([self._z_hist, z[:, None]], 1)[:, -self.history:]
            self._a_hist = a[:, a.shape[1] - (self._z_hist.shape[1] - 1):]
            if self._plan is not None:
                self._chunks_since_plan += 1
        if self._plan is None or self._chunks_since_plan >= self.receding_horizon:
            self._replan()
        chunk = self._plan[:, self._chunks_since_plan]  # (B, A)
        self._chunk = rearrange(chunk, "b (k a) -> b k a", k=self.frameskip)
        self._chunk_host = self._chunk.cpu().numpy().astype(np.float32)

    def _replan(self) -> None:
        init = None if self._plan is None else shift_plan(self._plan, self._chunks_since_plan)
        a_hist = self._a_hist if self._z_hist.shape[1] > 1 else None
        synchronize(self.device)
        start = time.perf_counter()
        target = self._z_goal
        if self._route is not None:  # a waypoint on the way to a far goal
            graph, cfg = self.subgoals
            target = graph.targets(self._route, self._z_hist[:, -1], cfg)
        result = self.planner.plan(self._z_hist, target, a_hist, init, keys=self._keys)
        synchronize(self.device)
        self.plan_times.append(time.perf_counter() - start)
        self._plan, self._chunks_since_plan = result.actions, 0
        self._planned_from, self._prediction = (self._z_hist, a_hist), None

    def _check_frames(self, images, what: str) -> np.ndarray:
        x, size = np.asarray(images), self.model.cfg.image_size
        if x.ndim == 3:
            x = x[None]
        if x.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != (size, size, 3) or len(x) == 0:
            raise ValueError(f"{what} must be ({size}, {size}, 3) for this model (or a non-empty batch of them), "
                             f"got {x.shape}")
        return x

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _frames(self, images, what: str) -> torch.Tensor:
        return self._to_device(self._check_frames(images, what))

    @torch.no_grad()
    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode(frames).float()

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """Latents (B, D) of uint8 frames (B, H, W, 3): for ``act_latent(lambda: encode_images(render()))``,
        which renders and encodes only at chunk boundaries."""
        return self._encode(self._frames(images, "observation"))


def pad_history(frames: np.ndarray, chunks: np.ndarray, k: int, first_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A history of ``m`` frames (m, H, W, 3) and chunks (m, A) left-padded to ``k`` the way training pads
    a window: the oldest frame repeated, with zero chunks. With m = 0 the first observation is repeated,
    which is exactly the start of an episode with no history."""
    m = len(frames)
    if m >= k:
        return frames[m - k:], chunks[m - k:]
    oldest = frames[:1] if m else first_obs[None]
    return (np.concatenate([np.repeat(oldest, k - m, axis=0), frames]),
            np.concatenate([np.zeros((k - m, chunks.shape[1]), np.float32), chunks]))


def make_planner(model, planner: str = "cem", **overrides) -> Planner:
    """A CEM or MPPI planner over ``model``; ``overrides`` set fields of its config."""
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {sorted(PLANNERS)}, got {planner!r}")
    cls, cfg_cls = PLANNERS[planner]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {planner} settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(model, cfg_cls(**overrides))


def policy_from_config(model, cfg: PolicyConfig, seed: int = 0, graph: SubgoalGraph | None = None) -> MPCPolicy:
    """The MPC policy a ``PolicyConfig`` describes, over ``model`` (``graph``: the subgoal graph, needed
    when ``cfg.subgoals.enabled``)."""
    cls, _ = PLANNERS[cfg.planner]
    if cfg.subgoals.enabled and graph is None:
        raise ValueError("subgoals are enabled: pass the graph of the model's training frames")
    subgoals = (graph, cfg.subgoals) if cfg.subgoals.enabled else None
    return MPCPolicy(model, cls(model, cfg.planner_config(seed=seed)), cfg.receding_horizon, cfg.context, subgoals)


def load_policy(checkpoint_path: str | Path, planner: str = "cem", device: str = "auto",
                receding_horizon: int = 1, subgoals: bool | str | SubgoalConfig = "auto", data: str = "",
                **overrides) -> MPCPolicy:
    """An MPC policy from a trained checkpoint, for users and outside harnesses.

    ``overrides`` set the planner's config (``samples``, ``iterations``, ``horizon``, ``cost``, ``seed``,
    and CEM's or MPPI's own settings such as ``elites`` or ``temperature``). ``subgoals`` plans far goals
    via waypoints of a graph of the model's training frames (its recorded dataset, or ``data``): True (or
    a ``SubgoalConfig``) requires that data, False plans without, ``"auto"`` (default) uses it when the
    data is there and says so when it is not.
    """
    from planners.subgoals import graph_for_checkpoint
    from worldmodel.model import WorldModel

    model = WorldModel.load(checkpoint_path, device)
    graph_cfg = subgoals if isinstance(subgoals, SubgoalConfig) else SubgoalConfig(enabled=bool(subgoals))
    graph = None
    if graph_cfg.enabled:
        try:
            graph = (graph_for_checkpoint(model, checkpoint_path, graph_cfg, data), graph_cfg)
        except (OSError, ValueError) as exc:
            if subgoals != "auto":
                raise
            print(f"load_policy: planning without subgoals (their graph needs the training data: {exc})")
    return MPCPolicy(model, make_planner(model, planner, **overrides), receding_horizon, subgoals=graph)
