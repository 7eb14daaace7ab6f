"""Receding-horizon MPC with a world model: goal image in, one env action per call out.

The model thinks in chunks of ``frameskip`` env steps. At every chunk boundary the policy encodes the
frame, appends it to its latent history, and (every ``receding_horizon`` chunks) replans from the
shifted previous plan; between boundaries it plays the current chunk's actions one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from common.config import apply_overrides, check_types, nested, option
from common.device import resolve_device, synchronize, warn_bf16_without_units
from planners import subgoals
from planners.base import Planner, shift_plan
from planners.cem import CEMPlanner
from planners.config import PlannerConfig, other_planners_settings
from planners.mppi import MPPIPlanner
from planners.noise import as_keys
from planners.subgoals import SubgoalConfig
from worldmodel.graph import LatentGraph

PLANNERS = {"cem": CEMPlanner, "mppi": MPPIPlanner}  # PlannerConfig.planner -> its class


@dataclass
class PolicyConfig:
    """How the MPC policy plans: the planner and its settings, how often it replans, what it conditions on,
    and the subgoals it chases towards far goals."""

    plan: PlannerConfig = nested(PlannerConfig, "the planner", flat=True)
    receding_horizon: int = option(1, "chunks executed between replans (the plan's first chunks)")
    context: int | None = option(None, "latest frames the planner conditions on, at most the model's history "
                                       "(default: all of it; 1: the current frame only, as LeWM plans)")
    step_replan: str = option("never", "also replan between chunk boundaries, at every env step: never, near (a "
                                       "problem, once it has come within subgoals.reach of its goal) or always; "
                                       "frames are then rendered and encoded at every step",
                              choices=("never", "near", "always"))
    subgoals: SubgoalConfig = nested(SubgoalConfig, "waypoints for far goals")

    def __post_init__(self):
        check_types(self)
        if self.step_replan != "never" and self.receding_horizon != 1:
            raise ValueError("step_replan needs receding_horizon 1 (a plan per chunk boundary at least)")
        if self.step_replan == "near" and not self.subgoals.enabled:
            raise ValueError("step_replan near uses the subgoal route to tell when the goal is near: enable subgoals")
        if not 1 <= self.receding_horizon <= self.plan.horizon:
            raise ValueError(f"receding_horizon must be in [1, horizon={self.plan.horizon}], got "
                             f"{self.receding_horizon}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be >= 1, got {self.context}")


def check_context(policy: PolicyConfig, history: int) -> None:
    """Refuse a ``context`` longer than the model's ``history`` (a command checks it as soon as the model is
    loaded, before any long work)."""
    if policy.context is not None and policy.context > history:
        raise ValueError(f"--context {policy.context}: the model conditions on at most {history} frames (its "
                         f"history)")


def check_policy_device(policy: PolicyConfig, device: str) -> None:
    """Refuse, before any work, settings the run's device cannot serve, and say which would run slower than
    without them (a command's config calls this)."""
    on_cpu = resolve_device(device).type != "cuda"
    if policy.plan.cuda_graph and on_cpu:
        raise ValueError(f"--cuda-graph needs CUDA, but --device {device} runs on the CPU here")
    if policy.plan.bf16 and on_cpu:
        warn_bf16_without_units()


def make_planner(model, cfg: PlannerConfig | None = None) -> Planner:
    """The planner ``cfg.planner`` names (CEM by default) over ``model``."""
    cfg = cfg if cfg is not None else PlannerConfig()
    return PLANNERS[cfg.planner](model, cfg)


class MPCPolicy:
    """``reset(goal_image)``, then ``act(obs_image) -> (2,)``; or the batched ``reset``/``act_batch``
    over B environments in lock-step (one planning call for all of them)."""

    def __init__(self, model, cfg: PolicyConfig | None = None, graph: LatentGraph | None = None,
                 planner: Planner | None = None):
        """``model`` is put in eval mode: the projector's BatchNorm must use its running statistics.
        ``cfg`` says how to plan (default: ``PolicyConfig()``); ``graph`` (the graph of the model's training
        frames) is needed when ``cfg.subgoals.enabled``. ``planner`` replaces the one ``cfg.plan`` describes
        (e.g. a planner over another model of the same horizon)."""
        cfg = cfg if cfg is not None else PolicyConfig()
        if cfg.subgoals.enabled and graph is None:
            raise ValueError("subgoals are enabled: pass the graph of the model's training frames "
                             "(worldmodel.graph), or disable them (subgoals.enabled=False)")
        planner = planner if planner is not None else make_planner(model, cfg.plan)
        if planner.cfg.horizon != cfg.plan.horizon:
            raise ValueError(f"the planner's horizon {planner.cfg.horizon} is not the policy's {cfg.plan.horizon}")
        if hasattr(model, "eval"):
            model.eval()
        self.model, self.cfg, self.planner, self.receding_horizon = model, cfg, planner, cfg.receding_horizon
        self.frameskip, self.device = model.frameskip, model.device
        check_context(cfg, model.history)
        self.history = model.history if cfg.context is None else cfg.context
        self.graph = graph if cfg.subgoals.enabled else None
        self.plan_times: list[float] = []  # seconds per planning call (all B problems together)
        self.route_times: list[float] = []  # seconds solving the paths to the goals (subgoals only)
        self.waypoint_times: list[float] = []  # seconds per planning call finding the waypoints (subgoals only;
        # host time: on a GPU the launch, the work itself is in plan_times)
        self._z_goal, self._route, self._earlier_strays = None, None, 0

    # --- episode ------------------------------------------------------------------------------------
    def reset(self, goal_image: np.ndarray, keys=None) -> None:
        """Start an episode towards ``goal_image`` (H, W, 3), or B of them (B, H, W, 3).

        ``keys`` (B,) give each problem its own planner noise stream (``planners.noise.problem_keys``);
        by default problem b gets the key of (planner seed, b).
        """
        self.reset_latent(self._encode(self._frames(goal_image, "goal image")), keys)

    def reset_latent(self, z_goal: torch.Tensor, keys=None) -> None:
        """Start B episodes towards goal latents ``z_goal`` (B, D), a float tensor (checked before anything
        of the episodes under way changes)."""
        latent = getattr(self.planner, "latent_dim", None)  # a planner of one's own may not say
        if (not isinstance(z_goal, torch.Tensor) or z_goal.ndim != 2 or not z_goal.is_floating_point()
                or not len(z_goal) or z_goal.shape[1] != (latent or z_goal.shape[1])):
            got = f"{z_goal.dtype} {tuple(z_goal.shape)}" if isinstance(z_goal, torch.Tensor) else type(z_goal).__name__
            raise ValueError(f"z_goal must be a float tensor of goal latents (B, {latent or 'D'}), B >= 1, got {got}")
        if not bool(torch.isfinite(z_goal).all()):  # once per episode: no plan could head for it, silently
            raise ValueError("z_goal holds NaN or inf values: no plan can head for them (a broken goal encoding?)")
        B = z_goal.shape[0]
        self.planner.reset()
        self._keys = self.planner.default_keys(B, z_goal.device) if keys is None else as_keys(keys, B, z_goal.device)
        self._z_hist: torch.Tensor | None = None  # (B, h, D)
        self._a_hist: torch.Tensor | None = None  # (B, h-1, A)
        self._plan: torch.Tensor | None = None  # (B, H, A)
        self._chunk = None  # (B, frameskip, 2): the chunk being played
        self._chunk_host = None  # the same on the host, copied once per chunk
        self._t = 0  # env steps since reset
        self._chunks_since_plan = 0
        self._planned_from = None  # (z_hist, a_hist) the current plan was made from
        self._prediction = None  # its predicted final latent, computed on demand
        self._step_z: list[torch.Tensor] = []  # step replanning: latents (B, D) of the recent env steps
        self._played: list[np.ndarray] = []  # step replanning: actions (B, 2) played at the recent env steps
        self._step_plan = None  # (host (B, H*fs, 2), pointer (B,), rows (B,) bool) of plans made between boundaries
        self._steps_since_plan = 0  # step replanning: env steps played since the boundary plan
        self._head_for(z_goal)

    def retarget(self, goal_image: np.ndarray) -> None:
        """Head for new goals (one per episode, as ``reset`` took them) without starting the episodes again:
        what the policy has seen (its history), the chunk in play and the plan it warm-starts from are kept,
        so the arm goes on from where it is to the next goal of a sequence."""
        if self._z_goal is None:
            raise RuntimeError("call reset(goal_image) before retarget")
        z_goal = self._encode(self._frames(goal_image, "goal image"))
        if z_goal.shape != self._z_goal.shape:
            raise ValueError(f"{len(z_goal)} goals for {len(self._z_goal)} episodes")
        self._head_for(z_goal)

    def _head_for(self, z_goal: torch.Tensor) -> None:
        """The goal latents (B, D) the next plans head for, and the route of waypoints to them (subgoals:
        solved from where the arms are, now if the episode is under way, else at the first chunk boundary)."""
        self._earlier_strays = self.route_strays
        self._z_goal, self._route = z_goal, None
        if self.graph is not None:
            self._route = self._routing(lambda: subgoals.route(self.graph, z_goal, self.cfg.subgoals))
            if self._z_hist is not None:
                self._routing(lambda: subgoals.solve(self.graph, self._route, self._z_hist[:, -1]))

    @property
    def route_strays(self) -> int:
        """Plans in which some arm was beyond the paths solved for it (it headed for its goal that once), over
        every route since the policy was made (subgoals only): none is the rule."""
        return self._earlier_strays + (self._route.strays if self._route is not None else 0)

    def _routing(self, work):
        """``work()``, host work on the subgoal route, timed into ``route_times``."""
        start = time.perf_counter()
        out = work()
        self.route_times.append(time.perf_counter() - start)
        return out

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
        if np.size(frames) == 0 and np.size(chunks) == 0:
            return  # nothing seen before the first observation (k = 0): as if at rest, as reset leaves it
        frames = self._frames(np.asarray(frames).reshape(-1, *np.shape(frames)[-3:]), "history frame")
        B, A = self._z_goal.shape[0], self.model.action_dim
        chunks = np.asarray(chunks, np.float32)
        if not np.all(np.abs(chunks) <= 1 + 1e-4):  # NaN fails this too
            raise ValueError("history: chunks must hold the actions played, finite and in [-1, 1]")
        chunks = torch.as_tensor(chunks, device=self.device)
        if chunks.ndim != 3 or chunks.shape[0] != B or chunks.shape[2] != A or len(frames) != B * chunks.shape[1]:
            raise ValueError(f"history: frames (B={B}, k, H, W, 3) and chunks (B, k, {A}) must agree, got "
                             f"{len(frames)} frames and chunks {tuple(chunks.shape)}")
        k = chunks.shape[1]
        keep = min(k, self.history - 1)
        z = rearrange(self._encode(frames), "(b k) d -> b k d", b=B)[:, k - keep:]  # (B, keep, D)
        self._z_hist = z
        self._a_hist = chunks[:, k - keep:k - 1] if keep > 1 else None
        self._chunk = rearrange(chunks[:, -1], "b (f a) -> b f a", f=self.frameskip)

    def act(self, obs_image: np.ndarray) -> np.ndarray:
        """One env action (2,) for one environment (after ``reset`` with one goal)."""
        image = np.asarray(obs_image)
        if image.ndim != 3:
            size = self.model.cfg.image_size
            raise ValueError(f"act takes one observation ({size}, {size}, 3), got {image.shape}; act_batch takes a "
                             f"batch")
        return self.act_batch(image)[0]  # a batch of one, its error naming the shape given

    def act_batch(self, obs_images: np.ndarray) -> np.ndarray:
        """Env actions (B, 2) for B environments. Frames are checked at every step but copied to the
        device and encoded only at chunk boundaries (every ``frameskip`` steps)."""
        images = self._check_frames(obs_images, "observation")
        return self.act_latent(lambda: self._encode(self._to_device(images)), len(images))

    @torch.no_grad()
    def act_latent(self, observe, n: int) -> np.ndarray:
        """Env actions (B, 2); ``observe()`` gives the current latents (B, D), called only at chunk boundaries
        (at every step with ``step_replan``)."""
        if self._z_goal is None:
            raise RuntimeError("call reset(goal_image) before act")
        if n != self._z_goal.shape[0]:
            raise ValueError(f"{n} observations for {self._z_goal.shape[0]} goals")
        k = self._t % self.frameskip
        if self.cfg.step_replan == "never":
            if k == 0:
                self._observe(observe())
            self._t += 1
            return self._chunk_host[:, k]
        return self._act_stepwise(observe(), k)

    def _act_stepwise(self, z: torch.Tensor, k: int) -> np.ndarray:
        """``step_replan``: every step's latent is kept; between chunk boundaries, the problems that are near
        their goal (or all) replan from the frames ``frameskip`` steps apart that end at this step."""
        span = (self.history - 1) * self.frameskip
        self._step_z = (self._step_z + [z])[-(span + 1):]
        if k == 0:
            self._observe(z)  # replans every problem from the boundary, warm-started from what each was playing
            self._step_plan = None
        elif len(self._step_z) > span:
            rows = np.ones(len(z), bool) if self.cfg.step_replan == "always" else self._route.near.cpu().numpy()
            if rows.any():
                self._step_replan(rows)
        action = self._chunk_host[:, k].copy()
        if self._step_plan is not None:
            queue, pointer, rows = self._step_plan
            action[rows] = queue[rows, pointer[rows]]
            pointer += 1
        self._played = (self._played + [action])[-max(span, self.frameskip):]
        self._steps_since_plan += 1
        self._t += 1
        return action

    def _step_replan(self, rows: np.ndarray) -> None:
        """Plan all problems from this step's history; the ``rows`` (B,) that asked follow the new plans."""
        fs = self.frameskip
        z_hist = torch.stack(self._step_z[::fs], 1)  # (B, h, D): frames fs steps apart, ending now
        a_hist = None
        if self.history > 1:  # the chunks played between those frames
            played = torch.from_numpy(np.stack(self._played[-(self.history - 1) * fs:], 1)).to(self.device)
            a_hist = rearrange(played, "b (c k) a -> b c (k a)", k=fs)  # (B, h-1, A)
        result = self._plan_from(z_hist, a_hist, self._upcoming())
        new = rearrange(result.actions.clamp(-1, 1).cpu().numpy(), "b h (k a) -> b (h k) a", k=fs)
        if self._step_plan is None:
            self._step_plan = (np.zeros_like(new), np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows), bool))
        queue, pointer, following = self._step_plan
        queue[rows], pointer[rows], following[rows] = new[rows], 0, True

    def _upcoming(self) -> torch.Tensor:
        """Each problem's actions still to play from this step on (B, H, A), zero-padded: the warm start of a
        plan made now, from the boundary plan or the plan made since."""
        fs, H = self.frameskip, self._plan.shape[1]
        flat = rearrange(self._plan.cpu().numpy(), "b h (k a) -> b (h k) a", k=fs)
        upcoming = np.zeros_like(flat)
        upcoming[:, :H * fs - self._steps_since_plan] = flat[:, self._steps_since_plan:]
        if self._step_plan is not None:
            queue, pointer, rows = self._step_plan
            for b in np.flatnonzero(rows):
                upcoming[b] = 0
                upcoming[b, :H * fs - pointer[b]] = queue[b, pointer[b]:]
        return torch.from_numpy(rearrange(upcoming, "b (h k) a -> b h (k a)", h=H)).to(self.device)

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
            if self._played and self._t > 0:  # step replanning: what was really played, some of it replanned
                chunk = torch.from_numpy(np.stack(self._played[-self.frameskip:], 1)).to(self.device)
            else:
                chunk = self._chunk
            played = rearrange(chunk, "b k a -> b (k a)")[:, None]  # (B, 1, A)
            a = played if self._a_hist is None else torch.cat([self._a_hist, played], 1)
            self._z_hist = torch.cat([self._z_hist, z[:, None]], 1)[:, -self.history:]
            self._a_hist = a[:, a.shape[1] - (self._z_hist.shape[1] - 1):]
            if self._plan is not None:
                self._chunks_since_plan += 1
        nearest = None  # the nodes nearest z, once the solve has found them
        if self._route is not None and not self._route.is_solved:  # an episode's first boundary: the arms' starts
            nearest = self._routing(lambda: subgoals.solve(self.graph, self._route, z))
        if self._plan is None or self._chunks_since_plan >= self.receding_horizon:
            self._replan(nearest)
        chunk = self._plan[:, self._chunks_since_plan].clamp(-1, 1)  # (B, A): what the env plays (and history holds)
        self._chunk = rearrange(chunk, "b (k a) -> b k a", k=self.frameskip)
        self._chunk_host = self._chunk.cpu().numpy().astype(np.float32)
        if self._route is not None:  # the device is idle: solve further where an arm neared the edge of the solve
            self._routing(lambda: subgoals.cover(self.graph, self._route))

    def _replan(self, nearest=None) -> None:
        """Plan from the history, which ends at this boundary's latents (``nearest``: their nodes, if found)."""
        init = None
        if self._plan is not None:  # warm start: what each problem was about to play
            init = self._upcoming() if self._step_plan is not None else shift_plan(self._plan, self._chunks_since_plan)
        a_hist = self._a_hist if self._z_hist.shape[1] > 1 else None
        result = self._plan_from(self._z_hist, a_hist, init, nearest)
        self._plan, self._chunks_since_plan, self._steps_since_plan = result.actions, 0, 0
        self._planned_from, self._prediction = (self._z_hist, a_hist), None

    def _plan_from(self, z_hist: torch.Tensor, a_hist, init, nearest=None):
        """One timed planning call for all problems, towards each one's goal or waypoint (the device is already
        idle here: the last chunk was copied to the host); ``nearest``: the nodes of ``z_hist[:, -1]``, if known."""
        start = time.perf_counter()
        target = self._z_goal
        if self._route is not None:  # a waypoint on the way to a far goal
            target = subgoals.targets(self.graph, self._route, z_hist[:, -1], self.cfg.subgoals, nearest)
            self.waypoint_times.append(time.perf_counter() - start)
        self.last_target = target  # (B, D): what the last plan headed for (for videos)
        result = self.planner.plan(z_hist, target, a_hist, init, keys=self._keys)
        synchronize(self.device)
        self.plan_times.append(time.perf_counter() - start)
        return result

    def _check_frames(self, images, what: str) -> np.ndarray:
        given, size = np.asarray(images), self.model.cfg.image_size
        x = given[None] if given.ndim == 3 else given
        if x.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != (size, size, 3) or len(x) == 0:
            raise ValueError(f"{what} must be ({size}, {size}, 3) for this model (or a non-empty batch of them), "
                             f"got {given.shape}")
        return x

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy()).to(self.device)  # torch wants writeable

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


def recorded_planner(checkpoint_path: str | Path) -> dict:
    """The planner settings a model file records, by name (model.json's ``planner``: those of its training
    preset where validation chose other than the default, e.g. the hold preset's CEM 100 x 10; a file written
    before models recorded it: its recorded preset's), checked; {} for the default planner. A
    ``CheckpointError`` naming the file and the setting otherwise."""
    from worldmodel.model import CheckpointError, planner_record, read_model_meta

    path = Path(checkpoint_path)
    settings = planner_record(read_model_meta(path))
    try:
        apply_overrides(PolicyConfig(), settings)
    except ValueError as exc:
        raise CheckpointError(f"{path.with_suffix('.json')}: 'planner': {exc}") from None
    return {name.replace("-", "_"): value for name, value in settings.items()}  # one spelling of each name


def without_other_planners(settings: dict, planner: str | None) -> dict:
    """A model's recorded planner settings less those of a planner other than ``planner``, the one asked for
    (None: as recorded): that search does not read them, and whoever asked for it did not give them."""
    if planner is None:
        return settings
    return {name: value for name, value in settings.items() if not name.startswith(other_planners_settings(planner))}


def policy_config(checkpoint_path: str | Path, overrides: dict | None = None) -> PolicyConfig:
    """How ``checkpoint_path``'s model is planned: the planner settings its model file records, with
    ``overrides`` (settings by name) on top."""
    overrides = overrides or {}
    recorded = without_other_planners(recorded_planner(checkpoint_path), overrides.get("planner"))
    return apply_overrides(PolicyConfig(), {**recorded, **overrides})


def load_policy(checkpoint_path: str | Path, device: str = "auto", data: str = "", **overrides) -> MPCPolicy:
    """An MPC policy from a trained checkpoint, for users and outside harnesses.

    The policy plans as the model file records (``recorded_planner``: the default planner unless its
    training preset chose another), with ``overrides`` on top: the policy's settings by the names the
    command line uses, ``samples=300``, ``planner="mppi"``, ``receding_horizon=2``, and the dotted ones as
    ``**{"cem.elites": 30, "subgoals.enabled": False}``. Subgoals (on by default) plan far goals via
    waypoints of a graph of the model's training frames: the one the model file holds when built with the
    settings asked for (``data`` is then not read, a log message says so), else built from its recorded
    dataset (or ``data``) and saved into the file.
    """
    from worldmodel.graph import graph_for_checkpoint
    from worldmodel.model import WorldModel

    cfg = policy_config(checkpoint_path, overrides)
    model = WorldModel.load(checkpoint_path, device)
    graph = graph_for_checkpoint(model, checkpoint_path, cfg.subgoals.graph, data) if cfg.subgoals.enabled else None
    return MPCPolicy(model, cfg, graph)
