"""Reacher environments with pixel observations, rollout collection and datasets."""

from envs.gl import import_mujoco, select_gl_backend

select_gl_backend()  # before anything imports mujoco
import_mujoco()  # a backend without its library says what to install

import gymnasium as _gym  # noqa: E402

from envs.reacher import ENV_NAMES, ReacherPixels, joint_error, make_env, wrap_angle  # noqa: E402

ENV_ID = "ReacherPixels-v0"
if ENV_ID not in _gym.registry:
    _gym.register(id=ENV_ID, entry_point="envs.reacher:ReacherPixels", disable_env_checker=True)

__all__ = ["ReacherPixels", "make_env", "ENV_NAMES", "ENV_ID", "select_gl_backend", "joint_error", "wrap_angle"]
