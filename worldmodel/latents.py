"""Latents of dataset frames: what the subgoal graph, the probes and the videos' retrieval bank encode."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor


def every(stride: int) -> Callable[[int], np.ndarray]:
    """Frame positions 0, stride, 2 stride, ... of an episode of ``steps`` actions (``steps + 1`` frames)."""
    return lambda steps: np.arange(0, steps + 1, stride)


@torch.no_grad()
def encode_episodes(model, store, episode_ids, positions: Callable[[int], np.ndarray], batch_size: int | None = None,
                    keep_frames: bool = False) -> dict:
    """Latents of the frames ``positions(steps)`` of each episode of ``episode_ids``, in eval mode (the
    projector's BatchNorm uses, and keeps, its running statistics).

    ``batch_size`` None encodes each episode's frames in one call as they are read (memory: one episode);
    an integer encodes all frames in batches of that size. Returns ``z`` (N, D) float32 on the model's
    device, ``episode`` (N,) and ``t`` (N,) numpy arrays, ``counts`` (frames per episode), and with
    ``keep_frames`` the ``frames`` (N, H, W, 3) uint8.
    """
    was_training = model.training
    model.eval()
    try:
        frames, episode, t, counts, z = [], [], [], [], []
        for i in episode_ids:
            index = np.asarray(positions(store.episodes[i].steps), dtype=np.int64)
            f = store.frames(i, index)
            if batch_size is None:
                z.append(_encode(model, f))
            if batch_size is not None or keep_frames:
                frames.append(f)
            episode.append(np.full(len(index), i))
            t.append(index)
            counts.append(len(index))
        if batch_size is not None:
            everything = np.concatenate(frames)
            z = [_encode(model, everything[s:s + batch_size]) for s in range(0, len(everything), batch_size)]
    finally:
        model.train(was_training)
    out = {"z": torch.cat(z), "episode": np.concatenate(episode), "t": np.concatenate(t), "counts": counts}
    if keep_frames:
        out["frames"] = np.concatenate(frames)
    return out


def _encode(model, frames: np.ndarray) -> Tensor:
    return model.encode(torch.from_numpy(np.ascontiguousarray(frames)).to(model.device)).float()
