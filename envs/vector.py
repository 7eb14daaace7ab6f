"""``ReacherBatch``: B Reacher states stepped in lock-step and rendered by ONE renderer.

Evaluation plans for many episodes at once; this keeps their simulation in one process with one GL
context instead of B environments with B contexts. Each state is a MuJoCo ``MjData`` of the same model.
"""

from __future__ import annotations

import mujoco
import numpy as np

from envs.reacher import make_env


class ReacherBatch:
    def __init__(self, env: str, n: int, size: int = 64, hide_target: bool = True, render_quality: str = "fast"):
        self.env = make_env(env, size=size, hide_target=hide_target, render_quality=render_quality)
        self.physics = self.env.physics
        self.datas = [mujoco.MjData(self.physics.model) for _ in range(n)]
        self._targets = [None] * n

    def __len__(self) -> int:
        return len(self.datas)

    def reset_to(self, qpos: np.ndarray, qvel: np.ndarray | None = None, target: np.ndarray | None = None) -> np.ndarray:
        """Put state i at ``qpos[i]`` (B, 2) with ``qvel[i]`` (zero if None); returns frames (B, H, W, 3)."""
        for i, d in enumerate(self.datas):
            mujoco.mj_resetData(self.physics.model, d)
            self._targets[i] = None if target is None else np.asarray(target[i], np.float64)
            self.physics.set_state(qpos[i], None if qvel is None else qvel[i], self._targets[i], d)
        return self.render()

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Apply ``actions`` (B, 2) (clipped to [-1, 1]); returns frames (B, H, W, 3)."""
        actions = np.asarray(actions, np.float64)
        if actions.shape != (len(self), 2) or not np.all(np.isfinite(actions)):
            raise ValueError(f"actions must be finite with shape {(len(self), 2)}, got {actions.shape}")
        for d, a in zip(self.datas, np.clip(actions, -1.0, 1.0)):
            self.physics.step(a, d)
        return self.render()

    def render(self) -> np.ndarray:
        frames = []
        for d, target in zip(self.datas, self._targets):
            if target is not None:  # dm_control keeps the target in the model: set it for this state
                self.physics._set_target(target, d)
                mujoco.mj_kinematics(self.physics.model, d)
            frames.append(self.env.renderer.render(d))
        return np.stack(frames)

    def states(self) -> dict[str, np.ndarray]:
        """True states, each (B, 2)."""
        per = [self.physics.state(d) for d in self.datas]
        return {k: np.stack([s[k] for s in per]) for k in per[0]}

    def render_goals(self, qpos: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
        """Goal images (B, H, W, 3) of poses ``qpos`` (B, 2); no state is disturbed."""
        return np.stack([self.env.render_goal(q, None if target is None else target[i]) for i, q in enumerate(qpos)])

    def close(self) -> None:
        self.env.close()
