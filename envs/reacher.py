"""``ReacherPixels``: MuJoCo Reacher with RGB observations behind the gymnasium ``Env`` API."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from common.config import check_integer
from envs.physics import make_physics
from envs.render import PixelRenderer

MIN_SIZE, MAX_SIZE = 32, 256
MAX_ACTION_REPEAT = 100
# MuJoCo joint limits are soft: pushed at full torque the wrist goes up to ~0.16 rad past its range
# (measured over 40 x 300 steps of bang-bang actions), so poses seen in rollouts may lie that far out
# and must stay usable as starts and goals. Beyond this slack a pose is refused.
WRIST_SLACK = 0.25
GOAL_TOLERANCE = 0.05  # rad: the protocol's success threshold on every joint
# Joint speeds an arm can have: under full torque it stays below ~6 rad/s (dm_control) and ~95 rad/s
# (gymnasium's lighter arm); far beyond, MuJoCo finds the simulation unstable and silently resets it.
MAX_QVEL = 1000.0
RESET_OPTIONS = ("qpos", "qvel", "target", "goal_qpos")

# The names used on the command line and stored in datasets: name -> (backend, task).
ENV_NAMES = {
    "reacher-easy": ("dm_control", "easy"),
    "reacher-hard": ("dm_control", "hard"),
    "gym-reacher": ("gymnasium", "easy"),
}


def wrap_angle(x):
    """Angles wrapped to [-pi, pi), so that errors across the +-pi seam are small; numpy arrays or tensors."""
    return (x + math.pi) % (2 * math.pi) - math.pi


def joint_error(qpos, goal, wrap: bool = True) -> np.ndarray:
    """The protocol's pose error: the largest joint-angle error, (..., 2), (..., 2) -> (...), radians; the
    shoulder's wrapped to [-pi, pi) unless ``wrap`` is off (LeWM's rule, under which a shoulder at pi - 0.01
    is 2 pi - 0.02 away from one at -pi + 0.01). The wrist's never is: its joint limit stops it short of the
    seam, so the way between two wrist angles is their plain difference (up to about 5.6 rad).

    Success is ``joint_error(qpos, goal) < 0.05`` (every joint within 0.05 rad of the goal pose)."""
    diff = np.asarray(qpos, dtype=np.float64) - np.asarray(goal, dtype=np.float64)
    if diff.shape[-1:] != (2,):
        raise ValueError(f"joint_error takes (..., 2) joint angles, got shapes {np.shape(qpos)} and {np.shape(goal)}")
    if wrap:  # only differences beyond the seam are wrapped: the modulo would round the others (0.05 -> 0.04999...)
        shoulder = diff[..., 0]
        diff = np.stack([np.where(np.abs(shoulder) < math.pi, shoulder, wrap_angle(shoulder)), diff[..., 1]], -1)
    return np.abs(diff).max(-1)


class ReacherPixels(gym.Env):
    """Reacher seen from above as uint8 ``(size, size, 3)`` frames; actions float32 ``(2,)`` in [-1, 1].

    ``info`` carries the true state (``qpos``, ``qvel``, ``finger``, ``target``) for evaluation and
    probes; the world model never sees it. With ``hide_target`` the target sphere is invisible, so an
    image shows the arm pose alone (the pose-reaching setting of the evaluation protocol).

    A goal pose, set with ``reset(options={"goal_qpos": q})`` (or ``set_goal(q)`` mid-episode), adds
    ``info["goal_error"]`` (``joint_error`` of the arm to the goal, rad) and ``info["is_success"]``
    (``goal_error < goal_tolerance``, 0.05 rad by default) to every ``info``. Poses (starts, goals) must be
    finite, with the wrist within its range (+-160 deg) give or take ``WRIST_SLACK``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        task: str = "easy",
        size: int = 64,
        hide_target: bool = True,
        camera: str = "fixed",
        seed: int | None = None,
        backend: str = "dm_control",
        render_quality: str = "fast",
        max_steps: int = 1000,
        render_mode: str | None = "rgb_array",
        goal_tolerance: float = GOAL_TOLERANCE,
        action_repeat: int = 1,
    ):
        size = check_integer(size, "size", MIN_SIZE, MAX_SIZE)
        if camera != "fixed":
            raise ValueError(f"camera must be 'fixed' (top-down), got {camera!r}")
        # control steps each action is held for (stable-worldmodel: 2)
        self.action_repeat = check_integer(action_repeat, "action_repeat", 1, MAX_ACTION_REPEAT)
        max_steps = check_integer(max_steps, "max_steps", 1)
        if not (isinstance(goal_tolerance, (int, float, np.floating)) and not isinstance(goal_tolerance, bool)
                and math.isfinite(goal_tolerance) and goal_tolerance > 0):
            raise ValueError(f"goal_tolerance must be a finite number of rad > 0, got {goal_tolerance!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task, self.size, self.backend, self.hide_target = task, int(size), backend, hide_target
        self.render_quality, self.max_steps, self.render_mode = render_quality, int(max_steps), render_mode
        self.physics = make_physics(backend, task)
        if hide_target:
            self.physics.hide_target()
        self.renderer = PixelRenderer(self.physics.model, self.size, self.physics.camera, render_quality)
        self._scratch = mujoco.MjData(self.physics.model)  # goal rendering happens here, not in the episode
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._steps = 0
        self._frame: np.ndarray | None = None
        self.goal_qpos: np.ndarray | None = None
        self.goal_tolerance = float(goal_tolerance)
        if seed is not None:
            self.reset(seed=seed)

    # --- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Random start; ``options`` may give ``qpos`` (and ``qvel``, ``target``) to start from instead,
        and ``goal_qpos``, the pose to reach (see the class docstring; no goal when absent). Anything else
        (another key, a velocity or target without a pose) is a ``ValueError``, never ignored."""
        self._check_open()
        options = _reset_options(options)
        start = None
        if options.get("qpos") is not None:  # checked before anything changes
            start = (self._pose(options["qpos"], "qpos"), _velocity(options.get("qvel")),
                     _optional_pair(options.get("target"), "target"))
        goal = None if options.get("goal_qpos") is None else self._pose(options["goal_qpos"], "goal_qpos")
        super().reset(seed=seed)
        self.physics.reset(self.np_random)
        if start is not None:
            self.physics.set_state(*start)
        self.goal_qpos = goal
        self._steps = 0
        return self._observe(), self.state()

    def set_goal(self, qpos) -> None:
        """Set (or, with None, clear) the goal pose that ``info["goal_error"]`` and ``is_success`` refer to."""
        self.goal_qpos = None if qpos is None else self._pose(qpos, "goal_qpos")

    def step(self, action):
        self._check_open()
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {np.shape(action)}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        for _ in range(self.action_repeat):
            self.physics.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        obs = self._observe()
        return obs, self.physics.reward(), False, self._steps >= self.max_steps, self.state()

    def render(self):
        self._check_open()
        if self.render_mode is None:
            return None
        return self._frame.copy() if self._frame is not None else self._observe()

    def close(self):
        if getattr(self, "renderer", None) is not None:
            self.renderer.close()
            self.physics.close()
            self.renderer = None

    # --- state and goals -------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The true state: ``qpos (2,)``, ``qvel (2,)``, ``finger (2,)``, ``target (2,)``; with a goal pose
        also ``goal_error`` (rad) and ``is_success``."""
        self._check_open()
        info = self.physics.state()
        if self.goal_qpos is not None:
            error = float(joint_error(info["qpos"], self.goal_qpos))
            info["goal_error"], info["is_success"] = error, error < self.goal_tolerance
        return info

    def set_state(self, qpos, qvel=None, target=None) -> np.ndarray:
        """Put the arm at ``qpos`` (at rest unless ``qvel``); returns the new observation."""
        self._check_open()
        self.physics.set_state(self._pose(qpos, "qpos"), _velocity(qvel), _optional_pair(target, "target"))
        return self._observe()

    def render_goal(self, qpos, target=None) -> np.ndarray:
        """The frame the camera would see with the arm at ``qpos``; the episode is left untouched."""
        self._check_open()
        qpos, target = self._pose(qpos, "qpos"), _optional_pair(target, "target")
        p, scratch = self.physics, self._scratch
        scratch.qpos[:] = p.data.qpos  # the target joints of the gymnasium backend, if any
        saved_model_target = p.model.geom_pos[p._target_id].copy()
        try:
            p.set_state(qpos, None, target, scratch)
            return self.renderer.render(scratch)
        finally:
            p.model.geom_pos[p._target_id] = saved_model_target  # dm_control keeps the target in the model

    def _pose(self, qpos, name: str) -> np.ndarray:
        """A finite (shoulder, wrist) pose whose wrist the arm can reach; a clear ValueError otherwise."""
        qpos = _pair(qpos, name)
        check_wrist(qpos[None], self.physics.wrist_range, name)
        return qpos

    def _check_open(self) -> None:
        if getattr(self, "renderer", None) is None:
            raise RuntimeError("this ReacherPixels was closed; make a new one")

    def _observe(self) -> np.ndarray:
        self._frame = self.renderer.render(self.physics.data)
        return self._frame.copy()


def check_wrist(qpos: np.ndarray, wrist_range: tuple[float, float], name: str) -> None:
    """Poses (B, 2) whose wrists the arm can reach (its range give or take ``WRIST_SLACK``); a clear
    ValueError naming the first that it cannot."""
    low, high = wrist_range
    beyond = np.flatnonzero((qpos[:, 1] < low - WRIST_SLACK) | (qpos[:, 1] > high + WRIST_SLACK))
    if beyond.size:
        which = f"{name}[{beyond[0]}]" if len(qpos) > 1 else name
        raise ValueError(f"{which}: wrist angle {qpos[beyond[0], 1]:.4f} rad is beyond the joint limit "
                         f"[{low:.4f}, {high:.4f}] rad (+-{np.degrees(high):.0f} deg, "
                         f"give or take {WRIST_SLACK} rad of soft-limit slack)")


def _pair(x, name: str) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be 2 finite numbers, got {x!r}") from exc
    if x.shape != (2,) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be 2 finite numbers, got {x}")
    return x


def _optional_pair(x, name: str) -> np.ndarray | None:
    return None if x is None else _pair(x, name)


def _velocity(qvel) -> np.ndarray | None:
    """Joint velocities the arm can have (``MAX_QVEL``), or None (at rest)."""
    qvel = _optional_pair(qvel, "qvel")
    if qvel is not None and np.abs(qvel).max() > MAX_QVEL:
        raise ValueError(f"qvel must lie within +-{MAX_QVEL:g} rad/s (MuJoCo would reset a faster arm), got {qvel}")
    return qvel


def _reset_options(options) -> dict:
    """``reset``'s options, checked: a dict of known keys; a start's velocity and target need its pose."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict with keys among {list(RESET_OPTIONS)}, got {options!r}")
    unknown = sorted(set(options) - set(RESET_OPTIONS))
    if unknown:
        raise ValueError(f"unknown reset options {unknown}; known: {list(RESET_OPTIONS)}")
    if options.get("qpos") is None and any(options.get(k) is not None for k in ("qvel", "target")):
        raise ValueError("reset options qvel and target set a start together with qpos: give qpos too")
    return dict(options)


def make_env(name: str, **kwargs) -> ReacherPixels:
    """``ReacherPixels`` by its short name (``reacher-easy``, ``reacher-hard``, ``gym-reacher``)."""
    if name not in ENV_NAMES:
        raise ValueError(f"env must be one of {sorted(ENV_NAMES)}, got {name!r}")
    backend, task = ENV_NAMES[name]
    return ReacherPixels(task=task, backend=backend, **kwargs)
