"""Shared fixtures: tiny synthetic datasets whose contents say where they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs  # noqa: F401  (selects the GL backend first)
from envs.storage import write_shard


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two threads on two shared cores collapse under any other load; one thread is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def swallow_a_stop() -> None:
    """SIGTERM delivered where Python ignores exceptions (an at-fork hook, a weakref callback that h5py's objects
    run when freed): the handler's KeyboardInterrupt is swallowed, only the stop it noted remains."""
    import os
    import signal

    class SwallowsAStop:  # an exception raised in __del__ is ignored, like one in such a callback
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, between bytecodes
                pass

    SwallowsAStop()  # dropped at once


ACTION_SCALE = 1e-6  # actions must lie in [-1, 1]: step k is encoded as k * ACTION_SCALE (k < 1e6)


def synthetic_action(k) -> np.ndarray:
    """The action a synthetic episode takes at global step ``k`` (offset + t): (..., 2) float32."""
    k = np.asarray(k, dtype=np.float64)
    return np.stack([k * ACTION_SCALE, -k * ACTION_SCALE], -1).astype(np.float32)


def synthetic_episode(steps: int, size: int = 32, offset: int = 0, noise: bool = False) -> dict:
    """Frame t is filled with (offset + t) % 256 (or, with ``noise``, is random pixels); action t is
    ``synthetic_action(offset + t)``; qpos t is (offset + t, offset + t + 0.5)."""
    t = np.arange(steps + 1)
    pixels = np.broadcast_to(((offset + t) % 256).astype(np.uint8)[:, None, None, None], (steps + 1, size, size, 3))
    if noise:
        pixels = np.random.default_rng(offset).integers(0, 256, (steps + 1, size, size, 3), dtype=np.uint8)
    action = synthetic_action(offset + t[:-1])
    state = np.stack([offset + t, offset + t + 0.5], 1).astype(np.float64)
    return {"pixels": np.ascontiguousarray(pixels), "action": action, "qpos": state, "qvel": state + 1,
            "finger": state + 2, "target": state + 3}


def write_synthetic(dirpath, n_episodes: int = 4, steps: int = 30, size: int = 32, per_shard: int = 2,
                    env: str = "reacher-easy", noise: bool = False, first: int = 0):
    """Episodes ``first`` .. ``first + n_episodes - 1`` (episode i starts at step offset 1000 i)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    for start in range(first, first + n_episodes, per_shard):
        stop = min(start + per_shard, first + n_episodes)
        eps = {i: synthetic_episode(steps, size, 1000 * i, noise) for i in range(start, stop)}
        write_shard(dirpath / f"shard_{start:06d}_{max(eps):06d}.h5", eps, {"env": env, "size": size})
    return dirpath


def collect_tiny(out, episodes: int, steps: int, size: int = 32, **settings):
    """A tiny dataset collected by our own collector (real MuJoCo frames), quietly, one worker; returns ``out``."""
    from envs.collect import CollectConfig, collect

    collect(CollectConfig(episodes=episodes, steps=steps, size=size, workers=1, out=str(out), **settings),
            progress=False)
    return out


@pytest.fixture
def synthetic_data(tmp_path):
    return write_synthetic(tmp_path / "data")


def write_swm_file(path, n_episodes: int = 3, rows: int = 12, size: int = 32, compression=None,
                   columns: dict | None = None, drop=(), last_action=np.nan, action_dtype=np.float64, attrs=None):
    """A stable-worldmodel single-file dataset, built with h5py alone as their recorder lays it out:
    columns of all episodes' rows concatenated, ep_len (int32) and ep_offset (int64). Episode e has
    ``rows`` rows (e + rows for e > 0, so lengths differ); row t holds frame (100 e + t) % 256, the action
    taken there, ``synthetic_action(1000 e + t)`` (``last_action`` on the last row), and qpos
    (1000 e + t) * 1e-3 + (0, 0.5). ``columns`` adds or replaces columns; ``drop`` removes some."""
    import h5py

    lengths = np.array([rows + e for e in range(n_episodes)], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    e_of_row = np.repeat(np.arange(n_episodes), lengths)
    t_of_row = np.concatenate([np.arange(n) for n in lengths])
    pixels = np.broadcast_to(((100 * e_of_row + t_of_row) % 256).astype(np.uint8)[:, None, None, None],
                             (len(e_of_row), size, size, 3))
    action = synthetic_action(1000 * e_of_row + t_of_row).astype(action_dtype)
    action[offsets + lengths - 1] = last_action
    qpos = np.stack([(1000 * e_of_row + t_of_row) * 1e-3, (1000 * e_of_row + t_of_row) * 1e-3 + 0.5], 1)
    data = {"pixels": np.ascontiguousarray(pixels), "action": action, "qpos": qpos, "qvel": qpos + 1,
            "reward": np.zeros(len(e_of_row)), "step_idx": t_of_row, "ep_idx": e_of_row.astype(np.int32),
            "ep_len": lengths, "ep_offset": offsets, **(columns or {})}
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs.update(attrs or {})
        for key, value in data.items():
            if key in drop:
                continue
            extra = {}
            if key == "pixels" and compression is not None:
                extra = dict(chunks=(min(100, len(value)), *value.shape[1:]), **compression)
            f.create_dataset(key, data=value, **extra)
    return path


def run_wm(*args, check: bool = True, cwd=None, timeout: int = 300):
    """Run the `wm` command line in a fresh process, as a user would (from ``cwd``, default: here)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "wm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def save_as_trained_on(model, path, data, val_fraction: float = 0.25, test_fraction: float = 0.25, seed: int = 0):
    """Save ``model`` as if training had split ``data`` (train / val / test by episode, from ``seed``) and
    recorded it, as ``wm train`` does; returns the path."""
    from envs.dataset import EpisodeStore
    from worldmodel.datasplit import split_record

    store = EpisodeStore(data)
    ids = {s: store.split(s, val_fraction, seed, test_fraction) for s in ("train", "val", "test")}
    return model.save(path, extra={"data": split_record(store, str(data), ids)})


def tqdm_progress(log) -> int:
    """Items done so far (steps, frames), read off the last tqdm bar written to the file ``log``."""
    import re

    done = re.findall(r"(\d+)/\d+ \[", log.read_text(errors="ignore"))
    return int(done[-1]) if done else 0
