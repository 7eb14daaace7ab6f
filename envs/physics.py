"""Reacher physics behind one small interface, for two backends: dm_control and gymnasium.

Both are planar two-joint arms: ``qpos[:2]`` are the shoulder and wrist angles. They differ in where the
target lives (a geom position in the model for dm_control, two slide joints for gymnasium), in timestep
and actuator gains, and in the camera (dm_control has a top-down ``fixed`` camera; gymnasium's model has
none, so we look straight down with a free camera).
"""

from __future__ import annotations

import math

import mujoco
import numpy as np

BACKENDS = ("dm_control", "gymnasium")
TASKS = ("easy", "hard")


class ReacherPhysics:
    """The state, stepping and reset shared by both backends; subclasses say where the target lives."""

    model: mujoco.MjModel
    data: mujoco.MjData
    finger_geom: str
    target_geom: str
    n_substeps: int
    max_speed: float  # rad/s: no state of the arm moves faster (a start beyond it is refused as not a state)

    def _finish_init(self) -> None:
        self._finger_id = self.model.geom(self.finger_geom).id
        self._target_id = self.model.geom(self.target_geom).id
        self.wrist_range = tuple(float(x) for x in self.model.jnt_range[1])
        self.target_radius = float(self.model.geom_size[self._target_id, 0])
        self.finger_radius = float(self.model.geom_size[self._finger_id, 0])

    # --- state ---------------------------------------------------------------------------------
    def state(self, data: mujoco.MjData | None = None) -> dict[str, np.ndarray]:
        """The true state: ``qpos (2,)``, ``qvel (2,)``, ``finger (2,)``, ``target (2,)``."""
        d = self.data if data is None else data
        return {"qpos": d.qpos[:2].copy(), "qvel": d.qvel[:2].copy(),
                "finger": d.geom_xpos[self._finger_id, :2].copy(), "target": d.geom_xpos[self._target_id, :2].copy()}

    def qpos(self) -> np.ndarray:
        return self.data.qpos[:2].copy()

    def finger(self) -> np.ndarray:
        return self.data.geom_xpos[self._finger_id, :2].copy()

    def target(self) -> np.ndarray:
        return self.data.geom_xpos[self._target_id, :2].copy()

    def fingertips(self, qpos: np.ndarray) -> np.ndarray:
        """Fingertip xy of arm poses by forward kinematics: (N, 2) joint angles -> (N, 2); the episode's
        state is untouched. Datasets that store only joint angles get their ``finger`` from this."""
        qpos = np.asarray(qpos, dtype=np.float64).reshape(-1, 2)
        data = mujoco.MjData(self.model)
        out = np.empty_like(qpos)
        for k, q in enumerate(qpos):
            data.qpos[:2] = q
            mujoco.mj_kinematics(self.model, data)
            out[k] = data.geom_xpos[self._finger_id, :2]
        return out

    def set_state(self, qpos, qvel=None, target=None, data: mujoco.MjData | None = None) -> None:
        """Put the arm (in ``data``, the episode's by default) at ``qpos`` with ``qvel`` (zero if None)."""
        data = self.data if data is None else data
        data.qpos[:2] = qpos
        data.qvel[:2] = 0.0 if qvel is None else qvel
        if target is not None:
            self._set_target(np.asarray(target, dtype=np.float64), data)
        mujoco.mj_forward(self.model, data)

    def _set_target(self, target: np.ndarray, data: mujoco.MjData) -> None:
        raise NotImplementedError

    # --- dynamics ------------------------------------------------------------------------------
    def step(self, action: np.ndarray, data: mujoco.MjData | None = None, forward: bool = True) -> None:
        """One control step. mj_step leaves positions-derived fields (geom_xpos, what we render and where the
        fingertip is) one step behind; ``forward`` brings them up to date (``False`` when nothing reads them
        before the next step: the dynamics are the same bit for bit)."""
        data = self.data if data is None else data
        data.ctrl[:] = action
        mujoco.mj_step(self.model, data, nstep=self.n_substeps)
        if forward:
            mujoco.mj_forward(self.model, data)

    def reset(self, rng: np.random.Generator) -> None:
        """Joints uniform over their range (the shoulder is unlimited), at rest; a fresh target."""
        mujoco.mj_resetData(self.model, self.data)
        qpos = np.array([rng.uniform(-math.pi, math.pi), rng.uniform(*self.wrist_range)])
        self.set_state(qpos, target=self._sample_target(rng))

    def _sample_target(self, rng: np.random.Generator) -> np.ndarray:
        angle, radius = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.20)  # dm_control's distribution
        return np.array([radius * math.sin(angle), radius * math.cos(angle)])

    def reward(self) -> float:
        """1 when the fingertip touches the target, else 0 (dm_control's sparse reacher reward)."""
        dist = float(np.linalg.norm(self.finger() - self.target()))
        return float(dist <= self.target_radius + self.finger_radius)

    def hide_target(self) -> None:
        self.model.geom_rgba[self._target_id, 3] = 0.0

    def close(self) -> None:
        pass


class DmControlReacher(ReacherPhysics):
    """dm_control's ``reacher`` (easy: target radius 0.05, hard: 0.015)."""

    finger_geom, target_geom = "finger", "target"
    # rad/s: no state of this arm moves faster (its motors, against its damping, stay under about 10; the
    # recorded data peaks near 7): a start beyond it is data in other units, or qpos and qvel swapped
    max_speed = 50.0

    def __init__(self, task: str = "easy"):
        from dm_control import suite

        # a fixed seed: the reset below also places the target, which stays the model's own (the one a dataset
        # without targets is evaluated with), so it must be the same in every process
        self._env = suite.load("reacher", task, task_kwargs={"random": 0})
        self._env.reset()  # applies the task's target size to the model
        physics = self._env.physics
        self._physics = physics
        self.model, self.data = physics.model.ptr, physics.data.ptr
        self.n_substeps = int(round(self._env.control_timestep() / self.model.opt.timestep))
        self.camera = "fixed"
        self._finish_init()

    def _set_target(self, target: np.ndarray, data: mujoco.MjData) -> None:
        # The target is a geom of the world body: its position is part of the model, not of the state.
        self.model.geom_pos[self._target_id, :2] = target

    def close(self) -> None:
        self._physics.free()


class GymnasiumReacher(ReacherPhysics):
    """gymnasium's ``Reacher-v5``, stepped as it steps itself (frame_skip 2), seen from straight above."""

    finger_geom, target_geom = "fingertip", "target"
    max_speed = 500.0  # rad/s: the lighter arm's collected data reaches about 140 (mixed exploration)

    def __init__(self, task: str = "easy"):
        import gymnasium

        # gymnasium has one reacher; `task` is accepted for a uniform signature and must be "easy".
        if task != "easy":
            raise ValueError("the gymnasium backend has one task, 'easy'")
        self._env = gymnasium.make("Reacher-v5").unwrapped
        self.model, self.data = self._env.model, self._env.data
        self.n_substeps = int(self._env.frame_skip)
        camera = mujoco.MjvCamera()
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        camera.lookat[:] = (0.0, 0.0, 0.0)
        camera.distance, camera.azimuth, camera.elevation = 0.75, 90.0, -90.0
        self.camera = camera
        self._finish_init()

    def _set_target(self, target: np.ndarray, data: mujoco.MjData) -> None:
        data.qpos[2:4] = target
        data.qvel[2:4] = 0.0

    def _sample_target(self, rng: np.random.Generator) -> np.ndarray:
        while True:  # gymnasium's own distribution: uniform in the disc of radius 0.2
            target = rng.uniform(-0.2, 0.2, size=2)
            if np.linalg.norm(target) < 0.2:
                return target

    def close(self) -> None:
        self._env.close()


def make_physics(backend: str, task: str) -> ReacherPhysics:
    if backend == "dm_control":
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return DmControlReacher(task)
    if backend == "gymnasium":
        return GymnasiumReacher(task)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
