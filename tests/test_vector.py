import numpy as np
import pytest

import envs.reacher
from envs import ReacherPixels
from envs.vector import ReacherBatch


def test_batch_matches_single_environments():
    batch = ReacherBatch("reacher-easy", 3, size=32)
    qpos = np.array([[0.1, 0.2], [1.0, -1.0], [-2.0, 0.5]])
    qvel = np.array([[0.0, 0.0], [1.0, 0.5], [-0.5, 0.0]])
    frames = batch.reset_to(qpos, qvel)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (5, 3, 2))
    for a in actions:
        frames = batch.step(a)
    env = ReacherPixels(size=32)
    for i in range(3):
        env.reset(seed=0, options={"qpos": qpos[i], "qvel": qvel[i]})
        for a in actions:
            obs, _, _, _, info = env.step(a[i])
        assert np.array_equal(obs, frames[i])
        assert np.allclose(info["qpos"], batch.states()["qpos"][i])
    goals = batch.render_goals(qpos)
    assert np.array_equal(goals[1], env.render_goal(qpos[1]))
    env.close()
    batch.close()


def test_the_fastest_start_allowed_is_the_arms():
    """gymnasium's lighter arm moves near 140 rad/s in collected data; dm_control's stays under 10."""
    qpos = np.zeros((1, 2))
    gym_batch = ReacherBatch("gym-reacher", 1, size=32)
    gym_batch.reset_to(qpos, np.array([[138.0, -20.0]]), render=False)  # a start its data holds
    for batch, speed in ((gym_batch, 600.0), (ReacherBatch("reacher-easy", 1, size=32), 60.0)):
        with pytest.raises(ValueError, match=rf"qvel reaches {speed:g} rad/s, beyond {batch.physics.max_speed:g}"):
            batch.reset_to(qpos, np.array([[speed, 0.0]]), render=False)
        batch.close()


def test_bad_batches_are_clear_errors():
    with pytest.raises(ValueError, match="n >= 1 states, got 0"):
        ReacherBatch("reacher-easy", 0, size=32)
    batch = ReacherBatch("reacher-easy", 2, size=32)
    for qpos, qvel in ((np.zeros((3, 2)), None), (np.zeros((2, 2)), np.zeros(2))):
        with pytest.raises(ValueError, match=r"must be \(2, 2\), one row per state"):
            batch.reset_to(qpos, qvel, render=False)
    # a wrist beyond its joint limit (and its soft slack) is refused as ReacherPixels refuses it, naming the row
    low, high = batch.physics.wrist_range
    beyond = high + envs.reacher.WRIST_SLACK + 0.01
    with pytest.raises(ValueError, match=r"qpos\[1\]: wrist angle .* beyond the joint limit"):
        batch.reset_to(np.array([[0.0, high + 0.15], [0.0, -beyond]]), render=False)
    batch.reset_to(np.array([[0.0, high + 0.15], [0.0, low - 0.15]]), render=False)  # within the soft limit
    with pytest.raises(ValueError, match=r"target must be \(2, 2\), one row per state"):  # not broadcast
        batch.reset_to(np.zeros((2, 2)), None, np.array([0.1, -0.1]), render=False)
    batch.close()
    for use in (lambda: batch.step(np.zeros((2, 2)), render=False), batch.render, batch.qpos, batch.states,
                lambda: batch.reset_to(np.zeros((2, 2)), render=False)):
        with pytest.raises(RuntimeError, match="this ReacherBatch was closed"):
            use()


@pytest.mark.parametrize("setting, value", [("action_repeat", 0), ("action_repeat", -1), ("action_repeat", 1000),
                                            ("action_repeat", True), ("image_size", 0), ("image_size", -32),
                                            ("image_size", True), ("image_size", 48.0), ("image_size", 10**6)])
def test_absurd_batch_arguments_are_refused_naming_them(setting, value):
    """Bounded as `wm collect` and the dataset files bound them, before any environment is made."""
    with pytest.raises(ValueError, match=rf"{setting} must be an integer in \[\d+, \d+\], got {value!r}$"):
        ReacherBatch("reacher-easy", 2, size=32, **{setting: value})
    with pytest.raises(ValueError, match="n >= 1 states, got True"):
        ReacherBatch("reacher-easy", True, size=32)


def test_states_report_each_states_own_target_without_a_render():
    """dm_control keeps the target in its model, shared by the batch's states: each state's own is put in place
    for its positions whether frames are rendered or not."""
    batch = ReacherBatch("reacher-easy", 2, size=32, hide_target=False)
    targets = np.array([[0.1, 0.1], [0.0, -0.15]])
    batch.reset_to(np.zeros((2, 2)), None, targets, render=False)
    batch.step(np.zeros((2, 2)), render=False)
    assert np.allclose(batch.states()["target"], targets)
    batch.close()


@pytest.mark.parametrize("env", ["reacher-easy", "gym-reacher"])
def test_the_models_own_target_is_the_same_in_every_batch(env):
    """A dataset without targets is evaluated with the model's own target: it must be the same target in every
    batch and process, or the same episodes would look different from one evaluation to the next."""
    zeros, nan = np.zeros((1, 2)), np.full((1, 2), np.nan)
    frames = []
    for _ in range(2):
        batch = ReacherBatch(env, 1, size=32, hide_target=False)
        frames.append(batch.reset_to(zeros, None, nan))
        batch.close()
    assert np.array_equal(frames[0], frames[1])


@pytest.mark.parametrize("env", ["reacher-easy", "gym-reacher"])
def test_a_nan_target_keeps_the_models_own_not_the_last_one_set(env):
    """A NaN target row (a dataset without targets) keeps the model's own target, as ``reset_to`` says: not the
    one another row, or an earlier reset, put in dm_control's model (which its states share)."""
    batch = ReacherBatch(env, 2, size=32, hide_target=False)
    zeros, nan = np.zeros((2, 2)), np.full(2, np.nan)
    own_frames = batch.reset_to(zeros, None, np.stack([nan, nan]))
    own = batch.states()["target"]
    assert np.allclose(own[0], own[1]) and not np.allclose(own[1], [0.1, 0.1])
    frames = batch.reset_to(zeros, None, np.array([[0.1, 0.1], nan]))
    assert np.allclose(batch.states()["target"], [[0.1, 0.1], own[1]])
    assert np.array_equal(frames[1], own_frames[1]) and not np.array_equal(frames[0], own_frames[0])
    batch.reset_to(zeros, render=False)  # no targets at all: each state has the model's own
    assert np.allclose(batch.states()["target"], own)
    assert np.array_equal(batch.render_goals(zeros, np.stack([nan, nan]))[1], own_frames[1])
    batch.close()


@pytest.mark.parametrize("env", ["reacher-easy", "gym-reacher"])
def test_stepped_states_with_their_own_targets_match_single_environments(env):
    """Each stepped state's positions are brought up to date with its own target in place, whether frames or
    states are read first: every frame and state equals a single environment's, bit for bit."""
    qpos = np.array([[0.1, 0.2], [1.0, -1.0], [-2.0, 0.5]])
    targets = np.array([[0.1, 0.1], [-0.05, 0.12], [0.0, -0.15]])
    actions = np.random.default_rng(1).uniform(-1, 1, (4, 3, 2))
    batch = ReacherBatch(env, 3, size=32, hide_target=False, action_repeat=2)
    batch.reset_to(qpos, None, targets, render=False)
    frames, states = [], []
    for a in actions:
        batch.step(a, render=False)
        states.append(batch.states())  # read before a render, then after one: the same
        frames.append(batch.render())
        assert all(np.array_equal(v, batch.states()[k]) for k, v in states[-1].items())
    batch.close()
    single = envs.reacher.make_env(env, size=32, hide_target=False, action_repeat=2)
    for i in range(3):
        single.reset(options={"qpos": qpos[i], "target": targets[i]})
        for t, a in enumerate(actions):
            obs, _, _, _, info = single.step(a[i])
            assert np.array_equal(obs, frames[t][i])
            for k in ("qpos", "qvel", "finger", "target"):
                assert np.array_equal(info[k], states[t][k][i]), (k, t, i)
    single.close()
