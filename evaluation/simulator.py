"""The true MuJoCo simulator behind the planners' model contract: the ceiling baseline.

Its "latent" is the full physics state vector (time, qpos, qvel) and its rollout is MuJoCo itself,
batched over all candidates in native threads (``mujoco.rollout``). CEM over this model, with the
cost on the joint angles (``joint_delta``), is what our planner settings could reach with a perfect model.
"""

from __future__ import annotations

import os

import mujoco
import numpy as np
import torch
from einops import rearrange
from mujoco import rollout as mj_rollout
from torch import Tensor

from envs import wrap_angle

_STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS
QPOS = slice(1, 3)  # the two arm joints in a FULLPHYSICS state vector (after time)
QVEL = slice(3, 5)  # their velocities


def joint_delta(qpos: Tensor, goal: Tensor) -> Tensor:
    """Joint-angle error (..., 2) along the way the arm can move: the shoulder turns freely, so its error
    is wrapped to [-pi, pi); the wrist stops at +-160 degrees, so its error is NOT wrapped (a wrapped
    wrist error points through the joint limit for a fifth of uniform goals, and CEM then presses the
    arm against the limit: 7 of the 8 such episodes failed in our diagnosis, every other one succeeded)."""
    d = qpos - goal
    return torch.stack([wrap_angle(d[..., 0]), d[..., 1]], -1)


def joint_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared joint-angle error at the last step: (B, N, H, D), (B, D) -> (B, N)."""
    return joint_delta(z_pred[:, :, -1, QPOS], z_goal[:, None, QPOS]).square().sum(-1)


def joint_sum_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared joint-angle error summed over all steps: (B, N, H, D), (B, D) -> (B, N)."""
    return joint_delta(z_pred[..., QPOS], z_goal[:, None, None, QPOS]).square().sum((-1, -2))


JOINT_COSTS = {"final": joint_cost, "sum": joint_sum_cost}  # the simulator's counterparts of planners.costs


class SimulatorModel:
    """``rollout(z_hist (M, 1, S), None, actions (M, H, 2*frameskip)) -> (M, H, S)`` with real physics."""

    history = 1

    def __init__(self, physics, frameskip: int, action_repeat: int = 1, sees_velocity: bool = True):
        """``frameskip`` env steps per action chunk; each env step holds its action for ``action_repeat``
        control steps (1 for our data, 2 for stable-worldmodel's). ``sees_velocity=False``: the states it
        observes hold the joint angles with the velocities set to zero, as one frame shows the pose and not
        its motion: a perfect model of what a planner conditioned on one frame can know."""
        self.physics, self.frameskip, self.action_repeat = physics, frameskip, action_repeat
        self.sees_velocity = sees_velocity
        self.model = physics.model
        self.action_dim = 2 * frameskip
        self.device = torch.device("cpu")
        self._datas = [mujoco.MjData(self.model) for _ in range(os.cpu_count() or 1)]

    def states(self, datas) -> Tensor:
        """(B, S) state vectors of MuJoCo datas, as this model observes them."""
        out = np.empty((len(datas), mujoco.mj_stateSize(self.model, _STATE)))
        for row, d in zip(out, datas):
            mujoco.mj_getState(self.model, d, row, _STATE)
        if not self.sees_velocity:
            out[:, QVEL] = 0.0
        return torch.from_numpy(out)

    def goal_states(self, qpos: np.ndarray) -> Tensor:
        """(B, S) state vectors with the goal joint angles (the rest is ignored by ``joint_cost``)."""
        z = torch.zeros(len(qpos), mujoco.mj_stateSize(self.model, _STATE), dtype=torch.float64)
        z[:, QPOS] = torch.as_tensor(np.asarray(qpos), dtype=torch.float64)
        return z

    def rollout(self, z_hist: Tensor, a_hist: Tensor | None, actions: Tensor) -> Tensor:
        init = z_hist[:, -1].double().numpy()  # (M, S)
        sub = self.physics.n_substeps * self.action_repeat  # physics steps per env step
        control = rearrange(actions.double().clamp(-1, 1).numpy(), "m h (k a) -> m (h k) a", k=self.frameskip)
        control = np.ascontiguousarray(np.repeat(control, sub, axis=1))  # (M, H*frameskip*sub, 2)
        states, _ = mj_rollout.rollout(self.model, self._datas, init, control, persistent_pool=True)
        stride = self.frameskip * sub
        return torch.from_numpy(states[:, stride - 1::stride])  # (M, H, S): the state at each chunk's end
