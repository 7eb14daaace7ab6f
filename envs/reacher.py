"""``ReacherPixels``: MuJoCo Reacher with RGB observations behind the gymnasium ``Env`` API."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from envs.physics import make_physics
from envs.render import PixelRenderer

MIN_SIZE, MAX_SIZE = 32, 256

# The names used on the command line and stored in datasets: name -> (backend, task).
ENV_NAMES = {
    "reacher-easy": ("dm_control", "easy"),
    "reacher-hard": ("dm_control", "hard"),
    "gym-reacher": ("gymnasium", "easy"),
}


class ReacherPixels(gym.Env):
    """Reacher seen from above as uint8 ``(size, size, 3)`` frames; actions float32 ``(2,)`` in [-1, 1].

    ``info`` carries the true state (``qpos``, ``qvel``, ``finger``, ``target``) for evaluation and
    probes; the world model never sees it. With ``hide_target`` the target sphere is invisible, so an
    image shows the arm pose alone (the pose-reaching setting of the evaluation protocol).
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
    ):
        if not (isinstance(size, (int, np.integer)) and MIN_SIZE <= size <= MAX_SIZE):
            raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
        if camera != "fixed":
            raise ValueError(f"camera must be 'fixed' (top-down), got {camera!r}")
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
        if seed is not None:
            self.reset(seed=seed)

    # --- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Random start; ``options`` may give ``qpos`` (and ``qvel``, ``target``) to start from instead."""
        super().reset(seed=seed)
        self.physics.reset(self.np_random)
        if options and options.get("qpos") is not None:
            self.physics.set_state(options["qpos"], options.get("qvel"), options.get("target"))
        self._steps = 0
        return self._observe(), self.state()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {np.shape(action)}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        self.physics.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        obs = self._observe()
        return obs, self.physics.reward(), False, self._steps >= self.max_steps, self.state()

    def render(self):
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
        """The true state: ``qpos (2,)``, ``qvel (2,)``, ``finger (2,)``, ``target (2,)``."""
        return self.physics.state()

    def set_state(self, qpos, qvel=None, target=None) -> np.ndarray:
        """Put the arm at ``qpos`` (at rest unless ``qvel``); returns the new observation."""
        self.physics.set_state(_pair(qpos, "qpos"), None if qvel is None else _pair(qvel, "qvel"),
                               None if target is None else _pair(target, "target"))
        return self._observe()

    def render_goal(self, qpos, target=None) -> np.ndarray:
        """The frame the camera would see with the arm at ``qpos``; the episode is left untouched."""
        p, scratch = self.physics, self._scratch
        scratch.qpos[:] = p.data.qpos  # the target joints of the gymnasium backend, if any
        saved_model_target = p.model.geom_pos[p._target_id].copy()
        try:
            p.set_state(_pair(qpos, "qpos"), None, None if target is None else _pair(target, "target"), scratch)
            return self.renderer.render(scratch)
        finally:
            p.model.geom_pos[p._target_id] = saved_model_target  # dm_control keeps the target in the model

    def _observe(self) -> np.ndarray:
        self._frame = self.renderer.render(self.physics.data)
        return self._frame.copy()


def _pair(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if x.shape != (2,) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be 2 finite numbers, got {x}")
    return x


def make_env(name: str, **kwargs) -> ReacherPixels:
    """``ReacherPixels`` by its short name (``reacher-easy``, ``reacher-hard``, ``gym-reacher``)."""
    if name not in ENV_NAMES:
        raise ValueError(f"env must be one of {sorted(ENV_NAMES)}, got {name!r}")
    backend, task = ENV_NAMES[name]
    return ReacherPixels(task=task, backend=backend, **kwargs)
