"""``wm bench collect``: rendering, collection and loader throughput, and policy coverage.

Every speed is printed next to a baseline measured in the same run, as a ratio: the settings of a table take
turns (``benchmarks.timing.round_robin``), and a ratio is the median (min-max) over rounds.
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np

from benchmarks.timing import absolute_shown, markdown_table, paired_ratio, round_robin
from common.text import counted
from envs.collect import CollectConfig, collect
from envs.dataset import EpisodeStore, WindowDataset, WindowSpec
from envs.policies import make_policy
from envs.reacher import ReacherPixels

LOADER_DATA_MB = 128  # frames of the loader benchmark (the size its earlier runs used, so rows compare)


def _rate(fn, n: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def bench_render(size: int, n: int = 200, repeats: int = 3) -> dict[str, list[float]]:
    """Step+render frames/s, ``repeats`` runs of ``n`` frames each, in rounds: dm_control's own
    ``physics.render`` (the baseline) and our renderer at both looks."""
    standard = ReacherPixels(size=size, render_quality="standard")
    fast = ReacherPixels(size=size, render_quality="fast")
    try:
        for env in (standard, fast):
            env.reset(seed=0)
        physics = standard.physics._physics
        runs = {"dm_control physics.render": lambda: _rate(lambda: (standard.physics.step(np.zeros(2)),
                                                                    physics.render(size, size, camera_id="fixed")), n),
                "ours, standard quality": lambda: _rate(lambda: standard.step(np.zeros(2)), n),
                "ours, fast quality": lambda: _rate(lambda: fast.step(np.zeros(2)), n)}
        return round_robin(runs, dict.fromkeys(runs, repeats))
    finally:
        standard.close()
        fast.close()


def bench_collect(size: int, workers: int, episodes_per_worker: int = 30, steps: int = 100) -> float:
    """Frames/s of a whole ``collect`` (process start, render, compress, write) into a temp dir; 30
    episodes per worker, so that starting the worker processes (a few seconds) is amortised."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CollectConfig(size=size, workers=workers, episodes=workers * episodes_per_worker, steps=steps,
                            out=tmp)
        return collect(cfg, progress=False)["frames_per_s"]


def bench_loader(data_dir: str, spec: WindowSpec, batch_size: int = 64, batches: int = 30,
                 repeats: int = 3) -> dict[str, list[float]]:
    """Windows/s drawn at random through a DataLoader, ``repeats`` runs of ``batches`` batches each, in
    rounds: from disk (the baseline) and from memory."""
    import torch
    from torch.utils.data import DataLoader

    def timer(in_memory: bool):
        ds = WindowDataset(EpisodeStore(data_dir, in_memory=in_memory), spec, split="all")
        sampler = torch.utils.data.RandomSampler(ds, replacement=True,
                                                 num_samples=(repeats * batches + 1) * batch_size,
                                                 generator=torch.Generator().manual_seed(0))
        it = iter(DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0))
        next(it)  # warm up

        def run() -> float:
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            return batches * batch_size / (time.perf_counter() - start)
        return run

    runs = {"from disk (h5py, open handles)": timer(False), "in memory": timer(True)}
    return round_robin(runs, dict.fromkeys(runs, repeats))


def policy_coverage(policy: str, episodes: int = 20, steps: int = 100, bins: int = 20) -> dict:
    """How much of the joint space one episode explores: cells of a ``bins x bins`` grid over
    (shoulder, wrist) visited per episode, and the mean joint displacement over 25 steps."""
    env = ReacherPixels(size=32)
    physics = env.physics
    cells, moved = [], []
    for ep in range(episodes):
        rng = np.random.default_rng([1, ep])
        env.reset(seed=ep)
        act, _ = make_policy(policy, rng)
        q = [physics.qpos()]
        for _ in range(steps):
            physics.step(act())  # the dynamics alone: coverage needs no frames
            q.append(physics.qpos())
        q = np.stack(q)
        shoulder = (q[:, 0] + math.pi) % (2 * math.pi) - math.pi
        lo, hi = physics.wrist_range
        grid = np.stack([(shoulder + math.pi) / (2 * math.pi), (q[:, 1] - lo) / (hi - lo)], 1)
        cells.append(len({tuple(c) for c in np.clip((grid * bins).astype(int), 0, bins - 1)}))
        moved.append(np.abs(q[25:] - q[:-25]).sum(1).mean())
    env.close()
    return {"cells_per_episode": float(np.mean(cells)), "displacement_25_steps": float(np.mean(moved))}


def run(sizes=(64, 224), workers=(1, 2), repeats: int = 3) -> str:
    """Run every collection benchmark; returns a Markdown report (rates in frames or windows per second on a
    GPU machine only: ``benchmarks.timing.absolute_shown``). Each table's settings take turns, ``repeats``
    rounds; rates are medians, ratios the median (min-max) over rounds."""
    absolute = absolute_shown()
    lines = ["## Rendering: step + render, one process", "",
             "Like for like: dm_control's own `physics.render` against our renderer at the same look (shadows and "
             f"reflections on); then what our fast look (both off) buys. {counted(repeats, 'round')} of 200 frames "
             f"of each.", ""]
    rows = []
    for size in sizes:
        r = bench_render(size, repeats=repeats)
        base, ours, fast = r["dm_control physics.render"], r["ours, standard quality"], r["ours, fast quality"]
        rows.append([str(size), f"{np.median(base):.0f}", f"{np.median(ours):.0f}", paired_ratio(ours, base),
                     f"{np.median(fast):.0f}", paired_ratio(fast, ours)])
    lines += markdown_table([("size", False), ("dm_control physics.render, frames/s (baseline)", True),
                             ("ours, standard look, frames/s", True), ("ours / baseline", False),
                             ("ours, fast look, frames/s", True), ("fast / standard", False)], rows, absolute)
    lines += ["", "## Collection: `wm collect`, whole pipeline incl. process start, gzip and writes", "",
              f"{counted(repeats, 'round')} of one collection at each worker count.", ""]
    rows = []
    for size in sizes:
        runs = {w: (lambda w=w: bench_collect(size, w)) for w in workers}
        rates = round_robin(runs, dict.fromkeys(runs, repeats))
        rows.append([str(size), *(f"{np.median(rates[w]):.0f}" for w in workers),
                     paired_ratio(rates[workers[-1]], rates[workers[0]])])
    lines += markdown_table([("size", False), *((f"{w} worker{'s' if w > 1 else ''}, frames/s", True) for w in workers),
                             (f"{workers[-1]} / {workers[0]} workers", False)], rows, absolute)
    lines += ["", "## Loader: random windows of 4 frames, frameskip 5, batch 64", "",
              f"From disk every window's frames are read and decompressed from the file (our shards keep no chunk "
              f"cache), as from a dataset too large for memory; about {LOADER_DATA_MB} MB of frames. "
              f"{counted(repeats, 'round')} of 30 batches from each.", ""]
    rows = []
    for size in sizes:
        episodes = loader_episodes(size)
        with tempfile.TemporaryDirectory() as tmp:
            collect(CollectConfig(size=size, episodes=episodes, steps=100, workers=max(workers), out=tmp,
                                  episodes_per_shard=episodes), progress=False)
            r = bench_loader(tmp, WindowSpec(history=3, n_pred=1, frameskip=5), repeats=repeats)
        disk, mem = r["from disk (h5py, open handles)"], r["in memory"]
        rows.append([str(size), f"{episodes * 101 * size * size * 3 / 1e6:.0f}", f"{np.median(disk):.0f}",
                     f"{np.median(mem):.0f}", paired_ratio(mem, disk)])
    lines += markdown_table([("size", False), ("data (MB of frames)", False),
                             ("from disk, windows/s (baseline)", True), ("in memory, windows/s", True),
                             ("memory / disk", False)], rows, absolute)
    lines += ["", "## Exploration coverage per 100-step episode (20 episodes)", "",
              "| policy | joint-grid cells visited (of 400) | mean joint displacement over 25 steps (rad) |",
              "|---|---|---|"]
    for policy in ("random", "smooth", "mixed"):
        c = policy_coverage(policy)
        lines.append(f"| {policy} | {c['cells_per_episode']:.1f} | {c['displacement_25_steps']:.2f} |")
    return "\n".join(lines)


def loader_episodes(size: int, frames_per_episode: int = 101) -> int:
    """Episodes of 100 steps whose frames fill about ``LOADER_DATA_MB``."""
    return -(-LOADER_DATA_MB * 1_000_000 // (frames_per_episode * size * size * 3))
