"""Offline rollout collection: worker processes with one renderer each, shards written atomically.

Episode ``i`` of a collection is seeded from ``(seed, i)`` alone, so the data does not depend on the
number of workers or on how often the collection was interrupted and resumed. Workers only simulate
and render; the parent writes every shard, so on Ctrl-C (or SIGTERM, or a worker's crash) it can
still write each finished episode before it exits. Running the same command again collects the
episodes that are missing. Only a hard kill (SIGKILL, power loss) loses the episodes not yet in a
shard: at most ``episodes_per_shard`` per worker; the workers of a killed parent exit by themselves.
A shard that cannot be written (disk full, file size limit) stops the collection with a
``CollectionError`` saying how many episodes are saved; its temporary file is removed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import check_at_least, check_at_most, check_paths_named, option
from common.files import OutputDirError, output_dir, output_lock, remove_stale_temporaries
from common.process import ignore_stop_signals, raise_if_stopped, restore_handlers, sigterm_interrupts
from envs.policies import POLICIES, make_policy
from envs.reacher import ENV_NAMES, MAX_ACTION_REPEAT, MAX_SIZE, MIN_SIZE, make_env
from envs.storage import (DEFAULT_DATA, MIN_FRAME_SIZE, RECORDING_DEFAULTS, DatasetError, episode_index, find_shards,
                          inspect_shard, write_manifest, write_shard)

log = logging.getLogger(__name__)

# Settings that must match for a resumed collection to continue the same dataset.
RESUME_KEYS = ("env", "size", "steps", "policy", "seed", "hide_target", "render_quality", "action_repeat")
# Our shards' names: of the temporary files in --out, only theirs (``<shard>.<pid>.tmp``) are deleted.
OUR_SHARDS = r"shard_\d{6}_\d{6}\.h5"
PARENT_POLL_S = 0.5  # how often a worker checks that its parent is alive


class CollectionError(RuntimeError):
    """A collection that cannot go on (unwritable output, full disk), with what was saved."""


@dataclass
class CollectConfig:
    """wm collect: roll out an exploration policy and store pixels, actions and true states."""

    env: str = option("reacher-easy", "environment", choices=tuple(ENV_NAMES))
    size: int = option(64, "frame height and width in pixels (32..256)")
    episodes: int = option(100, "number of episodes in the dataset")
    steps: int = option(100, "actions per episode (an episode stores steps+1 frames)")
    policy: str = option("mixed", "exploration policy (mixed: half smooth sweeps, half i.i.d. jitter in place; its "
                                  "slow motion is what a model needs to hold a goal)", choices=POLICIES)
    workers: int = option(2, "worker processes, each with its own renderer")
    seed: int = option(0, "seed of the collection; episode i is seeded by (seed, i)")
    out: str = option(DEFAULT_DATA, "output directory of .h5 shards", path=True)
    episodes_per_shard: int = option(20, "episodes per shard file")
    hide_target: bool = option(True, "hide the target sphere (pose-reaching goals)")
    render_quality: str = option("fast", "fast (no shadows or reflections, about 5x faster in software) or standard",
                                 choices=("fast", "standard"))
    action_repeat: int = option(1, "control steps each action is held for (stable-worldmodel's dm_control Reacher: "
                                   "2); recorded, and replayed by every evaluation of models trained on the data")
    image_size: int | None = option(None, "store frames area-resized to this size (rendered at --size), as "
                                          "datasets of another size are resized when loaded; default: --size")

    def __post_init__(self):
        """Refuse bad settings before any work, naming the option."""
        check_paths_named(self, ("out",))
        if self.env not in ENV_NAMES:
            raise ValueError(f"env must be one of {sorted(ENV_NAMES)}, got {self.env!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("episodes", "steps", "workers", "episodes_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({name}) must be a positive integer, got {value!r}")
        check_at_least(self, MIN_SIZE, ("size",))
        check_at_most(self, MAX_SIZE, ("size",))
        if self.image_size is not None and (not isinstance(self.image_size, int)
                                            or not MIN_FRAME_SIZE <= self.image_size <= self.size):
            raise ValueError(f"--image-size (image_size) must be an integer from {MIN_FRAME_SIZE} to --size "
                             f"{self.size} (frames are rendered at --size and stored smaller, never larger), got "
                             f"{self.image_size!r}")
        check_at_least(self, 1, ("action_repeat",))
        check_at_most(self, MAX_ACTION_REPEAT, ("action_repeat",))
        check_at_least(self, 0, ("seed",))


def rollout_episode(env, policy: str, steps: int, seed: int, index: int) -> dict[str, np.ndarray]:
    """Run episode ``index`` of a collection; every draw comes from ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    obs, info = env.reset(seed=int(rng.integers(2**31 - 1)))
    act, drawn = make_policy(policy, rng)
    pixels = np.empty((steps + 1, *obs.shape), np.uint8)
    action = np.empty((steps, 2), np.float32)
    states = {k: np.empty((steps + 1, 2), np.float64) for k in info}
    pixels[0] = obs
    for k in info:
        states[k][0] = info[k]
    for t in range(steps):
        action[t] = act()
        obs, _, _, _, info = env.step(action[t])
        pixels[t + 1] = obs
        for k in info:
            states[k][t + 1] = info[k]
    return {"pixels": pixels, "action": action, **states, "policy": drawn, "index": index}


def _shard_attrs(cfg: CollectConfig) -> dict:
    """The shards' attributes: ``size`` is the stored frame size; ``render_size`` when it differs."""
    attrs = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if cfg.image_size not in (None, cfg.size):
        attrs.update(size=cfg.image_size, render_size=cfg.size)
    return attrs


def _resume_view(attrs: dict) -> dict:
    """What must match to continue a collection, with the defaults of shards written before a setting was
    recorded (their action repeat was 1)."""
    attrs = {**RECORDING_DEFAULTS, **attrs}
    return {k: attrs.get(k) for k in (*RESUME_KEYS, "render_size")}


def _resized(episode: dict, cfg: CollectConfig) -> dict:
    if cfg.image_size not in (None, cfg.size):
        from envs.dataset import resize_frames

        episode["pixels"] = resize_frames(episode["pixels"], cfg.image_size)
    return episode


def existing_episodes(cfg: CollectConfig) -> set[int]:
    """Indices already collected in ``cfg.out``; an error if that data was made with other settings."""
    out = Path(cfg.out)
    remove_stale_temporaries(out, OUR_SHARDS)  # ours, left by a hard kill while a shard was being written
    try:
        shards = find_shards(out)
    except DatasetError:
        return set()
    done: set[int] = set()
    want = _resume_view(_shard_attrs(cfg))
    for path in shards:
        info = inspect_shard(path)
        have = _resume_view(info.attrs)
        if have != want:
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            raise DatasetError(f"{path} was collected with other settings (have, asked): {diff}; "
                               f"use another --out, or the same settings to resume")
        done.update(episode_index(ref.key) for ref in info.episodes)
    return done


def plan_shards(missing: list[int], per_shard: int) -> list[list[int]]:
    """Group missing episode indices into shards: contiguous runs, at most ``per_shard`` each."""
    groups: list[list[int]] = []
    for i in sorted(missing):
        if groups and groups[-1][-1] == i - 1 and len(groups[-1]) < per_shard:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def shard_path(out: Path, indices) -> Path:
    return out / f"shard_{min(indices):06d}_{max(indices):06d}.h5"


# --- worker processes: one env (one renderer) each ----------------------------------------------
_worker_env = None
_worker_cfg: CollectConfig | None = None
_worker_error: str | None = None


def _init_worker(cfg: CollectConfig, parent: int) -> None:
    global _worker_env, _worker_cfg, _worker_error
    ignore_stop_signals()  # the parent handles Ctrl-C and SIGTERM, and writes what was finished
    _exit_with_parent(parent)
    _worker_cfg = cfg
    try:
        _worker_env = _make_collection_env(cfg)
    except Exception as exc:  # reported by the first task, so the parent sees why
        _worker_error = f"{type(exc).__name__}: {exc}"


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was SIGKILLed would wait on its task queue forever: a daemon thread exits
    the process once the parent is gone (the worker is then re-parented, so its ppid changes)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_rollout(index: int) -> dict:
    if _worker_error is not None:
        raise RuntimeError(f"collection worker could not start: {_worker_error}")
    c = _worker_cfg
    return _resized(rollout_episode(_worker_env, c.policy, c.steps, c.seed, index), c)


def _make_collection_env(cfg: CollectConfig):
    return make_env(cfg.env, size=cfg.size, hide_target=cfg.hide_target, render_quality=cfg.render_quality,
                    max_steps=cfg.steps + 1, action_repeat=cfg.action_repeat)


def _episodes_in_process(cfg: CollectConfig, indices: list[int]):
    env = _make_collection_env(cfg)
    try:
        for i in indices:
            yield _resized(rollout_episode(env, cfg.policy, cfg.steps, cfg.seed, i), cfg)
    finally:
        env.close()


def _episodes_in_workers(cfg: CollectConfig, indices: list[int], workers: int):
    """Episodes as workers finish them. A worker that dies raises BrokenProcessPool (a Pool would hang)."""
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg, os.getpid()))
    futures = [ex.submit(_worker_rollout, i) for i in indices]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        # Stop what has not started; episodes in flight finish (under a second each) and are dropped.
        ex.shutdown(wait=True, cancel_futures=True)


def collect(cfg: CollectConfig, progress: bool = True) -> dict:
    """Collect until ``cfg.out`` holds ``cfg.episodes`` episodes; returns a summary. ``cfg.out`` is locked
    meanwhile, and records how many episodes it should hold (``storage.MANIFEST``), so an interrupted
    collection says it is short when opened.

    ``collected`` counts the episodes simulated by this call, ``saved`` those written to shards."""
    out = Path(cfg.out)
    with ExitStack() as held:  # a collection that fails before writing anything leaves no empty directory
        try:
            held.enter_context(output_dir(out))
        except OutputDirError as exc:
            raise CollectionError(f"cannot write to the output directory {out}: {exc.reason}; choose another "
                                  f"--out or fix its permissions") from None
        held.enter_context(output_lock(out))
        return _collect(cfg, out, progress)


def _collect(cfg: CollectConfig, out: Path, progress: bool) -> dict:
    """``collect`` once ``out`` is checked and locked."""
    done = existing_episodes(cfg)
    beyond = sorted(i for i in done if i >= cfg.episodes)
    if beyond:  # the manifest would shrink below what the directory holds
        raise CollectionError(f"{out} already holds {len(done)} episodes (up to episode {beyond[-1]}), more than "
                              f"--episodes {cfg.episodes}; pass --episodes {beyond[-1] + 1} or more to extend it, or "
                              f"another --out")
    missing = [i for i in range(cfg.episodes) if i not in done]
    summary = {"out": str(out), "episodes": cfg.episodes, "already_there": cfg.episodes - len(missing),
               "collected": 0, "saved": 0, "frames_per_s": None}
    write_manifest(out, cfg.episodes)
    if not missing:
        return summary

    groups = plan_shards(missing, cfg.episodes_per_shard)
    shard_of = {i: g for g in groups for i in g}
    pending: dict[tuple, dict[int, dict]] = {}
    attrs = _shard_attrs(cfg)

    def flush(group: tuple) -> None:
        episodes = pending[group]  # dropped once written: an interruption mid-write leaves it for the last flush
        path = shard_path(out, episodes)
        try:
            write_shard(path, episodes, attrs)
        except OSError as exc:  # disk full, file size limit, ...: write_shard removed its temporary file
            saved = len(done) + summary["saved"]
            raise CollectionError(f"could not write {path.name} ({exc.strerror or exc}); {saved}/{cfg.episodes} "
                                  f"episodes are saved in {out}; free some space and run the same command "
                                  f"again to resume") from exc
        del pending[group]
        summary["saved"] += len(episodes)

    bar = tqdm(total=len(missing) * (cfg.steps + 1), unit="frame", desc=f"collect {out.name}",
               disable=not progress, smoothing=0.1)
    start = time.perf_counter()
    old_handlers = sigterm_interrupts(ignore_file_size_signal=True)
    workers = min(cfg.workers, len(missing))
    results = (_episodes_in_process(cfg, missing) if workers == 1 else _episodes_in_workers(cfg, missing, workers))
    try:
        for episode in results:
            group = tuple(shard_of[episode["index"]])
            pending.setdefault(group, {})[episode["index"]] = episode
            raise_if_stopped()  # a stop swallowed while the worker processes started: this episode is kept
            summary["collected"] += 1
            bar.update(cfg.steps + 1)
            if len(pending[group]) == len(group):
                flush(group)
    except CollectionError:
        results.close()  # stop the workers; nothing more can be written
        bar.close()
        raise
    except BaseException:
        # Ctrl-C, SIGTERM or a worker's error: keep every finished episode, then stop.
        results.close()
        bar.close()
        try:
            for group in list(pending):
                flush(group)
        finally:
            log.warning("collection stopped: %d/%d episodes are saved in %s; run the same command again to resume",
                        len(done) + summary["saved"], cfg.episodes, out)
        raise
    finally:
        restore_handlers(old_handlers)
    bar.close()
    elapsed = time.perf_counter() - start
    summary["frames_per_s"] = summary["collected"] * (cfg.steps + 1) / elapsed
    return summary


