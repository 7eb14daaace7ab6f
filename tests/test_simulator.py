import math

import numpy as np
import torch

from envs import ReacherPixels
from evaluation.simulator import SimulatorModel, joint_cost, wrap_angle


def test_rollout_is_the_env_dynamics():
    for backend in ("dm_control", "gymnasium"):
        env = ReacherPixels(size=32, backend=backend)
        env.reset(seed=1)
        sim = SimulatorModel(env.physics, frameskip=3)
        z0 = sim.states([env.physics.data])  # (1, S)
        actions = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 2, 6)))
        pred = sim.rollout(z0[:, None], None, actions)  # (1, 2, S)
        for chunk in actions[0].numpy().reshape(2, 3, 2):
            for a in chunk:
                env.step(a)
        assert torch.allclose(pred[0, -1, 1:3], torch.from_numpy(env.state()["qpos"]), atol=1e-9), backend
        env.close()


def test_wrap_and_joint_cost():
    assert math.isclose(float(wrap_angle(np.array(math.pi + 0.1))), -math.pi + 0.1, abs_tol=1e-12)
    goal = torch.tensor([[0.0, math.pi - 0.01, 0.0, 0.0, 0.0]], dtype=torch.float64)
    pred = torch.zeros(1, 2, 3, 5, dtype=torch.float64)
    pred[0, 0, -1, 1] = -math.pi + 0.01  # the shoulder turns freely: 0.02 rad away across the wrap
    pred[0, 1, -1, 1] = 0.0
    cost = joint_cost(pred, goal.double())
    assert math.isclose(float(cost[0, 0]), 0.02**2, rel_tol=1e-6) and float(cost[0, 1]) > 9


def test_wrist_error_goes_the_way_the_joint_can_move():
    """Wrist at +2.7 rad, goal -2.7 rad: 0.88 rad apart through +-pi, where the joint stops at +-2.79;
    the only way is 5.4 rad back through 0, which is the error the cost sees."""
    goal = torch.tensor([[0.0, 0.0, -2.7, 0.0]], dtype=torch.float64)
    pred = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    pred[0, 0, 0, 2] = 2.7
    assert math.isclose(float(joint_cost(pred, goal)[0, 0]), 5.4**2, rel_tol=1e-9)


def test_the_pose_only_view_plans_as_if_the_arm_were_at_rest():
    """``sees_velocity=False`` observes the joint angles with zero velocities: its rollout from a moving arm
    is the true rollout from the same pose at rest, which the moving arm's true rollout is not."""
    env = ReacherPixels(size=32)
    env.reset(seed=2)
    for _ in range(5):
        env.step(np.ones(2))  # the arm swings
    sim, blind = SimulatorModel(env.physics, frameskip=3), SimulatorModel(env.physics, frameskip=3, sees_velocity=False)
    true, seen = sim.states([env.physics.data]), blind.states([env.physics.data])
    assert torch.equal(seen[:, 1:3], true[:, 1:3]) and not torch.equal(seen, true) and not seen[:, 3:5].any()
    assert true[:, 3:5].abs().min() > 0.1  # it was moving
    actions = torch.zeros(1, 2, 6, dtype=torch.float64)
    at_rest = blind.rollout(seen[:, None], None, actions)  # (1, 2, S)
    torch.testing.assert_close(at_rest[0, :, 1:3], seen[0, 1:3].expand(2, 2), atol=1e-6, rtol=0)  # nothing moves
    assert (sim.rollout(true[:, None], None, actions)[0, -1, 1:3] - true[0, 1:3]).abs().max() > 0.01
    env.close()
