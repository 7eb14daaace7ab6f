"""``wm demo``: planning videos. Each frame shows, side by side, what the camera sees, the goal image,
and what the model expects: the dataset frame whose latent is nearest to the latent the model predicts
for the end of its current plan (a retrieval, not a decoder: the model has no pixel decoder)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.config import check_at_least, check_some_path_exists, nested, option, path_list
from common.device import THREADS_HELP
from common.files import atomic_write, atomic_write_json, atomic_write_text, output_dir, output_lock
from common.provenance import provenance, signed
from envs.dataset import EpisodeStore
from envs.reacher import GOAL_TOLERANCE, joint_error
from envs.video import check_ffmpeg, upscale, write_video
from evaluation.evaluate import (DEFAULT_CHECKPOINT, EvalConfig, Setup, batch_recorded, load_setup,
                                 world_model_controller)
from evaluation.html import demo_page
from evaluation.protocols import PROTOCOL_NAMES, PROTOCOLS, protocol_named, sample_episodes
from planners.policy import PolicyConfig, check_context, check_policy_device
from worldmodel.datasplit import HELD_OUT, resolve_data
from worldmodel.latents import encode_episodes
from worldmodel.model import WorldModel, read_model_meta

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """``wm demo``: mp4 and gif planning videos, and a summary sheet of first, last and goal frames."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run", path=True)
    data: str = option("", "dataset: its --split episodes give starts and goals, its training frames the retrieval "
                           "bank (default: the one the model was trained on; with --goal-pose and --start-pose, "
                           "the model file alone serves when that is not at hand)", path=True)
    split: str = option("test", "the model's episodes that give starts and goals: test or val", choices=HELD_OUT)
    episodes: int = option(4, "episodes (one video each)")
    protocol: str = option("reach25", f"which goals (and budget and success rule, with --goal-pose): "
                                      f"{PROTOCOL_NAMES}")
    goal_pose: str = option("", "goal poses of your own instead of the protocol's, one video each: 'shoulder,wrist' "
                                "in rad, several separated by ';' (--episodes is then their number)")
    start_pose: str = option("", "with --goal-pose: the start pose 'shoulder,wrist' in rad, at rest, for every video "
                                 "or one per goal separated by ';' (default: the protocol's held-out start rows)")
    goal_sequence: bool = option(False, "with --goal-pose: one video (sequence.mp4) visiting the poses in turn from "
                                        "one start, each for the protocol's budget; each goal reported")
    policy: PolicyConfig = nested(PolicyConfig, "the MPC policy", flat=True)
    seed: int = option(0, "episode and planner seed")
    tolerance: float = option(GOAL_TOLERANCE, "success: every joint within this many rad")
    bank_frames: int = option(20000, "most dataset frames in the retrieval bank")
    gif: bool = option(True, "also write a gif beside each mp4")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)
    out: str = option("", "output directory (default: videos/ beside the checkpoint)", path=True)
    overwrite: bool = option(False, "replace a demo already in --out (its videos, sheet and page are removed first)")

    def __post_init__(self):
        if len(path_list(self.checkpoint)) > 1:
            check_some_path_exists(self.checkpoint)
            raise ValueError(f"--checkpoint: wm demo films one model, got {self.checkpoint!r}")
        protocol_named(self.protocol)
        check_at_least(self, 1, ("episodes", "bank_frames"))
        check_at_least(self, 0, ("seed",))
        check_at_least(self, 0, ("tolerance",), strictly=True)
        check_policy_device(self.policy, self.device)
        goals, starts = parse_poses(self.goal_pose, "--goal-pose"), parse_poses(self.start_pose, "--start-pose")
        if self.goal_pose and not len(goals):
            raise ValueError(f"--goal-pose: no pose in {self.goal_pose!r}; give 'shoulder,wrist' in rad")
        if self.start_pose and not self.goal_pose:
            raise ValueError("--start-pose is for your own goals: give --goal-pose too")
        if self.start_pose and not len(starts):
            raise ValueError(f"--start-pose: no pose in {self.start_pose!r}; give 'shoulder,wrist' in rad")
        if self.goal_sequence and not self.goal_pose:
            raise ValueError("--goal-sequence visits the poses of --goal-pose: give --goal-pose too")
        if self.goal_sequence and len(starts) > 1:
            raise ValueError(f"--start-pose: a sequence has one start, got {len(starts)} poses")
        if len(starts) not in (0, 1, len(goals)):
            raise ValueError(f"--start-pose: {len(starts)} poses for {len(goals)} goals; give one, or one per goal")
        if self.goal_pose and protocol_named(self.protocol).stored_frames:
            rendered = ", ".join([name for name, p in PROTOCOLS.items() if not p.stored_frames] + ["reachK"])
            raise ValueError(f"--goal-pose: the {self.protocol} protocol's goals are the dataset's stored frames; "
                             f"choose a protocol whose goals are rendered ({rendered})")
        if self.goal_pose:
            self.episodes = 1 if self.goal_sequence else len(goals)  # the environments filmed

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoint).parent / "videos"


def parse_poses(text: str, name: str) -> np.ndarray:
    """Poses (K, 2) in rad from 'shoulder,wrist;shoulder,wrist' (K = 0 for ''); a clear error naming ``name``."""
    poses = []
    parts = [p.strip() for p in text.split(";")]
    while parts and not parts[-1]:
        parts.pop()  # trailing ';' end the list
    for part in parts:
        if not part:
            raise ValueError(f"{name}: an empty pose in {text!r}; give 'shoulder,wrist' poses separated by ';'")
        try:
            pose = [float(v) for v in part.split(",")]
        except ValueError:
            pose = []
        if len(pose) != 2 or not np.isfinite(pose).all():
            raise ValueError(f"{name}: {part!r} is not a pose 'shoulder,wrist' of two finite angles in rad")
        poses.append(pose)
    return np.asarray(poses, np.float64).reshape(-1, 2)


def own_goals(cfg: DemoConfig, eps: dict, wrist_range: tuple[float, float]) -> dict:
    """The protocol's episodes ``eps`` with the goals of --goal-pose, and with --start-pose the starts too
    (at rest, no frames before them: the history is padded as at an episode's first step)."""
    goals, starts = parse_poses(cfg.goal_pose, "--goal-pose"), parse_poses(cfg.start_pose, "--start-pose")
    low, high = wrist_range
    for name, poses in (("--goal-pose", goals), ("--start-pose", starts)):
        if ((poses[:, 1] < low) | (poses[:, 1] > high)).any():
            raise ValueError(f"{name}: a wrist angle beyond the joint limit [{low:.3f}, {high:.3f}] rad")
    eps = dict(eps, goal_qpos=goals)  # (K, 2): one per environment, or in turn for the one of a sequence
    if len(starts):
        n = len(eps["index"])
        eps.update(qpos=np.broadcast_to(starts, (n, 2)).copy(), qvel=np.zeros((n, 2)), t0=np.zeros(n, int),
                   target=np.full((n, 2), np.nan))
    return eps


def posed_episodes(n: int) -> dict:
    """``n`` episodes of no dataset, for ``own_goals`` to fill with poses of your own: at rest, at their first
    step (no frames before it), the target hidden."""
    zeros = np.zeros((n, 2))
    return {"index": np.arange(n), "episode": np.full(n, -1), "t0": np.zeros(n, int), "qpos": zeros, "qvel": zeros,
            "target": np.full((n, 2), np.nan), "goal_qpos": zeros}


def frame_bank(model, store: EpisodeStore, episode_ids: list[int], most: int) -> tuple[torch.Tensor, np.ndarray]:
    """Latents (N, D) and frames (N, H, W, 3) of up to ``most`` frames of ``episode_ids``, spread over them."""
    per = max(1, most // max(1, len(episode_ids)))
    spread = lambda steps: np.unique(np.linspace(0, steps, min(per, steps + 1)).astype(int))  # noqa: E731
    encoded = encode_episodes(model, store, episode_ids, spread, batch_size=1024, keep_frames=True)
    return encoded["z"][:most], encoded["frames"][:most]


def caption(panel: np.ndarray, text: str, colour=(255, 255, 255)) -> np.ndarray:
    """``panel`` with a strip of text above it."""
    image = Image.new("RGB", (panel.shape[1], panel.shape[0] + 16), (20, 20, 20))
    image.paste(Image.fromarray(panel), (0, 16))
    ImageDraw.Draw(image).text((3, 2), text, fill=colour)
    return np.asarray(image)


def compose(label: str, obs, goal, expected, waypoint, step: int, error: float, within: bool,
            reached: bool) -> np.ndarray:
    """One video frame: [camera | goal | model's expectation | current waypoint], each captioned. The
    protocol, episode, step (counted from the goal in play) and joint error are on every frame, so drifting
    away after arrival shows (green while within tolerance); the waypoint panel shows the training frame the
    planner is heading for while the goal is far. ``expected`` or ``waypoint`` None: no such panel (no
    training frames, or no subgoals)."""
    text = f"{label} step {step} err {error:.3f} rad" + (" reached" if reached else "")
    colour = (120, 255, 120) if within else ((255, 200, 120) if reached else (255, 255, 255))
    panels = [(obs, text, colour), (goal, "goal", None), (expected, "model expects (nearest frame)", None),
              (waypoint, "heading for (waypoint)", None)]
    return np.concatenate([caption(upscale(x[None], 160)[0], words, *([c] if c else []))
                           for x, words, c in panels if x is not None], 1)


class FilmedFrame(NamedTuple):
    """What one video frame shows, kept at the camera's size until the video is written: composed frames
    are about 28x larger, and a demo of 50 far goals would hold gigabytes of them."""

    goal: int  # which of the environment's goals is in play
    step: int  # counted from that goal's first step
    obs: np.ndarray  # (H, W, 3) uint8: the camera
    expected: int  # the bank frame nearest to what the model expects; -1: no bank (no dataset)
    waypoint: int | None  # the bank frame heading for; -1: the goal itself; None: no subgoals
    error: float
    within: bool
    reached: bool


DEMO_FILES = re.compile(r"((episode|goal)_\d+|sequence)\.(mp4|gif)|summary\.png|demo\.json|demo\.md|index\.html")


def prepare_demo_dir(cfg: DemoConfig, out: Path) -> None:
    """The output directory, checked before any work: a finished demo already there (its demo.json, written
    last) is refused unless --overwrite, which removes all of its files (no stale video of another run is
    left beside the new ones); the videos of an interrupted demo are removed with a message."""
    if (out / "results.json").exists():
        raise ValueError(f"{out} holds finished results (results.json: an evaluation's or a study's), whose "
                         f"index.html a demo would replace; choose another --out")
    earlier = [p for p in out.iterdir() if DEMO_FILES.fullmatch(p.name)]
    finished = (out / "demo.json").exists()
    if finished and not cfg.overwrite:
        raise ValueError(f"{out} already holds a demo ({len(earlier)} files); pass --overwrite to replace it, or "
                         f"--out for another directory")
    if earlier and not finished:
        log.warning(f"{out}: removing {len(earlier)} file(s) of a demo that did not finish (no demo.json)")
    for path in earlier:
        path.unlink()


def make_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """``wm demo``: film episodes of the world-model policy, one demo at a time in a directory."""
    with output_dir(cfg.out_dir) as out, output_lock(out):
        return _make_demo(cfg, out, progress)


def demo_setup(cfg: DemoConfig) -> Setup:
    """What a demo films with: the model's dataset (its held-out starts and goals, its training frames for the
    retrieval panels), or, for goals and starts all of your own (--goal-pose, --start-pose) when no --data is
    given and the dataset the model records is not at hand, the model file alone: its environments rebuilt
    from the recording the model keeps of its data, and no retrieval panels (no frames to retrieve)."""
    if cfg.data:
        return load_setup(cfg.checkpoint, cfg.data, cfg.episodes, cfg.device, cfg.split)
    meta = read_model_meta(cfg.checkpoint)
    try:
        resolve_data(meta, cfg.checkpoint)
    except ValueError as exc:
        missing = str(exc)
    else:
        return load_setup(cfg.checkpoint, "", cfg.episodes, cfg.device, cfg.split)
    if not cfg.start_pose:  # the starts are the dataset's rows
        raise ValueError(missing + ("; or give --start-pose too, to film your goal poses from the model file alone"
                                    if cfg.goal_pose else "; or give --goal-pose and --start-pose, to film poses of "
                                                          "your choosing from the model file alone"))
    rec = (meta.get("data") or {}).get("recording")
    if not isinstance(rec, dict):
        raise ValueError(f"{missing}; and {cfg.checkpoint} does not record how its data was rendered (a model of an "
                         f"earlier version), so its environments cannot be rebuilt without it")
    model = WorldModel.load(cfg.checkpoint, cfg.device)
    log.warning(f"{cfg.checkpoint}: its dataset is not at hand (no --data, and none where it was recorded); "
                f"filming from the model file alone: its environments as its data was recorded, without the panels "
                f"of training frames (what the model expects, the waypoint)")
    batch = batch_recorded(rec, model.cfg.image_size, cfg.episodes)
    return Setup(model, meta, None, [], "no dataset", batch, str(cfg.checkpoint))


def _make_demo(cfg: DemoConfig, out: Path, progress: bool) -> dict:
    protocol = protocol_named(cfg.protocol)
    prepare_demo_dir(cfg, out)  # the output and ffmpeg are checked before any work
    check_ffmpeg()
    setup = demo_setup(cfg)
    model, store, batch = setup.model, setup.store, setup.batch
    try:
        if "context" not in protocol.policy:  # (the lewm protocols fix their own)
            check_context(cfg.policy, model.history)  # before the retrieval bank is encoded
        if store is None or (cfg.goal_pose and cfg.start_pose):  # poses all of your own: no protocol rows needed
            eps = own_goals(cfg, posed_episodes(cfg.episodes), batch.physics.wrist_range)
        else:
            eps = sample_episodes(store, setup.episodes, protocol, cfg.episodes, cfg.seed, batch.physics.wrist_range,
                                  cfg.tolerance)
            if cfg.goal_pose:
                eps = own_goals(cfg, eps, batch.physics.wrist_range)
        if store is None:  # from the model file alone: no frames to show what the model expects
            bank_z = bank_frames = None
        else:
            # what the model expects is shown as a frame it was trained on, never one of the filmed episodes
            filmed = set(setup.episodes)
            bank_ids = setup.train or [i for i in range(len(store)) if i not in filmed]
            if progress:
                kind = "training episodes" if setup.train else "episodes not filmed (the model trained on none here)"
                log.info(f"retrieval bank: encoding up to {cfg.bank_frames} frames of {len(bank_ids)} {kind}")
            bank_z, bank_frames = frame_bank(model, store, bank_ids, cfg.bank_frames)
        n, budget = len(eps["index"]), protocol.budget  # environments filmed, steps per goal
        segments = eps["goal_qpos"].reshape(-1, n, 2)  # (S, n, 2): the goals each environment heads for in turn
        rendered = batch.render_goals(segments.reshape(-1, 2))
        goals = rendered.reshape(*segments.shape[:2], *rendered.shape[1:])  # (S, n, H, W, 3)
        eval_cfg = EvalConfig(checkpoint=cfg.checkpoint, policy=cfg.policy, episodes=n)
        _, policy, _ = world_model_controller(setup, eval_cfg, protocol, {**eps, "goal_qpos": segments[0]}, goals[0],
                                              cfg.seed)
        frames = batch.reset_to(eps["qpos"], eps["qvel"], eps["target"])
        firsts, lasts, starts = [frames.copy()], [], [batch.qpos()]  # per goal: where each began and ended
        reached, final = np.zeros(segments.shape[:2], bool), np.zeros(segments.shape[:2])
        shots = [[] for _ in range(n)]  # per environment, a FilmedFrame per step
        nearest = lambda z: torch.cdist(z.float(), bank_z).argmin(1).cpu().numpy()  # noqa: E731
        banked = bank_z is not None  # the retrieval panels: training frames to show
        def label(i: int, seg: int) -> str:  # what a frame of environment i, heading for goal seg, is
            if cfg.goal_sequence:
                return f"goal {seg}"
            return f"goal {int(eps['index'][i])}" if cfg.goal_pose else f"{protocol.name} ep {int(eps['index'][i])}"
        steps = len(segments) * budget
        for step in tqdm(range(steps + 1), desc="demo", unit="step", disable=not progress):
            seg, into = divmod(step, budget)
            if step and not into:  # the end of goal seg - 1; then, in a sequence, on to the next goal
                final[seg - 1] = joint_error(batch.qpos(), segments[seg - 1], protocol.wrap)
                reached[seg - 1] |= final[seg - 1] < cfg.tolerance
                lasts.append(frames.copy())
                if seg == len(segments):
                    seg, into = seg - 1, budget  # the last frame: still the last goal's
                else:
                    policy.retarget(goals[seg])
                    firsts.append(frames.copy())
                    starts.append(batch.qpos())
            error = joint_error(batch.qpos(), segments[seg], protocol.wrap)
            within = (error < cfg.tolerance) & (into > 0)  # success counts from a goal's first step on
            reached[seg] |= within
            actions = policy.act_batch(frames) if step < steps else None  # the frames filmed
            expected = nearest(policy.last_prediction) if banked else np.full(n, -1)
            heading = policy.last_target if policy.graph is not None and banked else None
            waypoint = None if heading is None else nearest(heading)
            to_goal = None if heading is None else policy._route.to_goal.cpu().numpy()
            for i in range(n):
                wp = None if waypoint is None else (-1 if to_goal[i] else int(waypoint[i]))
                shots[i].append(FilmedFrame(seg, into, frames[i].copy(), int(expected[i]), wp, float(error[i]),
                                            bool(within[i]), bool(reached[seg, i])))
            if actions is not None:
                frames = batch.step(actions)
    finally:
        batch.close()
    # episode j is the same whatever --episodes is; goal j is the j-th of --goal-pose
    names = [f"{'goal' if cfg.goal_pose else 'episode'}_{int(j):02d}" for j in
             (range(len(segments)) if cfg.goal_sequence else eps["index"])]
    films = ["sequence"] if cfg.goal_sequence else names

    def film(i: int):  # environment i's video, composed a frame at a time as it is written
        for f in shots[i]:
            wp = None if f.waypoint is None else (goals[f.goal, i] if f.waypoint < 0 else bank_frames[f.waypoint])
            expected = bank_frames[f.expected] if f.expected >= 0 else None
            yield compose(label(i, f.goal), f.obs, goals[f.goal, i], expected, wp, f.step, f.error, f.within,
                          f.reached)[None]

    written = [write_video(out / f"{name}.mp4", film(i), gif=cfg.gif) for i, name in enumerate(films)]
    flat = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:])  # noqa: E731  (goal, environment) -> rows
    sheet = summary_sheet(flat(firsts), flat(lasts), flat(goals), flat(reached), flat(final), cfg.tolerance)
    atomic_write(out / "summary.png", lambda tmp: Image.fromarray(sheet).save(tmp), keep_suffix=True)
    result = {"checkpoint": cfg.checkpoint, "protocol": protocol.name, "split": cfg.split, "seed": cfg.seed,
              "videos": [str(paths[0]) for paths in written], "gifs": [str(p) for paths in written for p in paths[1:]],
              "summary_sheet": str(out / "summary.png"), "success": flat(reached).tolist(),
              "held": (flat(final) < cfg.tolerance).tolist(), "final_error": flat(final).tolist(),
              "start_qpos": flat(starts).tolist(), "goal_qpos": flat(segments).tolist(), "provenance": provenance()}
    markdown = signed(demo_markdown(cfg, protocol, result, names, banked), result["provenance"])
    atomic_write_text(out / "demo.md", markdown)
    outcomes = [f"{n}: {'held' if h else ('reached, drifted' if r else 'missed')}, final error {e:.3f} rad"
                for n, r, h, e in zip(names, result["success"], result["held"], result["final_error"])]
    captions = ([("sequence.mp4", f"{len(names)} goals in turn: " + "; ".join(outcomes))] if cfg.goal_sequence
                else [(f"{n}.mp4", o) for n, o in zip(names, outcomes)])
    atomic_write_text(out / "index.html", demo_page(f"planning videos: {cfg.checkpoint}", markdown, captions))
    atomic_write_json(out / "demo.json", result)
    return result


def demo_markdown(cfg: DemoConfig, protocol, result: dict, names: list[str], banked: bool = True) -> str:
    """What was filmed, for the page and for a reader of the folder (``banked``: with the panels of training
    frames; without a dataset there are none)."""
    pose = lambda q: f"({math.remainder(q[0], math.tau):.2f}, {q[1]:.2f})"  # noqa: E731  (shoulder wrapped)
    if cfg.goal_sequence:
        start = "at rest in the pose of --start-pose" if cfg.start_pose else \
            f"from a row of the model's {cfg.split} episodes (seed {cfg.seed})"
        what = (f"{len(names)} goal poses of your own (--goal-pose) visited in turn in one video (sequence.mp4), "
                f"starting {start}; each goal has `{protocol.name}`'s")
    elif cfg.goal_pose:
        starts = "at rest in the poses of --start-pose" if cfg.start_pose else \
            f"from rows of the model's {cfg.split} episodes (seed {cfg.seed})"
        what = f"{len(names)} goal poses of your own (--goal-pose), starting {starts}, under `{protocol.name}`'s"
    else:
        what = f"{len(names)} `{protocol.name}` episodes of the model's {cfg.split} split (seed {cfg.seed}),"
    lines = [f"# Planning videos of `{cfg.checkpoint}`", "",
             f"{what} budget {protocol.budget} steps and rule. Each video: the camera, the goal image"
             + ((", the training frame nearest to what the model expects at the end of its plan"
                 + (", and the training frame it is heading for (a waypoint while the goal is far)"
                    if cfg.policy.subgoals.enabled else "")) if banked else
                " (filmed from the model file alone: no training frames to show what the model expects)") + ".",
             "",
             "| episode | start pose (rad) | goal pose (rad) | reached | held at the end | final joint error (rad) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {pose(s)} | {pose(g)} | {'yes' if r else 'no'} | {'yes' if h else 'no'} | {e:.3f} |"
              for n, s, g, r, h, e in zip(names, result["start_qpos"], result["goal_qpos"], result["success"],
                                          result["held"], result["final_error"])]
    return "\n".join(lines) + "\n"


def summary_sheet(first: np.ndarray, last: np.ndarray, goals: np.ndarray, reached: np.ndarray, final: np.ndarray,
                  tolerance: float) -> np.ndarray:
    """Rows of [first | last | goal] per episode, the last frame captioned with the final joint error."""
    rows = []
    for i, (f, l, g, ok, err) in enumerate(zip(first, last, goals, reached, final)):
        held = err < tolerance
        state = "held" if held else ("reached, drifted" if ok else "missed")
        colour = (120, 255, 120) if held else ((255, 200, 120) if ok else (255, 120, 120))
        rows.append(np.concatenate([caption(upscale(f[None], 128)[0], f"episode {i} start"),
                                    caption(upscale(l[None], 128)[0], f"end: {state}, {err:.3f} rad", colour),
                                    caption(upscale(g[None], 128)[0], "goal")], 1))
    return np.concatenate(rows, 0)
