import numpy as np
import pytest

from envs import ReacherPixels
from envs.policies import make_policy


def test_actions_in_bounds_and_seeded():
    for name in ("random", "smooth", "mixed"):
        a = [make_policy(name, np.random.default_rng(1))[0]() for _ in range(3)]
        b = [make_policy(name, np.random.default_rng(1))[0]() for _ in range(3)]
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        act, _ = make_policy(name, np.random.default_rng(2))
        acts = np.stack([act() for _ in range(500)])
        assert acts.dtype == np.float32 and np.all(np.abs(acts) <= 1)


def test_smooth_is_temporally_correlated():
    act, _ = make_policy("smooth", np.random.default_rng(0))
    a = np.stack([act() for _ in range(2000)])[:, 0]
    assert np.corrcoef(a[:-1], a[1:])[0, 1] > 0.7
    act, _ = make_policy("random", np.random.default_rng(0))
    a = np.stack([act() for _ in range(2000)])[:, 0]
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.1


def test_smooth_moves_the_arm_further_than_random():
    """The reason `smooth` is the default: over 25 steps it carries the joints much further."""
    env = ReacherPixels(size=32)
    moved = {}
    for name in ("random", "smooth"):
        d = []
        for ep in range(6):
            rng = np.random.default_rng(ep)
            _, info = env.reset(seed=ep)
            act, _ = make_policy(name, rng)
            q0 = info["qpos"]
            for _ in range(25):
                _, _, _, _, info = env.step(act())
            d.append(np.abs(info["qpos"] - q0).sum())
        moved[name] = np.mean(d)
    env.close()
    assert moved["smooth"] > 2 * moved["random"], moved


def test_unknown_policy():
    with pytest.raises(ValueError):
        make_policy("nope", np.random.default_rng(0))
