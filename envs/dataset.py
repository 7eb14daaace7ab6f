"""Training windows over a dataset of episodes, as a torch ``Dataset``.

A window is ``history + n_pred`` frames taken every ``frameskip`` env steps. The ``frameskip``
actions between two kept frames are concatenated into one action chunk ``(frameskip * 2,)``, so
``actions[k]`` leads from ``pixels[k]`` to ``pixels[k + 1]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.device import available_memory
from envs import swm
from envs.storage import (CONSISTENT_ATTRS, RECORDING_DEFAULTS, STATE_KEYS, DatasetError, EpisodeRef, ShardInfo,
                          _digest, _files, _plain, check_complete, check_image_size, inspect_shard, open_h5,
                          recording)

SPLITS = ("train", "val", "test", "all")
CHUNK_CACHE_MB = 64  # HDF5 chunk cache of a stable-worldmodel file (one pixel dataset, 100-frame chunks)
FRAME_CACHE_GB = 8.0  # frames are kept in memory up to this size and half the memory available, else read lazily


def memory_for_frames(max_gb: float | None = None) -> float:
    """Bytes of frames a store may keep in memory: ``max_gb``, or by default FRAME_CACHE_GB but at most half
    the memory available now (the training that follows needs the rest; a small machine would swap)."""
    if max_gb is not None:
        return max_gb * 1e9
    free = available_memory()
    return FRAME_CACHE_GB * 1e9 if free is None else min(FRAME_CACHE_GB * 1e9, free / 2)


def inspect_dataset(paths, env: str | None = None) -> list[ShardInfo]:
    """Inspect every file of one or many datasets and check that they belong together.

    A stable-worldmodel file (detected by its ``ep_len``/``ep_offset`` datasets) is a whole dataset:
    it cannot be mixed with shards or other files. ``env`` names its environment when it does not.
    Shards must agree on everything that changes what a frame looks like or how an action moves the
    arm (``storage.CONSISTENT_ATTRS``, defaults filled): the error names the files that differ. A directory
    holding fewer episodes than its manifest records says so (``storage.check_complete``)."""
    files = _files(paths)
    single = [p for p in files if swm.is_swm_file(p)]
    if single:
        if len(files) > 1:
            raise DatasetError(f"{single[0]} is a stable-worldmodel file (one file = one dataset); it cannot be "
                               f"mixed with other files ({len(files) - 1} more were given: "
                               f"{[str(p) for p in files if p != single[0]][:3]}); convert them first")
        return [swm.inspect_swm(single[0], env=env)]
    shards = [inspect_shard(s, env) for s in files]
    first = recording(shards[0].attrs)
    for shard in shards[1:]:
        have = recording(shard.attrs)
        differ = {k: (first[k], have[k]) for k in CONSISTENT_ATTRS if have[k] != first[k]}
        if differ:
            raise DatasetError(f"shards do not belong together: {shards[0].path} and {shard.path} differ in "
                               + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in differ.items()))
    check_complete(paths, {s.path: len(s.episodes) for s in shards})
    return shards


def dataset_fingerprint(paths) -> str:
    """16 hex digits that change whenever the dataset does: a hash of every file's name, size in bytes
    and attributes (for a stable-worldmodel file, which often has no attributes and, uncompressed, a
    size set by its shapes alone, also of its ep_len, ep_offset and action columns). Same data in a
    moved directory: same fingerprint; one more shard: another one."""
    rows = []
    for p in _files(paths):
        with open_h5(p) as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            content = swm.content_digest(f) if swm.is_swm_handle(f) else ""
        rows.append((p.name, p.stat().st_size, attrs, content))
    return _digest(sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str)))[:16]


def resize_frames(frames: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    """Area-average (N, H, W, 3) uint8 frames to (N, size, size, 3): each output pixel is the mean of the
    input pixels it covers, so a 1-px arm at 224 px stays a faint line at 64 px instead of aliasing away."""
    n = len(frames)
    if frames.shape[1:3] == (size, size):
        return frames
    out = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, batch):  # bounded memory: float copies of `batch` frames at a time
        x = torch.from_numpy(np.ascontiguousarray(frames[start:start + batch])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="area")  # (B, 3, size, size)
        out[start:start + batch] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def episodes_fingerprint(episodes) -> str:
    """``EpisodeStore.fingerprint`` of a dataset's episodes (``EpisodeRef``): its files' ``dataset_fingerprint``
    combined with the episodes' uids."""
    files = dataset_fingerprint(sorted({e.shard for e in episodes}))
    content = hashlib.sha256(" ".join(sorted(e.uid for e in episodes)).encode()).hexdigest()
    return hashlib.sha256(f"{files} {content}".encode()).hexdigest()[:16]


_FINGERPRINTS: dict[tuple, str] = {}  # fingerprint_at's, by the files' paths, sizes and modification times


def fingerprint_at(paths, env: str | None = None) -> str:
    """The fingerprint of the dataset at ``paths`` without opening it for its frames: whatever their size or
    shape (it does not depend on them). ``env`` names the environment of a file that names none (as
    ``EpisodeStore`` takes it: episode uids include it). Read once per process while the files stay as they
    are (a command checks several models' recorded data, then opens it)."""
    files = _files(paths)
    key = (env, *((str(p.resolve()), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = episodes_fingerprint([e for s in inspect_dataset(paths, env=env) for e in s.episodes])
    return _FINGERPRINTS[key]


def shared_attrs(shards) -> dict:
    """The file attributes every shard agrees on: one that differs between them (the policy or seed of
    collections put together) says nothing about the dataset as a whole, so no converted copy claims it."""
    def same(value, other) -> bool:
        return json.dumps(value, sort_keys=True, default=str) == json.dumps(other, sort_keys=True, default=str)
    first = shards[0].attrs
    return {k: v for k, v in first.items() if all(k in s.attrs and same(s.attrs[k], v) for s in shards[1:])}


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """The held-out fractions of a split, as `wm train` takes them: val in (0, 1) (a split always holds one
    episode out to choose on), test in [0, 1), together below 1 (some episodes are left to train on)."""
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction (val_fraction) must be in (0, 1) and --test-fraction (test_fraction) in "
                         f"[0, 1), together below 1; got {val_fraction}, {test_fraction}")


class EpisodeStore:
    """Every episode of one or many datasets, checked once, read without reopening files per item.

    Accepts a directory of our shards, shard files, or ONE stable-worldmodel ``.h5`` file (``envs.swm``;
    ``env`` names its environment when the file does not). Episodes are ordered by (shard path, key), so
    a split drawn from a seed does not depend on the order the paths were given in. ``image_size``
    resizes frames of another size on load (area interpolation): ``size`` is then the size after
    resizing and ``source_size`` the stored one. ``in_memory`` loads all (resized) frames at once when
    they fit in ``max_memory_gb`` (default: ``memory_for_frames``; 64x64 frames take 12 KB each);
    otherwise files stay open, one handle per process, and every read is resized on the fly. Actions and
    true states are always in memory.

    ``missing_states`` names the states the data lacks (NaN in ``states(i)``): ``target`` when a file has
    no target column; ``qpos``/``qvel`` (and then ``finger``) in a stable-worldmodel file without them.
    Each episode has a stable ``uid`` (``EpisodeRef.uid``); ``uids`` maps them to indices and
    ``fingerprint`` tells whether the data is exactly the same (``dataset_fingerprint``).
    """

    def __init__(self, paths, in_memory: bool | None = None, max_memory_gb: float | None = None,
                 image_size: int | None = None, env: str | None = None):
        shards = inspect_dataset(paths, env=env)
        self.paths = paths
        self.attrs = shared_attrs(shards)
        self._policies = {s.path: s.attrs.get("policy") for s in shards}  # each file's exploration policy
        self.layout = shards[0].layout
        # what the files do not say and is assumed (a stable-worldmodel file says which; our shards' defaults)
        self.assumed = self.attrs.pop("assumed", None) or sorted(k for k in RECORDING_DEFAULTS if k not in self.attrs)
        self.source_size = self.attrs.get("size")
        self.size = self._output_size(image_size, shards[0])
        pairs = sorted(((e, a) for s in shards for e, a in zip(s.episodes, s.arrays)),
                       key=lambda p: (str(p[0].shard), p[0].key))
        self.episodes: list[EpisodeRef] = [e for e, _ in pairs]
        self._states = [a for _, a in pairs]  # action (T, 2) float32, states (T+1, 2) float64
        self.missing_states = tuple(sorted({k for s in shards for k in s.missing}))
        self.uids: dict[str, int] = {}
        for i, e in enumerate(self.episodes):
            first = self.uids.setdefault(e.uid, i)
            if first != i:  # a copied shard: the split would put one episode on both sides
                other = self.episodes[first]
                raise DatasetError(f"the same episode twice: {other.shard} {other.key} and {e.shard} {e.key} (uid "
                                   f"{e.uid}); remove the copy, so that no episode is both trained on and held out")
        self._fingerprint: str | None = None
        frames = sum(e.steps + 1 for e in self.episodes)
        if in_memory is None:
            in_memory = frames * self.size * self.size * 3 <= memory_for_frames(max_memory_gb)
        self.in_memory = in_memory
        self._handles: dict[Path, h5py.File] = {}
        self._datasets: dict[tuple, h5py.Dataset] = {}  # open pixel datasets, by (file, episode key)
        self._pid = os.getpid()
        self._cache = None
        if in_memory:
            self._cache = [{"pixels": self._read_frames(i), **self._states[i]} for i in range(len(self.episodes))]
            self.close()

    def _output_size(self, image_size: int | None, shard) -> int:
        if image_size is not None:
            return check_image_size(image_size)
        if self.source_size is None:
            raise DatasetError(f"{shard.path}: frames are {self.attrs.get('frame_shape')} (not square); "
                               f"give --image-size (image_size= in Python) to resize them to a square")
        return int(self.source_size)

    def __len__(self) -> int:
        return len(self.episodes)

    def enlarged(self) -> str | None:
        """What to say when ``image_size`` enlarged the stored frames (None otherwise): resizing is an area
        average, which upsampling turns into repeated pixels, so the frames hold no more detail than stored."""
        h, w = (self.source_size,) * 2 if self.source_size else tuple(self.attrs.get("frame_shape") or (0, 0))
        if self.size <= max(h, w):
            return None
        stored = f"{h}" if h == w else f"{h}x{w}"
        return (f"{self.paths}: --image-size {self.size} enlarges its {stored} px frames: an upsample adds no "
                f"detail, only bytes; frames rendered at that size (`wm collect --size {self.size}`) hold it")

    def copy_attrs(self) -> dict:
        """The attributes a copy of these frames at ``size`` records (``wm convert``): the source's, ``size``
        the copy's, ``render_size`` still the size they were rendered at (a resize renders nothing), and
        ``stretched_from`` the shape of frames that were not square (no closed loop can show a model such
        frames: ``evaluation.evaluate.batch_recorded``)."""
        attrs = {k: v for k, v in self.attrs.items() if v is not None}
        if self.source_size is None:
            attrs["stretched_from"] = [int(x) for x in self.attrs["frame_shape"]]
        rendered = attrs.get("render_size") or self.source_size
        if rendered is not None and rendered != self.size and "stretched_from" not in attrs:  # none rendered square
            attrs["render_size"] = rendered
        return {**attrs, "size": self.size}

    @property
    def fingerprint(self) -> str:
        """What tells exactly this dataset from any other: ``dataset_fingerprint`` of its files (names,
        sizes, attributes) combined with its episodes' uids (their content: files of the same names and
        sizes holding other episodes differ)."""
        if self._fingerprint is None:
            self._fingerprint = episodes_fingerprint(self.episodes)
        return self._fingerprint

    def policy(self, i: int) -> str | None:
        """The exploration policy that collected episode ``i`` (its file's ``policy`` attribute; None where the
        file does not record one): files of different collections each keep their own."""
        policy = self._policies[self.episodes[i].shard]
        return None if policy is None else str(policy)

    def index_of_uids(self, uids) -> list[int]:
        """Episode indices of ``uids``; a DatasetError names the ones this dataset does not hold."""
        unknown = [u for u in uids if u not in self.uids]
        if unknown:
            raise DatasetError(f"{self.paths}: holds no episode with uid {unknown[:5]} "
                               f"({len(unknown)} unknown): another dataset?")
        return [self.uids[u] for u in uids]

    def require_states(self, keys, purpose: str) -> None:
        """Raise a clear DatasetError when ``purpose`` (e.g. "linear probes") needs states the data lacks."""
        lacking = [k for k in keys if k in self.missing_states]
        if lacking:
            raise DatasetError(f"{self.paths}: {purpose} need {lacking}, which this dataset does not hold "
                               f"(finger is derived from qpos when qpos is there; target cannot be derived)")

    def _file(self, path: Path, cache_mb: float) -> h5py.File:
        if os.getpid() != self._pid:  # a DataLoader worker: h5py handles do not survive a fork
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r", rdcc_nbytes=int(cache_mb * 1024**2))
        return self._handles[path]

    def _pixels(self, ref: EpisodeRef) -> h5py.Dataset:
        """The pixel dataset holding episode ``ref``, kept open. A stable-worldmodel file's one dataset gets
        a chunk cache, so that the next read of neighbouring frames finds its 100-frame chunk decompressed.
        Our shards get none: HDF5 keeps a cache per open dataset, one per episode here, and on one-frame
        chunks it serves nothing but keeps every episode read decompressed while the files stay open (1.4 GB
        more for 400 episodes of 64 px loaded into memory, and growing without bound when read lazily)."""
        cache_mb = CHUNK_CACHE_MB if ref.row is not None else 0
        f = self._file(ref.shard, cache_mb)  # first: a forked worker drops the parent's handles and datasets
        key = (ref.shard, None if ref.row is not None else ref.key)
        if key not in self._datasets:
            self._datasets[key] = f["pixels"] if ref.row is not None else f[ref.key]["pixels"]
        return self._datasets[key]

    def _read_frames(self, i: int, index: np.ndarray | None = None) -> np.ndarray:
        """Frames ``index`` (all when None) of episode ``i`` from disk, resized: (n, size, size, 3) uint8."""
        ref = self.episodes[i]
        try:
            pixels = self._pixels(ref)
            first, count = (ref.row, ref.steps + 1) if ref.row is not None else (0, len(pixels))
            if index is None:
                frames = pixels[first:first + count]
            else:
                frames = swm.read_rows(pixels, first, index)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise DatasetError(f"{ref.shard}: episode {ref.key} cannot be read (truncated or corrupt?): {exc}") from exc
        if self.attrs.get("channels_first"):  # (n, 3, H, W), as some tools store frames
            frames = np.ascontiguousarray(np.moveaxis(frames, 1, -1))
        return resize_frames(frames, self.size)

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """All arrays of episode ``i``: pixels, action and the true states."""
        if self._cache is not None:
            return self._cache[i]
        return {"pixels": self._read_frames(i), **self._states[i]}

    def states(self, i: int) -> dict[str, np.ndarray]:
        """Actions and true states of episode ``i``, without the frames (always in memory)."""
        return self._states[i]

    def frames(self, i: int, index: np.ndarray) -> np.ndarray:
        """Frames ``index`` (sorted, increasing) of episode ``i``: (len(index), size, size, 3) uint8; an index
        outside the episode or out of order is an ``IndexError`` (a file read lazily would return other frames)."""
        index = np.asarray(index, dtype=np.int64)
        last = self.episodes[i].steps
        if len(index) and (index[0] < 0 or index[-1] > last or np.any(index[1:] < index[:-1])):
            raise IndexError(f"frames of episode {i}: {index.tolist()} are not increasing rows of 0..{last}")
        if self._cache is not None:
            return self._cache[i]["pixels"][index]
        return self._read_frames(i, index)

    def split(self, split: str, val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.0) -> list[int]:
        """Episode indices of a split by episode, deterministic from ``seed``: ``test`` (reported on, never
        chosen on), ``val`` (chosen on), ``train`` (the rest) or ``all``. Each of val and test holds its
        fraction (at least one episode when the fraction is positive and the other splits keep one)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check_fractions(val_fraction, test_fraction)
        n = len(self)
        order = np.random.default_rng(seed).permutation(n)
        n_test = int(round(test_fraction * n))
        n_val = int(round(val_fraction * n))
        if n >= 2 + (test_fraction > 0):  # every split non-empty when there are episodes enough
            n_test = min(max(n_test, 1), n - 2) if test_fraction > 0 else 0
            n_val = min(max(n_val, 1), n - n_test - 1)
        chosen = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:],
                  "all": order}[split]
        return sorted(int(i) for i in chosen)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles, self._datasets = {}, {}

    def __getstate__(self):  # DataLoader workers reopen files themselves
        state = dict(self.__dict__)
        state["_handles"], state["_datasets"] = {}, {}
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
                 seed: int = 0, test_fraction: float = 0.0, states: bool = True, episodes: int = 0):
        """``episodes``: at most this many of the split's episodes, the first by index (0: all), so smaller
        sets are nested in larger ones and the other splits stay as they are (a data-size curve)."""
        if spec.history < 1 or spec.n_pred < 1 or spec.frameskip < 1:
            raise ValueError(f"history, n_pred and frameskip must be positive, got {spec}")
        if episodes < 0:
            raise ValueError(f"episodes must be >= 0 (0: all), got {episodes}")
        self.store, self.spec, self.states = store, spec, states  # states: also the true states of each frame
        self.episode_ids = store.split(split, val_fraction, seed, test_fraction)
        if episodes:
            self.episode_ids = self.episode_ids[:episodes]
        short = [store.episodes[i] for i in self.episode_ids if store.episodes[i].steps < spec.span]
        if short:  # every one named at once (the first five), not one per run
            named = "; ".join(f"{ref.shard}: episode {ref.key} has {ref.steps} steps" for ref in short[:5])
            more = f"; and {len(short) - 5} more" if len(short) > 5 else ""
            raise DatasetError(f"{len(short)} {split} episode(s) shorter than a window of {spec.frames} frames every "
                               f"{spec.frameskip} steps ({spec.span} steps): {named}{more}; lower history, n_pred "
                               f"or frameskip, or leave them out")
        starts = []
        for i in self.episode_ids:
            starts.extend((i, t0) for t0 in range(store.episodes[i].steps - spec.span + 1))
        self.index = np.array(starts, dtype=np.int64).reshape(-1, 2)  # (num_windows, 2): episode, first step
        self._offsets = np.arange(spec.frames) * spec.frameskip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, t0 = (int(x) for x in self.index[k])
        spec, t = self.spec, t0 + self._offsets
        ep = self.store.states(i)
        actions = ep["action"][t0:t0 + spec.span].reshape(spec.frames - 1, spec.action_dim)  # (L-1, fs*2)
        item = {"pixels": torch.from_numpy(self.store.frames(i, t)), "actions": torch.from_numpy(actions),
                "starts_episode": torch.tensor(t0 == 0)}  # the window's first frame is its episode's first
        if self.states:  # training reads only frames, actions and where the window starts
            for key in STATE_KEYS:
                item[key] = torch.from_numpy(ep[key][t].astype(np.float32))
        return item
