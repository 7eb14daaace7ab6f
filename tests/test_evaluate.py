import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from envs.collect import CollectConfig, collect
from envs.dataset import EpisodeStore
from envs.vector import ReacherBatch
from planners.evaluate import (EvalConfig, episode_records, joint_error, run_episodes,
                               sample_episodes, simulator_controller, wilson_interval)
from test_model import tiny_config
from worldmodel.model import WorldModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "data"
    collect(CollectConfig(episodes=10, steps=60, size=32, workers=1, out=str(out)), progress=False)
    return out


def test_joint_error_wraps_angles():
    assert math.isclose(joint_error(np.array([math.pi - 0.01, 0.0]), np.array([-math.pi + 0.01, 0.0])), 0.02,
                        abs_tol=1e-9)
    assert math.isclose(joint_error(np.array([0.3, -0.2]), np.array([0.0, 0.0])), 0.3)


def test_success_detection_and_steps():
    errors = np.array([[0.5, 0.2, 0.04, 0.3], [0.5, 0.4, 0.3, 0.2], [0.01, 0.5, 0.5, 0.5]])
    r = episode_records(errors, tolerance=0.05)
    assert r["success"].tolist() == [True, False, True]
    assert r["steps_to_success"].tolist() == [2, -1, 0]
    assert np.allclose(r["final_error"], [0.3, 0.2, 0.5]) and np.allclose(r["min_error"], [0.04, 0.2, 0.01])


def test_goal_is_25_steps_later_in_the_same_episode(data):
    store = EpisodeStore(data)
    ids = store.split("val", 0.3, 0)
    eps = sample_episodes(store, ids, "reach25", 20, seed=0, wrist_range=(-2.8, 2.8))
    for i, t0, q, goal in zip(eps["episode"], eps["t0"], eps["qpos"], eps["goal_qpos"]):
        assert i in ids
        assert np.array_equal(store.states(i)["qpos"][t0], q)
        assert np.array_equal(store.states(i)["qpos"][t0 + 25], goal)
    again = sample_episodes(store, ids, "reach25", 20, seed=0, wrist_range=(-2.8, 2.8))
    assert np.array_equal(again["t0"], eps["t0"])
    uniform = sample_episodes(store, ids, "uniform", 50, seed=0, wrist_range=(-2.8, 2.8))
    assert np.all(np.abs(uniform["goal_qpos"][:, 1]) <= 2.8) and uniform["goal_qpos"][:, 0].std() > 1


def test_budget_is_the_number_of_steps(data):
    store = EpisodeStore(data)
    eps = sample_episodes(store, list(range(10)), "reach25", 3, 0, (-2.8, 2.8))
    batch = ReacherBatch("reacher-easy", 3, size=32)
    calls = []
    errors = run_episodes(batch, eps, 7, lambda f: calls.append(1) or np.zeros((3, 2)))
    assert errors.shape == (3, 8) and len(calls) == 7
    assert np.allclose(errors[:, 0], joint_error(eps["qpos"], eps["goal_qpos"]))
    batch.close()


def test_simulator_baseline_reaches_most_goals_and_batching_agrees(data):
    """The ceiling: CEM on the true dynamics reaches most reach25 goals; a batch of episodes gives the
    same result as each episode alone."""
    store = EpisodeStore(data)
    eps = sample_episodes(store, list(range(10)), "reach25", 6, 0, (-2.8, 2.8))
    cfg = EvalConfig(sim_samples=100, sim_iterations=8, horizon=5)
    batch = ReacherBatch("reacher-easy", 6, size=32)
    act, _ = simulator_controller(batch, cfg, 5, eps["goal_qpos"], seed=0)
    together = run_episodes(batch, eps, 50, act)
    batch.close()
    assert episode_records(together, 0.05)["success"].mean() >= 4 / 6
    for i in (0, 3):
        one = {k: v[i:i + 1] for k, v in eps.items()}
        single = ReacherBatch("reacher-easy", 1, size=32)
        act, _ = simulator_controller(single, cfg, 5, one["goal_qpos"], seed=0)
        alone = run_episodes(single, one, 50, act)
        single.close()
        assert np.allclose(alone[0], together[i], atol=1e-9)


def test_wilson_interval():
    lo, hi = wilson_interval(45, 50)
    assert 0.78 < lo < 0.9 < hi < 0.97
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0


def _wm(*args):
    """Run the `wm` command line in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "wm", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wm_eval_smoke_writes_results(data, tmp_path):
    WorldModel(tiny_config("mlp", size=32, frameskip=5)).save(tmp_path / "m.pt")
    out = _wm("eval", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 3, "--seeds", 2,
              "--samples", 16, "--iterations", 2, "--sim-samples", 16, "--sim-iterations", 2,
              "--protocol", "reach25,uniform", "--val-fraction", 0.3, "--out", tmp_path / "eval")
    assert "| reach25 | world_model |" in out
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "eval" / name).exists()
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(report["episodes"]) == 2 * 2 * 3 * 3  # protocols x seeds x methods x episodes
    assert set(report["summary"]) == {f"{p}/{m}" for p in ("reach25", "uniform")
                                      for m in ("world_model", "random", "simulator")}


def test_wm_demo_smoke_writes_videos_and_sheet(data, tmp_path):
    WorldModel(tiny_config("mlp", size=32, frameskip=5)).save(tmp_path / "m.pt")
    _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 2, "--samples", 8,
        "--iterations", 1, "--bank-frames", 50, "--out", tmp_path / "videos")
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["episode_00.gif", "episode_00.mp4", "episode_01.gif", "episode_01.mp4", "summary.png"]
    import imageio.v2 as imageio
    frames = imageio.mimread(tmp_path / "videos" / "episode_00.mp4")
    assert len(frames) == 51  # the start frame and one per step of the 50-step budget
