"""The true MuJoCo simulator behind the planners' model contract: the ceiling baseline.

Its "latent" is the full physics state vector (time, qpos, qvel) and its rollout is MuJoCo itself,
batched over all candidates in native threads (``mujoco.rollout``). CEM over this model, with the
cost on the wrapped joint angles, is what our planner settings could reach with a perfect model.
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


def joint_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared wrapped joint-angle error at the last step: (B, N, H, D), (B, D) -> (B, N)."""
    err = wrap_angle(z_pred[:, :, -1, QPOS] - z_goal[:, None, QPOS])
    return (err**2).sum(-1)


def joint_sum_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared wrapped joint-angle error summed over all steps: (B, N, H, D), (B, D) -> (B, N)."""
    err = wrap_angle(z_pred[..., QPOS] - z_goal[:, None, None, QPOS])
    return (err**2).sum((-1, -2))


JOINT_COSTS = {"final": joint_cost, "sum": joint_sum_cost}  # the simulator's counterparts of planners.costs


class SimulatorModel:
    """``rollout(z_hist (M, 1, S), None, actions (M, H, 2*frameskip)) -> (M, H, S)`` with real physics."""

    history = 1

    def __init__(self, physics, frameskip: int, action_repeat: int = 1):
        """``frameskip`` env steps per action chunk; each env step holds its action for ``action_repeat``
        control steps (1 for our data, 2 for stable-worldmodel's)."""
        self.physics, self.frameskip, self.action_repeat = physics, frameskip, action_repeat
        self.model = physics.model
        self.action_dim = 2 * frameskip
        self.device = torch.device("cpu")
        self._datas = [mujoco.MjData(self.model) for _ in range(os.cpu_count() or 1)]

    def states(self, datas) -> Tensor:
        """(B, S) state vectors of MuJoCo datas."""
        out = np.empty((len(datas), mujoco.mj_stateSize(self.model, _STATE)))
        for row, d in zip(out, datas):
            mujoco.mj_getState(self.model, d, row, _STATE)
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
