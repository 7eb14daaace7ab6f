"""The evaluation protocols: where episodes start, what their goal is, how long they run, what counts.

Every protocol starts an episode at a row of a held-out dataset episode (its joint angles, velocities
and target) and runs a fixed budget of env steps. Success is counted from step 1 (after the first
action): a start already within tolerance of its goal is never drawn.

- ``reach25``: goal = the pose 25 env steps later in the same episode, budget 50.
- ``reach50``: goal 50 steps later, budget 100.
- ``uniform``: goal pose uniform over the joint range (shoulder unlimited, wrist within its limit), budget 100.
- ``reachK`` for any other K (``reach10``, ``reach100``): goal K env steps later, budget 2K, as the two above.
- ``lewm``: the published LeWorldModel Reacher protocol as its code runs it: goal 25 env steps later (an env
  step of the dataset's action repeat: 2 control steps on their data), budget 50, success
  ``|qpos - goal| < tolerance`` on every joint WITHOUT wrapping angles, checked after every control step
  and latched; the goal image and first observation are the dataset's stored frames; the planner
  conditioned on the current frame only, CEM 300 samples x 30 iterations with the top 30, initial std one
  unit of the data's action std, samples scored as drawn (not clamped to the action range; the env clips
  what is played), horizon 5 chunks, the whole plan executed before replanning, cost on the last predicted
  latent, the final mean executed.
- ``lewm-mpc``: the same episodes, budget and success rule, planned by the policy as configured (our
  default MPC: replanning every chunk, the true history, subgoals).
- ``lewm-history``: a counterfactual, not their protocol: the same episodes, rule and planner as ``lewm``, but
  the planner conditions on the frames before the start (the model's history, or ``--context``) instead of
  the current frame alone; what the one frame costs LeWM's planner.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from common.config import distinct_list
from envs import joint_error


@dataclass(frozen=True)
class Protocol:
    name: str
    goal_offset: int | None  # env steps from the start to the goal in the same episode; None: a uniform pose
    budget: int  # env steps
    wrap: bool = True  # joint errors on wrapped angles (False: raw differences, as LeWM released)
    true_history: bool = True  # the world model sees the frames before the start (False: the current frame only)
    policy: dict = field(default_factory=dict)  # {policy setting's name: value} the protocol fixes
    control_steps: bool = False  # success checked after every control step, also inside an action repeat
    stored_frames: bool = False  # goal image and first observation: the dataset's stored frames, not rendered
    data_action_std: bool = False  # CEM's initial std: the std of the data's actions (unit std when z-scored)
    draws_as: str = ""  # another protocol whose episodes this one draws (the same episodes, another planner)
    planner_name: str = ""  # what reports call the world model's planner when ``policy`` fixes it (else: MPC)

    def from_training_rows(self, lewm_rows: str) -> bool:
        """Whether its starts are drawn as LeWM's evaluation draws them (``--lewm-rows train``): from rows of
        the model's training episodes, not from held-out ones."""
        return lewm_rows == "train" and "lewm" in (self.name, self.draws_as)


# LeWorldModel's planner as released (le-wm config/eval/reacher.yaml; stable-worldmodel solver/cem.py): CEM 300 x
# 30, the top 30 refit without momentum or a floor, the current mean as a candidate, the final mean executed,
# cost on the last predicted latent, horizon 5 chunks all played before the next plan, one frame of context;
# samples scored as drawn, outside the action range too (the env clips what is played).
LEWM_POLICY = {"planner": "cem", "samples": 300, "iterations": 30, "horizon": 5, "cost": "final", "cem.elites": 30,
               "cem.min_std": 0.0, "cem.momentum": 0.0, "cem.keep_elites": False, "cem.plan_from": "mean",
               "rest": False, "receding_horizon": 5, "context": 1, "subgoals.enabled": False, "clamp_samples": False,
               "grad_steps": 0, "noise_beta": 0.0, "warm_iterations": 0}
LEWM_NOTE = ("CEM 300 x 30, the top 30 refit, the final mean played, cost on the last predicted latent, all 5 "
             "chunks played before the next plan, one frame of context, no rest candidate or subgoals, samples "
             "scored unclamped, white sampling noise, no gradient steps")

PROTOCOLS = {
    "reach25": Protocol("reach25", 25, 50),
    "reach50": Protocol("reach50", 50, 100),
    "uniform": Protocol("uniform", None, 100),
    "lewm": Protocol("lewm", 25, 50, wrap=False, true_history=False, policy=LEWM_POLICY, control_steps=True,
                     stored_frames=True, data_action_std=True, planner_name="LeWM's planner"),
    # our default MPC (the policy as configured) under LeWM's episodes, budget and success rule
    "lewm-mpc": Protocol("lewm-mpc", 25, 50, wrap=False, control_steps=True, stored_frames=True, draws_as="lewm"),
    # LeWM's planner given the true history before the start (a counterfactual: what its one frame costs)
    "lewm-history": Protocol("lewm-history", 25, 50, wrap=False,
                             policy={k: v for k, v in LEWM_POLICY.items() if k != "context"}, control_steps=True,
                             stored_frames=True, data_action_std=True, draws_as="lewm",
                             planner_name="LeWM's planner, the frames before the start"),
}


MAX_REACH = 500  # env steps ahead of a reachK goal (its budget is 2K)
PROTOCOL_NAMES = f"{', '.join(PROTOCOLS)} or reachK (the goal K env steps ahead, budget 2K; 1 <= K <= {MAX_REACH})"


def protocol_named(name: str) -> Protocol:
    """A protocol by its name: one of ``PROTOCOLS``, or ``reachK`` for any K (built as reach25 and reach50 are)."""
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    ahead = re.fullmatch(r"reach([1-9][0-9]*)", name)
    if ahead and int(ahead.group(1)) <= MAX_REACH:
        return Protocol(name, int(ahead.group(1)), 2 * int(ahead.group(1)))
    raise ValueError(f"--protocol: {name!r} is not {PROTOCOL_NAMES}")


def parse_protocols(names: str) -> list[Protocol]:
    chosen = distinct_list(names, "--protocol")
    if not chosen:
        raise ValueError(f"--protocol must be a comma list of {PROTOCOL_NAMES}, got {names!r}")
    return [protocol_named(p) for p in chosen]


def draw_stream(protocol: Protocol) -> int:
    """Which random stream a protocol's episodes are drawn from (beside the seed): its place among
    ``PROTOCOLS`` (or the place of the protocol whose episodes it shares), 1000 + K for another reachK."""
    name = protocol.draws_as or protocol.name
    return list(PROTOCOLS).index(name) if name in PROTOCOLS else 1000 + protocol.goal_offset


def start_rows(store, episode_ids: list[int], protocol: Protocol, n: int, tolerance: float) -> list[tuple[int, int]]:
    """(episode, t0) of every usable start of ``protocol`` in ``episode_ids`` (a row with the goal inside its
    episode and not within ``tolerance`` of it); a ValueError if there are fewer than ``n``."""
    need = protocol.goal_offset or 0
    rows = []
    for i in episode_ids:
        q = store.states(i)["qpos"]  # (T+1, 2)
        usable = max(len(q) - need, 0)  # an episode no longer than the goal offset has no start
        t0 = np.arange(usable)
        if protocol.goal_offset is not None:
            t0 = t0[joint_error(q[:usable], q[need:need + usable], protocol.wrap) >= tolerance]
        rows.extend((i, int(t)) for t in t0)
    if len(rows) < n:
        ahead = f" (the goal {need} steps later in the same episode)" if protocol.goal_offset is not None else ""
        raise ValueError(f"{protocol.name}: {len(rows)} usable start rows{ahead} in {len(episode_ids)} held-out "
                         f"episodes, {n} episodes asked for")
    return rows


def sample_episodes(store, episode_ids: list[int], protocol: Protocol, n: int, seed: int,
                    wrist_range: tuple[float, float], tolerance: float) -> dict[str, np.ndarray]:
    """Start states and goal poses of ``n`` protocol episodes from the rows of held-out episodes; each
    episode's ``index`` (0..n-1) keys its planner noise, so any subset of them draws the noise it draws in
    the full batch, and episode j is the same whatever ``n`` is (a video's episode 0 is the evaluation's
    episode 0). Its plans are the same up to the rounding of batched products (about 1e-6 with gradient
    steps or MPPI), which a closed loop can grow into another trajectory: alike in distribution, not always
    step for step.

    Starts are distinct rows drawn uniformly over every usable row (an episode's row with the goal
    inside the episode). A start within ``tolerance`` of its goal is never drawn (it would be a free
    success); for uniform goals, such a goal is redrawn. A uniform goal comes from its start row's own
    stream (the seed, the episode's uid and the row), so models, splits and datasets whose starts are other
    rows get other goals: the draw's position alone would give every split of as many rows the same goals.
    """
    rng = np.random.default_rng([seed, draw_stream(protocol)])
    need = protocol.goal_offset or 0
    rows = start_rows(store, episode_ids, protocol, n, tolerance)
    picked = rng.permutation(len(rows))[:n]  # the first k episodes are the same whatever n is
    out = {k: [] for k in ("index", "episode", "t0", "qpos", "qvel", "target", "goal_qpos")}
    for j, k in enumerate(picked):
        i, t0 = rows[k]
        s = store.states(i)
        goal = s["qpos"][t0 + need] if protocol.goal_offset is not None else None
        if goal is None:
            goal_rng = np.random.default_rng([seed, draw_stream(protocol), int(store.episodes[i].uid, 16), t0])
        while goal is None or joint_error(s["qpos"][t0], goal, protocol.wrap) < tolerance:
            goal = np.array([goal_rng.uniform(-math.pi, math.pi), goal_rng.uniform(*wrist_range)])
        for key, v in (("index", j), ("episode", i), ("t0", t0), ("qpos", s["qpos"][t0]), ("qvel", s["qvel"][t0]),
                       ("target", s["target"][t0]), ("goal_qpos", goal)):
            out[key].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def history_before(store, episodes: dict, history: int, frameskip: int, first_obs: np.ndarray):
    """The frames and action chunks each episode would have seen before its start, as training windows
    hold them: frames at t0 - k*frameskip .. t0 - frameskip (k = history - 1) and the chunks after each.
    Where the episode is too young, the history is left-padded as training pads (``pad_history``).

    Returns frames (B, k, H, W, 3), chunks (B, k, frameskip*2) and how many frames each episode really had.
    """
    from planners.policy import pad_history

    k = history - 1
    frames, chunks, real = [], [], []
    for b, (i, t0) in enumerate(zip(episodes["episode"], episodes["t0"])):
        m = min(k, int(t0) // frameskip)
        starts = [int(t0) - j * frameskip for j in range(m, 0, -1)]  # oldest first
        if m:  # an episode's first step needs no dataset: its history is all padding
            action = store.states(int(i))["action"]
            f = store.frames(int(i), np.array(starts, dtype=np.int64))
            c = np.stack([action[s:s + frameskip].reshape(-1) for s in starts])
        else:
            f, c = first_obs[b][None][:0], np.zeros((0, 2 * frameskip), np.float32)
        f, c = pad_history(f, c.astype(np.float32), k, first_obs[b])
        frames.append(f)
        chunks.append(c)
        real.append(m)
    return np.stack(frames), np.stack(chunks), np.asarray(real)


def episode_records(errors: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    """Per episode, from joint errors (B, budget + 1) where column 0 is the start (never counted), or
    (B, budget + 1, R) after each of the R control steps of every env step: latched success (within
    tolerance at some step >= 1, or some control step of it), held-at-end success (within tolerance at the
    end of the last step), the first step of success (-1 if never), final and best error."""
    closest = errors if errors.ndim == 2 else errors.min(-1)  # (B, budget + 1)
    final = errors[:, -1] if errors.ndim == 2 else errors[:, -1, -1]
    hit = closest[:, 1:] < tolerance  # (B, budget): steps 1..budget
    latched = hit.any(1)
    return {"success": latched, "held": final < tolerance, "steps_to_success": np.where(latched, hit.argmax(1) + 1, -1),
            "final_error": final, "min_error": closest[:, 1:].min(1)}


def lewm_training_rows(store, train_ids: list[int], n: int, offset: int = 25, seed: int = 42) -> dict[str, np.ndarray]:
    """Starts drawn as LeWM's evaluation draws them: ``default_rng(seed)`` picks ``n`` rows without
    replacement among all rows of the (training) episodes with at least ``offset`` env steps left; the goal
    is the row ``offset`` steps later. No start is excluded, not even one already at its goal."""
    rows = [(i, t) for i in train_ids for t in range(store.episodes[i].steps + 1 - offset)]
    if len(rows) < n:
        raise ValueError(f"lewm: {len(rows)} usable start rows in {len(train_ids)} episodes, {n} episodes asked for")
    picked = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    out = {k: [] for k in ("index", "episode", "t0", "qpos", "qvel", "target", "goal_qpos")}
    for j, k in enumerate(picked):
        i, t0 = rows[k]
        s = store.states(i)
        for key, v in (("index", j), ("episode", i), ("t0", t0), ("qpos", s["qpos"][t0]), ("qvel", s["qvel"][t0]),
                       ("target", s["target"][t0]), ("goal_qpos", s["qpos"][t0 + offset])):
            out[key].append(v)
    return {k: np.asarray(v) for k, v in out.items()}
