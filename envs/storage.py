"""The on-disk dataset: HDF5 shards of episodes, written atomically and checked when read.

A shard is one ``.h5`` file. Its attributes say how it was made (``env``, ``size``, ``steps``,
``policy``, ``seed``, package versions, ...); each episode is a group ``ep_NNNNNN`` (the episode's
index in its collection) holding

    pixels  (T+1, H, W, 3) uint8    frames, the first before any action
    action  (T, 2)         float32  action[t] leads from frame t to frame t+1
    qpos    (T+1, 2)       float64  joint angles (shoulder, wrist), radians
    qvel    (T+1, 2)       float64  joint velocities
    finger  (T+1, 2)       float64  fingertip xy
    target  (T+1, 2)       float64  target xy

Anyone can bring their own rollouts by writing files of this shape (see ``write_shard``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
STATE_KEYS = ("qpos", "qvel", "finger", "target")
EPISODE_KEYS = ("pixels", "action", *STATE_KEYS)
# Attributes that must agree between shards of one dataset.
CONSISTENT_ATTRS = ("env", "size", "format_version")


class DatasetError(ValueError):
    """A dataset file that cannot be used, with the file and the problem named."""


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("mujoco", "dm-control", "gymnasium", "numpy", "h5py"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return json.dumps(versions)


def episode_key(index: int) -> str:
    return f"ep_{index:06d}"


def episode_index(key: str) -> int:
    return int(key.split("_", 1)[1])


def write_shard(path: str | Path, episodes: dict[int, dict[str, np.ndarray]], attrs: dict) -> Path:
    """Write episodes ``{index: arrays}`` to ``path`` atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format_version": FORMAT_VERSION, "versions": package_versions(), **attrs})
            for index in sorted(episodes):
                _write_episode(f.create_group(episode_key(index)), episodes[index])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_episode(group: h5py.Group, episode: dict[str, np.ndarray]) -> None:
    for key, value in episode.items():
        if key == "pixels":
            group.create_dataset(key, data=value, chunks=(1, *value.shape[1:]), compression="gzip",
                                 compression_opts=3)
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = value


@dataclass(frozen=True)
class EpisodeRef:
    """Where an episode lives, and its length in actions."""

    shard: Path
    key: str
    steps: int


@dataclass
class ShardInfo:
    path: Path
    attrs: dict
    episodes: list[EpisodeRef]


def inspect_shard(path: str | Path) -> ShardInfo:
    """Open a shard and check every episode's keys, shapes and dtypes; raise ``DatasetError`` if bad."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read as HDF5 (truncated or corrupt?): {exc}") from exc
    with f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        for key in ("env", "size"):
            if key not in attrs:
                raise DatasetError(f"{path}: missing file attribute {key!r}")
        size = int(attrs["size"])
        episodes = []
        for key in sorted(f.keys()):
            try:
                steps = _check_episode(f[key], size)
            except DatasetError as exc:
                raise DatasetError(f"{path}: episode {key}: {exc}") from None
            except (OSError, KeyError, RuntimeError) as exc:
                raise DatasetError(f"{path}: episode {key} cannot be read (truncated or corrupt?): {exc}") from exc
            episodes.append(EpisodeRef(path, key, steps))
    if not episodes:
        raise DatasetError(f"{path}: holds no episodes")
    return ShardInfo(path, attrs, episodes)


def _check_episode(group, size: int) -> int:
    if not isinstance(group, h5py.Group):
        raise DatasetError("is not a group")
    missing = [k for k in EPISODE_KEYS if k not in group]
    if missing:
        raise DatasetError(f"missing keys {missing} (an episode needs {list(EPISODE_KEYS)})")
    pixels, action = group["pixels"], group["action"]
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise DatasetError(f"pixels must be uint8 (T+1, {size}, {size}, 3), got {pixels.dtype} {pixels.shape}")
    steps = pixels.shape[0] - 1
    if action.shape != (steps, 2):
        raise DatasetError(f"action must be ({steps}, 2) for {steps + 1} frames, got {action.shape}")
    for key in STATE_KEYS:
        if group[key].shape != (steps + 1, 2):
            raise DatasetError(f"{key} must be ({steps + 1}, 2), got {group[key].shape}")
    if steps < 1:
        raise DatasetError("has no actions")
    # Reading the last frame touches the end of the file: a truncated shard fails here, not mid-training.
    pixels[steps]
    return steps


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, bytes):
        return value.decode()
    return value


def find_shards(path: str | Path) -> list[Path]:
    """The shards of a dataset: a directory of ``.h5`` files, or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset (a directory of .h5 shards or one .h5 file)")
    shards = sorted(path.glob("*.h5"))
    if not shards:
        raise DatasetError(f"{path}: holds no .h5 shards")
    return shards


def inspect_dataset(paths) -> list[ShardInfo]:
    """Inspect every shard of one or many datasets and check that they belong together."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    shards = [inspect_shard(s) for p in paths for s in find_shards(p)]
    first = shards[0]
    for shard in shards[1:]:
        for key in CONSISTENT_ATTRS:
            if shard.attrs.get(key) != first.attrs.get(key):
                raise DatasetError(
                    f"shards do not belong together: {first.path} has {key}={first.attrs.get(key)!r} but "
                    f"{shard.path} has {key}={shard.attrs.get(key)!r}"
                )
    return shards
