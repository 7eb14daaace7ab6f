"""Receding-horizon MPC with a world model: goal image in, one env action per call out.

The model thinks in chunks of ``frameskip`` env steps. At every chunk boundary the policy encodes the
frame, appends it to its latent history, and (every ``receding_horizon`` chunks) replans from the
shifted previous plan; between boundaries it plays the current chunk's actions one by one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from planners.base import Planner, shift_plan
from planners.cem import CEMConfig, CEMPlanner
from planners.mppi import MPPIConfig, MPPIPlanner
from worldmodel.model import synchronize

PLANNERS = {"cem": (CEMPlanner, CEMConfig), "mppi": (MPPIPlanner, MPPIConfig)}


class MPCPolicy:
    """``reset(goal_image)``, then ``act(obs_image) -> (2,)``; or the batched ``reset``/``act_batch``
    over B environments in lock-step (one planning call for all of them)."""

    def __init__(self, model, planner: Planner, receding_horizon: int = 1):
        """``model`` is put in eval mode: the projector's BatchNorm must use its running statistics."""
        if not 1 <= receding_horizon <= planner.cfg.horizon:
            raise ValueError(f"receding_horizon must be in [1, horizon={planner.cfg.horizon}], got {receding_horizon}")
        if hasattr(model, "eval"):
            model.eval()
        self.model, self.planner, self.receding_horizon = model, planner, receding_horizon
        self.frameskip, self.history, self.device = model.frameskip, model.history, model.device
        self.plan_times: list[float] = []  # seconds per planning call (all B problems together)
        self._z_goal = None

    # --- episode ------------------------------------------------------------------------------------
    def reset(self, goal_image: np.ndarray) -> None:
        """Start an episode towards ``goal_image`` (H, W, 3), or B of them (B, H, W, 3)."""
        self.reset_latent(self._encode(self._frames(goal_image, "goal image")))

    def reset_latent(self, z_goal: torch.Tensor) -> None:
        """Start B episodes towards goal latents ``z_goal`` (B, D)."""
        self._z_goal = z_goal
        self._z_hist: torch.Tensor | None = None  # (B, h, D)
        self._a_hist: torch.Tensor | None = None  # (B, h-1, A)
        self._plan: torch.Tensor | None = None  # (B, H, A)
        self._chunk = None  # (B, frameskip, 2): the chunk being played
        self._chunk_host = None  # the same on the host, copied once per chunk
        self._t = 0  # env steps since reset
        self._chunks_since_plan = 0
        self._planned_from = None  # (z_hist, a_hist) the current plan was made from
        self._prediction = None  # its predicted final latent, computed on demand

    def act(self, obs_image: np.ndarray) -> np.ndarray:
        """One env action (2,) for one environment (after ``reset`` with one goal)."""
        return self.act_batch(np.asarray(obs_image)[None])[0]

    def act_batch(self, obs_images: np.ndarray) -> np.ndarray:
        """Env actions (B, 2) for B environments."""
        frames = self._frames(obs_images, "observation")
        return self.act_latent(lambda: self._encode(frames), len(frames))

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
        result = self.planner.plan(self._z_hist, self._z_goal, a_hist, init)
        synchronize(self.device)
        self.plan_times.append(time.perf_counter() - start)
        self._plan, self._chunks_since_plan = result.actions, 0
        self._planned_from, self._prediction = (self._z_hist, a_hist), None

    def _frames(self, images, what: str) -> torch.Tensor:
        x, size = np.asarray(images), self.model.cfg.image_size
        if x.ndim == 3:
            x = x[None]
        if x.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"{what} must be ({size}, {size}, 3) for this model (or a batch of them), got {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @torch.no_grad()
    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode(frames).float()


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


def load_policy(checkpoint_path: str | Path, planner: str = "cem", device: str = "auto",
                receding_horizon: int = 1, **overrides) -> MPCPolicy:
    """An MPC policy from a trained checkpoint, for users and outside harnesses.

    ``overrides`` set the planner's config (``samples``, ``iterations``, ``horizon``, ``cost``, ``seed``, ...).
    The cost defaults to ``sum``: with the last step's distance alone, replanning keeps deferring arrival
    (README, Notes).
    """
    from worldmodel.model import WorldModel, resolve_device

    overrides.setdefault("cost", "sum")
    model = WorldModel.load(checkpoint_path, resolve_device(device))
    return MPCPolicy(model, make_planner(model, planner, **overrides), receding_horizon)
