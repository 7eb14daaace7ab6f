"""``wm demo``: planning videos. Each frame shows, side by side, what the camera sees, the goal image,
and what the model expects: the dataset frame whose latent is nearest to the latent the model predicts
for the end of its current plan (a retrieval, not a decoder: the model has no pixel decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from envs.dataset import EpisodeStore
from envs.video import upscale, write_video
from planners.evaluate import PROTOCOLS, joint_error, load_setup, sample_episodes
from planners.policy import MPCPolicy, make_planner


@dataclass
class DemoConfig:
    """``wm demo``: mp4 and gif planning videos, and a summary sheet of first, last and goal frames."""

    checkpoint: str = field(default="runs/demo/model.pt", metadata={"help": "model.pt of a trained run"})
    data: str = field(default="runs/demo/data", metadata={"help": "dataset: held-out episodes give start and goal; "
                                                                  "its frames are the retrieval bank"})
    episodes: int = field(default=4, metadata={"help": "episodes (one video each)"})
    protocol: str = field(default="reach25", metadata={"help": "reach25, reach50 or uniform"})
    planner: str = field(default="cem", metadata={"help": "cem or mppi"})
    samples: int = field(default=300, metadata={"help": "planner candidates per iteration"})
    iterations: int = field(default=30, metadata={"help": "planner iterations per replan"})
    horizon: int = field(default=5, metadata={"help": "planned action chunks"})
    cost: str = field(default="sum", metadata={"help": "planner cost: sum or final"})
    seed: int = field(default=0, metadata={"help": "episode and planner seed"})
    tolerance: float = field(default=0.05, metadata={"help": "success: every joint within this many rad"})
    bank_frames: int = field(default=20000, metadata={"help": "most dataset frames in the retrieval bank"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    out: str = field(default="runs/demo/videos", metadata={"help": "output directory"})


@torch.no_grad()
def frame_bank(model, store: EpisodeStore, most: int) -> tuple[torch.Tensor, np.ndarray]:
    """Latents (N, D) and frames (N, H, W, 3) of up to ``most`` dataset frames, spread over episodes."""
    per = max(1, most // max(1, len(store)))
    frames = []
    for i in range(len(store)):
        steps = store.episodes[i].steps
        frames.append(store.frames(i, np.unique(np.linspace(0, steps, min(per, steps + 1)).astype(int))))
    frames = np.concatenate(frames)[:most]
    z = torch.cat([model.encode(torch.from_numpy(frames[s:s + 1024]).to(model.device)).float()
                   for s in range(0, len(frames), 1024)])
    return z, frames


def caption(panel: np.ndarray, text: str, colour=(255, 255, 255)) -> np.ndarray:
    """``panel`` with a strip of text above it."""
    image = Image.new("RGB", (panel.shape[1], panel.shape[0] + 16), (20, 20, 20))
    image.paste(Image.fromarray(panel), (0, 16))
    ImageDraw.Draw(image).text((3, 2), text, fill=colour)
    return np.asarray(image)


def compose(obs, goal, expected, step: int, error: float, success: bool) -> np.ndarray:
    """One video frame: [camera | goal | model's expectation], each captioned."""
    obs, goal, expected = (upscale(x[None], 160)[0] for x in (obs, goal, expected))
    state = "reached" if success else f"err {error:.3f} rad"
    return np.concatenate([caption(obs, f"step {step}  {state}", (120, 255, 120) if success else (255, 255, 255)),
                           caption(goal, "goal"), caption(expected, "model expects (nearest frame)")], 1)


def make_demo(cfg: DemoConfig) -> dict:
    model, store, held_out, batch = load_setup(cfg.checkpoint, cfg.data, cfg.episodes, cfg.device)
    try:
        bank_z, bank_frames = frame_bank(model, store, cfg.bank_frames)
        eps = sample_episodes(store, held_out, cfg.protocol, cfg.episodes, cfg.seed, batch.physics.wrist_range)
        goals = batch.render_goals(eps["goal_qpos"])
        policy = MPCPolicy(model, make_planner(model, cfg.planner, samples=cfg.samples, iterations=cfg.iterations,
                                               horizon=cfg.horizon, cost=cfg.cost, seed=cfg.seed))
        policy.reset(goals)
        frames = batch.reset_to(eps["qpos"], eps["qvel"], eps["target"])
        first = frames.copy()
        reached = np.zeros(cfg.episodes, bool)
        videos = [[] for _ in range(cfg.episodes)]
        for step in range(PROTOCOLS[cfg.protocol][1] + 1):
            error = joint_error(batch.states()["qpos"], eps["goal_qpos"])
            reached |= error < cfg.tolerance
            actions = policy.act_batch(frames) if step < PROTOCOLS[cfg.protocol][1] else None
            nearest = torch.cdist(policy.last_prediction.float(), bank_z).argmin(1).cpu().numpy()
            for i in range(cfg.episodes):
                videos[i].append(compose(frames[i], goals[i], bank_frames[nearest[i]], step, error[i], reached[i]))
            if actions is not None:
                frames = batch.step(actions)
    finally:
        batch.close()
    out = Path(cfg.out)
    written = [p for i, v in enumerate(videos) for p in write_video(out / f"episode_{i:02d}.mp4", np.stack(v), gif=True)]
    sheet = summary_sheet(first, frames, goals, reached)
    Image.fromarray(sheet).save(out / "summary.png")
    return {"videos": [str(p) for p in written], "summary_sheet": str(out / "summary.png"),
            "success": reached.tolist()}


def summary_sheet(first: np.ndarray, last: np.ndarray, goals: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Rows of [first | last | goal] per episode."""
    rows = [np.concatenate([caption(upscale(f[None], 128)[0], f"episode {i} start"),
                            caption(upscale(l[None], 128)[0], "reached" if ok else "end (missed)",
                                    (120, 255, 120) if ok else (255, 120, 120)),
                            caption(upscale(g[None], 128)[0], "goal")], 1)
            for i, (f, l, g, ok) in enumerate(zip(first, last, goals, reached))]
    return np.concatenate(rows, 0)
