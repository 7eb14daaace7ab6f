"""Training windows over a dataset of episodes, as a torch ``Dataset``.

A window is ``history + n_pred`` frames taken every ``frameskip`` env steps. The ``frameskip``
actions between two kept frames are concatenated into one action chunk ``(frameskip * 2,)``, so
``actions[k]`` leads from ``pixels[k]`` to ``pixels[k + 1]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from envs.storage import STATE_KEYS, DatasetError, EpisodeRef, inspect_dataset

SPLITS = ("train", "val", "all")


class EpisodeStore:
    """Every episode of one or many datasets, checked once, read without reopening files per item.

    Episodes are ordered by (shard path, key), so a split drawn from a seed does not depend on the
    order the paths were given in. ``in_memory`` loads all frames at once (the fast path when they
    fit: 64x64 frames take 12 KB each); otherwise files stay open, one handle per process.
    """

    def __init__(self, paths, in_memory: bool | None = None, max_memory_gb: float = 8.0):
        shards = inspect_dataset(paths)
        self.attrs = shards[0].attrs
        self.size = int(self.attrs["size"])
        self.episodes: list[EpisodeRef] = sorted((e for s in shards for e in s.episodes),
                                                 key=lambda e: (str(e.shard), e.key))
        frames = sum(e.steps + 1 for e in self.episodes)
        if in_memory is None:
            in_memory = frames * self.size * self.size * 3 <= max_memory_gb * 1e9
        self.in_memory = in_memory
        self._handles: dict[Path, h5py.File] = {}
        self._pid = os.getpid()
        self._cache = [self._read(i) for i in range(len(self.episodes))] if in_memory else None
        self._states = self._cache or [self._read(i, with_pixels=False) for i in range(len(self.episodes))]
        if in_memory:
            self.close()

    def __len__(self) -> int:
        return len(self.episodes)

    def _file(self, path: Path) -> h5py.File:
        if os.getpid() != self._pid:  # a DataLoader worker: h5py handles do not survive a fork
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]

    def _read(self, i: int, with_pixels: bool = True) -> dict[str, np.ndarray]:
        ref = self.episodes[i]
        group = self._file(ref.shard)[ref.key]
        keys = (("pixels",) if with_pixels else ()) + ("action", *STATE_KEYS)
        try:
            return {k: group[k][()] for k in keys}
        except OSError as exc:
            raise DatasetError(f"{ref.shard}: episode {ref.key} cannot be read (truncated or corrupt?): {exc}") from exc

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """All arrays of episode ``i``: pixels, action and the true states."""
        return self._cache[i] if self._cache is not None else self._read(i)

    def states(self, i: int) -> dict[str, np.ndarray]:
        """Actions and true states of episode ``i``, without the frames (always in memory)."""
        return self._states[i]

    def frames(self, i: int, index: np.ndarray) -> np.ndarray:
        """Frames ``index`` (sorted, increasing) of episode ``i``: (len(index), H, W, 3) uint8."""
        if self._cache is not None:
            return self._cache[i]["pixels"][index]
        ref = self.episodes[i]
        return self._file(ref.shard)[ref.key]["pixels"][index]

    def split(self, split: str, val_fraction: float = 0.1, seed: int = 0) -> list[int]:
        """Episode indices of a split by episode, deterministic from ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = int(round(val_fraction * len(self)))
        if split != "all" and len(self) >= 2:
            n_val = min(max(n_val, 1), len(self) - 1)  # both splits non-empty when there are 2+ episodes
        chosen = {"train": order[n_val:], "val": order[:n_val], "all": order}[split]
        return sorted(int(i) for i in chosen)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __getstate__(self):  # DataLoader workers reopen files themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


@dataclass(frozen=True)
class WindowSpec:
    history: int = 3
    n_pred: int = 1
    frameskip: int = 5

    @property
    def frames(self) -> int:
        return self.history + self.n_pred

    @property
    def span(self) -> int:
        """Env steps from the first to the last frame of a window."""
        return (self.frames - 1) * self.frameskip

    @property
    def action_dim(self) -> int:
        return 2 * self.frameskip


class WindowDataset(Dataset):
    """Windows ``{pixels (L,H,W,3) uint8, actions (L-1, frameskip*2), qpos/qvel/finger/target (L, 2)}``."""

    def __init__(self, store: EpisodeStore, spec: WindowSpec, split: str = "train", val_fraction: float = 0.1,
                 seed: int = 0):
        if spec.history < 1 or spec.n_pred < 1 or spec.frameskip < 1:
            raise ValueError(f"history, n_pred and frameskip must be positive, got {spec}")
        self.store, self.spec = store, spec
        self.episode_ids = store.split(split, val_fraction, seed)
        starts = []
        for i in self.episode_ids:
            steps = store.episodes[i].steps
            if steps < spec.span:
                ref = store.episodes[i]
                raise DatasetError(
                    f"{ref.shard}: episode {ref.key} has {steps} steps, shorter than a window of {spec.frames} "
                    f"frames every {spec.frameskip} steps ({spec.span} steps); lower history, n_pred or frameskip"
                )
            starts.extend((i, t0) for t0 in range(steps - spec.span + 1))
        self.index = np.array(starts, dtype=np.int64).reshape(-1, 2)  # (num_windows, 2): episode, first step
        self._offsets = np.arange(spec.frames) * spec.frameskip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, t0 = (int(x) for x in self.index[k])
        spec, t = self.spec, t0 + self._offsets
        ep = self.store.states(i)
        actions = ep["action"][t0:t0 + spec.span].reshape(spec.frames - 1, spec.action_dim)  # (L-1, fs*2)
        item = {"pixels": torch.from_numpy(self.store.frames(i, t)), "actions": torch.from_numpy(actions)}
        for key in STATE_KEYS:
            item[key] = torch.from_numpy(ep[key][t].astype(np.float32))
        return item
