import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import ReacherPixels

BACKENDS = ["dm_control", "gymnasium"]


@pytest.fixture(params=BACKENDS)
def env(request):
    e = ReacherPixels(backend=request.param, size=48)
    yield e
    e.close()


def test_check_env_and_registration():
    for backend in BACKENDS:
        e = gym.make(envs.ENV_ID, backend=backend, size=32)
        check_env(e.unwrapped)
        e.close()


def test_spaces_and_info(env):
    obs, info = env.reset(seed=0)
    assert obs.shape == (48, 48, 3) and obs.dtype == np.uint8
    assert env.action_space.shape == (2,) and env.action_space.dtype == np.float32
    assert set(info) == {"qpos", "qvel", "finger", "target"}
    assert all(v.shape == (2,) for v in info.values())
    obs, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert obs.shape == (48, 48, 3) and isinstance(reward, float) and not terminated and not truncated


@pytest.mark.parametrize("size", [32, 64, 224])
def test_sizes(size):
    e = ReacherPixels(size=size)
    assert e.reset(seed=1)[0].shape == (size, size, 3)
    e.close()


@pytest.mark.parametrize("size", [16, 300, 64.5])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        ReacherPixels(size=size)


@pytest.mark.parametrize("setting, value", [("max_steps", 0), ("max_steps", -1), ("max_steps", 2.5),
                                            ("goal_tolerance", -1.0), ("goal_tolerance", float("nan")),
                                            ("goal_tolerance", 0)])
def test_bad_episode_settings_are_refused(setting, value):
    with pytest.raises(ValueError, match=setting):
        ReacherPixels(size=32, **{setting: value})


@pytest.mark.parametrize("setting, value", [("action_repeat", 0), ("action_repeat", -2), ("action_repeat", 1000),
                                            ("action_repeat", True), ("max_steps", True), ("size", True),
                                            ("size", 0), ("size", -64), ("goal_tolerance", True)])
def test_absurd_constructor_arguments_are_refused_naming_them(setting, value):
    """A bool is no count (True would quietly mean 1), and a repeat or size is bounded as `wm collect` bounds it."""
    with pytest.raises(ValueError, match=rf"{setting} must be .*got {value!r}$"):
        ReacherPixels(**{"size": 32, setting: value})


def _trajectory(env, seed, n=15):
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    frames, states = [obs], [info["qpos"]]
    for _ in range(n):
        obs, _, _, _, info = env.step(rng.uniform(-1, 1, 2))
        frames.append(obs)
        states.append(info["qpos"])
    return np.stack(frames), np.stack(states)


def test_determinism_by_seed(env):
    f1, s1 = _trajectory(env, seed=3)
    f2, s2 = _trajectory(env, seed=3)
    f3, _ = _trajectory(env, seed=4)
    assert np.array_equal(f1, f2) and np.array_equal(s1, s2)
    assert not np.array_equal(f1, f3)


def test_goal_image_equals_frame_at_that_pose(env):
    _, info = env.reset(seed=0)
    for _ in range(10):
        obs, _, _, _, info = env.step(np.array([0.8, -0.5]))
    assert np.array_equal(env.render_goal(info["qpos"]), obs)
    goal = env.render_goal([0.3, -1.2])
    assert np.array_equal(env.set_state([0.3, -1.2]), goal)


def test_render_goal_does_not_disturb_the_episode(env):
    env.reset(seed=5)
    env.step(np.array([1.0, 1.0]))
    before = env.state()
    env.render_goal([2.0, 1.0], target=[0.1, 0.1])
    assert all(np.array_equal(before[k], v) for k, v in env.state().items())
    after_goal = env.step(np.array([0.5, -0.5]))[0]
    env.reset(seed=5)
    env.step(np.array([1.0, 1.0]))
    assert np.array_equal(env.step(np.array([0.5, -0.5]))[0], after_goal)


def test_actions_clipped_and_nan_rejected(env):
    env.reset(seed=2)
    big = env.step(np.array([5.0, -7.0]))[0]
    env.reset(seed=2)
    assert np.array_equal(env.step(np.array([1.0, -1.0]))[0], big)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_hidden_target_is_invisible():
    hidden, shown = ReacherPixels(size=48, hide_target=True), ReacherPixels(size=48, hide_target=False)
    for e in (hidden, shown):
        e.reset(seed=0)
    q = [0.5, 0.5]
    assert np.array_equal(hidden.render_goal(q, target=[0.1, 0.1]), hidden.render_goal(q, target=[-0.1, -0.1]))
    assert not np.array_equal(shown.render_goal(q, target=[0.1, 0.1]), shown.render_goal(q, target=[-0.1, -0.1]))
    hidden.close(), shown.close()


def test_reset_options_start_state(env):
    _, info = env.reset(seed=0, options={"qpos": [0.25, -0.75]})
    assert np.allclose(info["qpos"], [0.25, -0.75]) and np.allclose(info["qvel"], 0)


def test_make_env_names():
    with pytest.raises(ValueError, match="env must be one of"):
        envs.make_env("cartpole")
    e = envs.make_env("reacher-hard", size=32)
    assert e.physics.target_radius < 0.05
    e.close()


def test_clean_exit_without_close(tmp_path):
    """An env left open at exit must not print EGL errors."""
    import subprocess
    import sys
    code = "import envs; e = envs.ReacherPixels(size=32); e.reset(seed=0); e.step([0.1, 0.1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_renders_when_mujoco_was_imported_first():
    """`import mujoco` before `import envs` (MUJOCO_GL unset) must still render headless."""
    import os
    import subprocess
    import sys
    code = "import mujoco, envs; e = envs.ReacherPixels(size=32); print(e.reset(seed=0)[0].shape); e.close()"
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "(32, 32, 3)" in out.stdout, out.stderr


def test_a_backend_without_its_library_fails_at_import_with_the_install_hint(monkeypatch):
    """`MUJOCO_GL=osmesa` without libOSMesa fails inside `import mujoco` (PyOpenGL finds no GL): the error
    names the packages to install, as a renderer that fails to start does; with the library present, a
    failing import is left as it is (not blamed on a missing library)."""
    import sys

    from envs import gl

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setitem(sys.modules, "mujoco", None)  # the next `import mujoco` fails
    monkeypatch.setattr(gl, "_available", lambda backend: False)
    with pytest.raises(RuntimeError, match=r"MUJOCO_GL=osmesa \(ModuleNotFoundError.*MUJOCO_GL=osmesa needs `apt-get "
                                           r"install libosmesa6`"):
        gl.import_mujoco()
    monkeypatch.setattr(gl, "_available", lambda backend: True)
    with pytest.raises(ImportError):
        gl.import_mujoco()


@pytest.mark.skipif(envs.gl._available("osmesa"), reason="libOSMesa is installed here")
def test_osmesa_asked_for_without_the_library_says_what_to_install():
    """The same, for real, in a fresh interpreter on a machine without libOSMesa."""
    import os
    import subprocess
    import sys
    # as a user sets it (PyOpenGL's platform is left to MuJoCo: this process set it for EGL)
    env = {**{k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}, "MUJOCO_GL": "osmesa"}
    out = subprocess.run([sys.executable, "-c", "import envs"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0 and "MUJOCO_GL=osmesa needs `apt-get install libosmesa6`" in out.stderr, out.stderr


def test_closing_or_dropping_one_env_leaves_anothers_frames_as_they_were():
    """MuJoCo frees a renderer's GL objects in whichever GL context is current: closing (or garbage-collecting)
    one env while another's was current used to spoil every later frame of the other."""
    import gc

    survivor = ReacherPixels(size=32)
    survivor.reset(seed=0)
    for drop in ("close", "collect"):
        other = ReacherPixels(size=32)
        other.reset(seed=1)
        before = survivor.render_goal([0.5, -1.2])  # the survivor's context is current now
        if drop == "close":
            other.close()
        del other
        gc.collect()
        assert np.array_equal(survivor.render_goal([0.5, -1.2]), before), drop
    survivor.close()


def test_closed_env_is_a_clear_error():
    e = ReacherPixels(size=32)
    e.reset(seed=0)
    e.close()
    e.close()  # twice is fine
    for call in (lambda: e.step([0.0, 0.0]), lambda: e.reset(seed=0), lambda: e.render_goal([0.0, 0.0]),
                 lambda: e.set_state([0.0, 0.0])):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_bad_poses_are_refused(env):
    env.reset(seed=0)
    before = env.state()
    with pytest.raises(ValueError, match="qpos must be 2 finite numbers"):
        env.reset(options={"qpos": [np.nan, 0.0]})
    with pytest.raises(ValueError, match="qvel must be 2 finite numbers"):
        env.reset(options={"qpos": [0.0, 0.0], "qvel": [np.inf, 0.0]})
    low, high = env.unwrapped.physics.wrist_range
    beyond = high + envs.reacher.WRIST_SLACK + 0.01
    for call in (lambda: env.render_goal([0.0, beyond]), lambda: env.set_state([0.0, -beyond]),
                 lambda: env.reset(options={"qpos": [0.0, beyond]}), lambda: env.set_goal([0.0, beyond])):
        with pytest.raises(ValueError, match=rf"beyond the joint limit \[{low:.4f}, {high:.4f}\]"):
            call()
    assert all(np.array_equal(before[k], v) for k, v in env.state().items())  # nothing was changed
    # The soft limit lets the arm itself go a little past the range: such poses stay usable.
    env.render_goal([0.0, high + 0.15])


def test_wrap_angle_and_joint_error():
    import torch

    x = np.array([0.0, np.pi, -np.pi, 3 * np.pi / 2, -7.0])
    wrapped = envs.wrap_angle(x)
    assert np.all((wrapped >= -np.pi) & (wrapped < np.pi))
    assert np.allclose(np.cos(wrapped), np.cos(x)) and np.allclose(np.sin(wrapped), np.sin(x))
    assert torch.allclose(envs.wrap_angle(torch.from_numpy(x)), torch.from_numpy(wrapped))
    q = np.array([[3.1, 0.0], [0.0, 0.3]])
    goal = np.array([[-3.1, 0.01], [0.0, -0.2]])
    assert np.allclose(envs.joint_error(q, goal), [2 * np.pi - 6.2, 0.5])  # across the seam: small
    assert envs.joint_error(q, goal).shape == (2,) and envs.joint_error(q[0], goal[0]).shape == ()
    assert envs.joint_error([0.0, 0.0], [0.05, 0.0]) == 0.05  # exactly: a goal 0.05 rad away is not "< 0.05"
    # the wrist stops at its joint limit: from 2.7 to -2.7 it turns 5.4 rad back, never 0.88 through the limit
    assert np.isclose(envs.joint_error([0.0, 2.7], [0.0, -2.7]), 5.4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        envs.joint_error(np.zeros(3), np.zeros(3))


def test_goal_error_and_success_in_info(env):
    _, info = env.reset(seed=0)
    assert "goal_error" not in info
    goal = np.array([0.4, -0.8])
    _, info = env.reset(seed=0, options={"qpos": goal + [0.0, 0.04], "goal_qpos": goal})
    assert np.isclose(info["goal_error"], 0.04) and info["is_success"]
    _, _, _, _, info = env.step(np.array([1.0, 1.0]))
    assert np.isclose(info["goal_error"], envs.joint_error(info["qpos"], goal))
    env.set_goal(info["qpos"] + [0.1, 0.0])
    assert not env.state()["is_success"] and np.isclose(env.state()["goal_error"], 0.1)
    env.set_goal(None)
    assert "goal_error" not in env.state()
    strict = ReacherPixels(size=32, goal_tolerance=0.01)
    _, info = strict.reset(seed=0, options={"qpos": goal + [0.0, 0.04], "goal_qpos": goal})
    assert not info["is_success"]
    strict.close()


def test_reset_options_are_checked(env):
    """Options that are not a dict, a misspelt key, a target of 3 values or without a pose, an arm MuJoCo
    would reset itself: clear errors, never silently ignored."""
    for options, message in (("garbage", r"options must be a dict with keys among \['qpos', 'qvel', 'target', "
                                         r"'goal_qpos'\]"),
                             ({"qpso": [0.1, 0.2]}, r"unknown reset options \['qpso'\]"),
                             ({"target": [0.1, 0.1, 0.0]}, "target set a start together with qpos: give qpos too"),
                             ({"qpos": [0.1, 0.2], "target": [0.1, 0.1, 0.0]}, "target must be 2 finite numbers"),
                             ({"qpos": [0.1, 0.2], "qvel": [1e9, 1e9]}, r"qvel must lie within \+-1000 rad/s")):
        with pytest.raises(ValueError, match=message):
            env.reset(options=options)
    with pytest.raises(ValueError, match="qvel must lie within"):
        env.set_state([0.1, 0.2], qvel=[0.0, -1e9])
    _, info = env.reset(options={"qpos": [0.1, 0.2], "qvel": [50.0, -50.0]})  # fast, but an arm's speed
    assert np.allclose(info["qvel"], [50.0, -50.0])
