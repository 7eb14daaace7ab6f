"""``ReacherBatch``: B Reacher states stepped in lock-step and rendered by ONE renderer.

Evaluation plans for many episodes at once; this keeps their simulation in one process with one GL
context instead of B environments with B contexts. Each state is a MuJoCo ``MjData`` of the same model.

To evaluate a model trained on data of another making: ``action_repeat`` applies each action for that
many control steps (stable-worldmodel's dm_control Reacher uses 2, the dataset attribute
``action_repeat`` says which), and ``image_size`` renders at ``size`` then area-resizes to
``image_size``, exactly as ``EpisodeStore(..., image_size=)`` resized the training frames.
"""

from __future__ import annotations

import mujoco
import numpy as np

from common.config import check_integer
from envs.reacher import MAX_ACTION_REPEAT, check_wrist, make_env
from envs.storage import check_image_size


class ReacherBatch:
    def __init__(self, env: str, n: int, size: int = 64, hide_target: bool = True, render_quality: str = "fast",
                 action_repeat: int = 1, image_size: int | None = None):
        # bounded as `wm collect` bounds the repeat and dataset files their frame sizes, before anything is made
        self.action_repeat = check_integer(action_repeat, "action_repeat", 1, MAX_ACTION_REPEAT)
        self.image_size = None if image_size is None else check_image_size(image_size)
        if isinstance(n, bool) or not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"a batch holds n >= 1 states, got {n!r}")
        self.env = make_env(env, size=size, hide_target=hide_target, render_quality=render_quality)
        self.physics = self.env.physics
        self.datas = [mujoco.MjData(self.physics.model) for _ in range(n)]
        self._own_target = self._model_target()
        self._targets = [self._own_target] * n

    def __len__(self) -> int:
        return len(self.datas)

    def reset_to(self, qpos: np.ndarray, qvel: np.ndarray | None = None, target: np.ndarray | None = None,
                 render: bool = True) -> np.ndarray | None:
        """Put state i at ``qpos[i]`` (B, 2) with ``qvel[i]`` (zero if None); returns frames (B, H, W, 3)
        (None with ``render=False``: rendering is most of the cost, and a baseline never looks).

        A NaN ``target[i]`` (a dataset without target positions), or no ``target``, keeps the model's own
        target (the one it held when the batch was made, whichever another row or reset set since); NaN in
        ``qpos``/``qvel`` (a dataset without them) is an error, and so are a wrist beyond its joint limit (as
        ``ReacherPixels`` refuses it) and a speed beyond the arm's (its physics' ``max_speed``)."""
        self._check_open()
        for name, value in (("qpos", qpos), ("qvel", qvel), ("target", target)):
            if value is not None and np.shape(value) != (len(self), 2):
                raise ValueError(f"reset_to: {name} must be ({len(self)}, 2), one row per state, got "
                                 f"{np.shape(value)}")
            if name != "target" and value is not None and not np.all(np.isfinite(value)):
                raise ValueError(f"reset_to: {name} holds NaN or inf values (does the dataset lack {name}?)")
        check_wrist(np.asarray(qpos, np.float64), self.physics.wrist_range, "reset_to: qpos")
        fastest = self.physics.max_speed
        if qvel is not None and np.abs(qvel).max(initial=0.0) > fastest:
            raise ValueError(f"reset_to: qvel reaches {np.abs(qvel).max():.3g} rad/s, beyond {fastest:g} rad/s: not "
                             f"a state of this arm (are qpos and qvel swapped, or in other units?)")
        for i, d in enumerate(self.datas):
            mujoco.mj_resetData(self.physics.model, d)
            self._targets[i] = self._target_or_own(None if target is None else target[i])
            self.physics.set_state(qpos[i], None if qvel is None else qvel[i], self._targets[i], d)
        return self.render() if render else None

    def step(self, actions: np.ndarray, render: bool = True, control_qpos: list | None = None) -> np.ndarray | None:
        """Apply ``actions`` (B, 2) (clipped to [-1, 1]) for ``action_repeat`` control steps each; returns
        frames (B, H, W, 3), or None with ``render=False`` (call ``render()`` when frames are needed).
        ``control_qpos``, when given, receives the joint angles (B, 2) after every control step."""
        self._check_open()
        actions = np.asarray(actions, np.float64)
        if actions.shape != (len(self), 2) or not np.all(np.isfinite(actions)):
            raise ValueError(f"actions must be finite with shape {(len(self), 2)}, got {actions.shape}")
        actions = np.clip(actions, -1.0, 1.0)
        for _ in range(self.action_repeat):
            for d, a in zip(self.datas, actions):
                self.physics.step(a, d, forward=False)  # positions for rendering are brought up to date on demand
            if control_qpos is not None:
                control_qpos.append(self.qpos())
        return self.render() if render else None

    def _model_target(self) -> np.ndarray:
        """The target a state has before one is set: the model's own, as the batch was made. dm_control keeps
        the target in the model, where each state's own is put in turn: read later it is the last one set."""
        data = mujoco.MjData(self.physics.model)
        mujoco.mj_kinematics(self.physics.model, data)
        return self.physics.state(data)["target"]

    def _target_or_own(self, target) -> np.ndarray:
        """A target position, or the model's own for a dataset that has none (None or NaN)."""
        if target is None or not np.all(np.isfinite(target)):
            return self._own_target
        return np.asarray(target, np.float64)

    def _each_state(self):
        """Every state's data, its own target in place (dm_control keeps the target in the model, shared by the
        states) and its positions up to date (``step`` leaves them behind): what frames and states read. The
        kinematics run here, once per state each time they are read, after its target is in place."""
        self._check_open()
        for d, target in zip(self.datas, self._targets):
            self.physics._set_target(target, d)
            mujoco.mj_kinematics(self.physics.model, d)
            yield d

    def _check_open(self) -> None:
        if self.datas is None:
            raise RuntimeError("this ReacherBatch was closed; make a new one")

    def render(self) -> np.ndarray:
        return self._resize(np.stack([self.env.renderer.render(d) for d in self._each_state()]))

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        if self.image_size is None:
            return frames
        from envs.dataset import resize_frames

        return resize_frames(frames, self.image_size)

    def qpos(self) -> np.ndarray:
        """Joint angles (B, 2): what the success rule reads, without building the full state."""
        self._check_open()
        return np.stack([d.qpos[:2] for d in self.datas])

    def qvel(self) -> np.ndarray:
        """Joint velocities (B, 2)."""
        self._check_open()
        return np.stack([d.qvel[:2] for d in self.datas])

    def states(self) -> dict[str, np.ndarray]:
        """True states, each (B, 2)."""
        per = [self.physics.state(d) for d in self._each_state()]
        return {k: np.stack([s[k] for s in per]) for k in per[0]}

    def render_goals(self, qpos: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
        """Goal images (B, H, W, 3) of poses ``qpos`` (B, 2); no state is disturbed."""
        targets = [self._target_or_own(None if target is None else target[i]) for i in range(len(qpos))]
        return self._resize(np.stack([self.env.render_goal(q, t) for q, t in zip(qpos, targets)]))

    def close(self) -> None:
        self.env.close()
        self.datas = None
