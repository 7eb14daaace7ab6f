import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from envs.collect import CollectConfig, collect, plan_shards
from envs.dataset import EpisodeStore
from envs.storage import DatasetError

TINY = CollectConfig(episodes=5, steps=12, size=32, workers=1, episodes_per_shard=2)


def _read_all(path):
    store = EpisodeStore(path)
    return {ref.key: store.episode(i) for i, ref in enumerate(store.episodes)}


def _assert_same_data(a, b):
    da, db = _read_all(a), _read_all(b)
    assert sorted(da) == sorted(db)
    for key in da:
        for name in da[key]:
            assert np.array_equal(da[key][name], db[key][name]), (key, name)


def test_collect_writes_the_documented_format(tmp_path):
    summary = collect(replace(TINY, out=str(tmp_path / "d")), progress=False)
    assert summary["collected"] == 5
    with h5py.File(sorted((tmp_path / "d").glob("*.h5"))[0]) as f:
        assert f.attrs["env"] == "reacher-easy" and f.attrs["size"] == 32 and f.attrs["policy"] == "smooth"
        assert "mujoco" in f.attrs["versions"]
        ep = f["ep_000000"]
        assert ep["pixels"].shape == (13, 32, 32, 3) and ep["pixels"].dtype == np.uint8
        assert ep["action"].shape == (12, 2) and ep["qpos"].shape == (13, 2)
        assert np.all(np.abs(ep["action"][()]) <= 1)


def test_worker_count_does_not_change_the_data(tmp_path):
    collect(replace(TINY, out=str(tmp_path / "one")), progress=False)
    collect(replace(TINY, out=str(tmp_path / "two"), workers=2), progress=False)
    _assert_same_data(tmp_path / "one", tmp_path / "two")


def test_rerun_is_a_no_op_and_extends(tmp_path):
    cfg = replace(TINY, out=str(tmp_path / "d"), episodes=3)
    collect(cfg, progress=False)
    assert collect(cfg, progress=False)["collected"] == 0
    assert collect(replace(cfg, episodes=5), progress=False)["collected"] == 2
    collect(replace(TINY, out=str(tmp_path / "ref")), progress=False)
    _assert_same_data(tmp_path / "d", tmp_path / "ref")


def test_resume_with_other_settings_is_an_error(tmp_path):
    collect(replace(TINY, out=str(tmp_path / "d"), episodes=2), progress=False)
    with pytest.raises(DatasetError, match="other settings"):
        collect(replace(TINY, out=str(tmp_path / "d"), policy="random"), progress=False)


def _progress(log) -> int:
    """Frames done so far, read off the tqdm bar in the log."""
    done = re.findall(r"(\d+)/\d+ \[", log.read_text(errors="ignore"))
    return int(done[-1]) if done else 0


def test_interrupted_collection_keeps_finished_episodes_and_resumes(tmp_path):
    """SIGINT in the middle of `wm collect`: finished episodes are saved; rerunning completes the same data."""
    out, log = tmp_path / "d", tmp_path / "log"
    n, steps = 150, 20
    args = [sys.executable, "-m", "wm", "collect", "--episodes", str(n), "--steps", str(steps), "--size", "32",
            "--workers", "2", "--episodes-per-shard", "500", "--out", str(out)]
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=err, stderr=err, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        deadline = time.time() + 120
        while _progress(log) < 5 * (steps + 1) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # a shard of 500 never completes by itself: only the interrupt writes it
        proc.wait(timeout=120)
    assert proc.returncode == 130, log.read_text()
    assert "run the same command again to resume" in log.read_text()
    saved = len(EpisodeStore(out, in_memory=False).episodes)
    assert 5 <= saved < n, f"expected a partial collection, got {saved} episodes"
    # A hard kill while writing leaves a temporary file; the next run removes it.
    (out / "shard_x.h5.123.tmp").write_bytes(b"partial")
    cfg = CollectConfig(episodes=n, steps=steps, size=32, workers=2, episodes_per_shard=500, out=str(out))
    assert collect(cfg, progress=False)["collected"] == n - saved
    assert not list(out.glob("*.tmp"))
    collect(replace(cfg, out=str(tmp_path / "ref"), episodes_per_shard=50), progress=False)
    _assert_same_data(out, tmp_path / "ref")


def test_plan_shards_groups_contiguous_runs():
    assert plan_shards([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert plan_shards([5, 2, 3, 9], 10) == [[2, 3], [5], [9]]


def test_bad_settings():
    with pytest.raises(ValueError, match="env must be one of"):
        collect(replace(TINY, env="pong"), progress=False)
    with pytest.raises(ValueError, match="policy must be one of"):
        collect(replace(TINY, policy="greedy"), progress=False)


def test_a_worker_that_cannot_start_is_a_clear_error_not_a_hang(tmp_path):
    cfg = replace(TINY, out=str(tmp_path / "d"), workers=2, render_quality="ultra")
    with pytest.raises(RuntimeError, match="collection worker could not start: ValueError: render quality"):
        collect(cfg, progress=False)
