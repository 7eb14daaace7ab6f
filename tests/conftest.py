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


def synthetic_episode(steps: int, size: int = 32, offset: int = 0, noise: bool = False) -> dict:
    """Frame t is filled with (offset + t) % 256 (or, with ``noise``, is random pixels); action t is
    (offset + t, -(offset + t))."""
    t = np.arange(steps + 1)
    pixels = np.broadcast_to(((offset + t) % 256).astype(np.uint8)[:, None, None, None], (steps + 1, size, size, 3))
    if noise:
        pixels = np.random.default_rng(offset).integers(0, 256, (steps + 1, size, size, 3), dtype=np.uint8)
    action = np.stack([offset + t[:-1], -(offset + t[:-1])], 1).astype(np.float32)
    state = np.stack([offset + t, offset + t + 0.5], 1).astype(np.float64)
    return {"pixels": np.ascontiguousarray(pixels), "action": action, "qpos": state, "qvel": state + 1,
            "finger": state + 2, "target": state + 3}


def write_synthetic(dirpath, n_episodes: int = 4, steps: int = 30, size: int = 32, per_shard: int = 2,
                    env: str = "reacher-easy", noise: bool = False):
    dirpath.mkdir(parents=True, exist_ok=True)
    for start in range(0, n_episodes, per_shard):
        eps = {i: synthetic_episode(steps, size, 1000 * i, noise) for i in range(start, min(start + per_shard, n_episodes))}
        write_shard(dirpath / f"shard_{start:06d}_{max(eps):06d}.h5", eps, {"env": env, "size": size})
    return dirpath


@pytest.fixture
def synthetic_data(tmp_path):
    return write_synthetic(tmp_path / "data")
