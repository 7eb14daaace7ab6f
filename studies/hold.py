"""Why the arm does not always hold its goal: three measurements, each on a model's validation episodes
(or its test episodes: ``--split``).

1. ``pose_discrimination``: can the model see the difference? Frames of poses a known joint error away
   from a goal pose, rendered as the evaluation renders them: the latent distance to the goal's latent
   (and the pixel distance) against the joint error, and how often a pose about twice as far from the goal
   (the level nearest twice) is also farther in latent space (ranking), per error level.
2. ``settling``: does the controller settle? The closed loop on validation episodes with every step's joint
   angles and velocities kept: each episode that does not hold its goal at the end is classified (never
   arrived, arrived and drifted off, still moving at the end, stopped off the goal).
3. ``holding_plans``: does the planner find the holding plan? At the end of each failed episode, the
   model's cost of what the planner chooses against "brake, then rest" sequences, beside where each of
   them takes the real arm (MuJoCo from the true state).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.files import KeptRuns
from envs.reacher import joint_error, wrap_angle
from evaluation.evaluate import EvalConfig, load_setup, measured_with, run_episodes, world_model_controller
from evaluation.protocols import PROTOCOLS, episode_records, sample_episodes
from evaluation.simulator import SimulatorModel
from planners.policy import PolicyConfig, policy_config
from studies import STUDY_ADVICE

LEVELS = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2)  # rad of joint error
# what report and plot read of a kept part (``KeptRuns``): a damaged one is an error naming the file and the field
DISCRIMINATION_FIELDS = {**dict.fromkeys(("levels", "latent_median", "latent_q25", "latent_q75", "pixel_median",
                                          "joint_error_median"), "numbers"),
                         "ranked": "numbers or null", "twice": "numbers or null", "tolerance_ranked": "number or null"}
SEED_FIELDS = {"holding.episodes": "list", "holding.a_candidate_holds": "number or null",
               "holding.model_ranks_a_holder_first": "number or null", "settling.latched": "number",
               "settling.held": "number", "settling.classes": "object", "settling.tail_error": "numbers"}


@torch.no_grad()
def pose_discrimination(setup, goals: int = 40, directions: int = 4, levels=LEVELS, seed: int = 0) -> dict:
    """Latent and pixel distance to a goal pose's frame against the joint error, on poses of the setup's
    episodes. Each goal gets ``directions`` random directions in joint space at every error level (the
    larger joint error is exactly the level). Returns per level the median and quartiles of the latent
    distance, the median pixel distance, and the share of pairs of the same goal and direction, the level
    and the one nearest twice it (``twice``: the smaller of two as near; within 30% of twice, or None), that
    the latent distance ranks correctly. Each goal is a frame of its own: fewer frames than ``goals`` are an
    error."""
    rng = np.random.default_rng(seed)
    store, batch, model = setup.store, setup.batch, setup.model
    rows = [(i, t) for i in setup.episodes for t in range(store.episodes[i].steps + 1)]
    if len(rows) < goals:
        raise ValueError(f"the hold study's pose discrimination takes {goals} goal poses, each from a frame of its "
                         f"own, and {setup.split_note} have {len(rows)} frames; study a split with more episodes "
                         f"(--split), or a larger dataset")
    picks = rng.choice(len(rows), goals, replace=False)
    goal_q = np.stack([store.states(rows[k][0])["qpos"][rows[k][1]] for k in picks])  # (G, 2)
    u = rng.normal(size=(goals, directions, 2))
    u /= np.abs(u).max(-1, keepdims=True)  # unit largest component: the joint error is the level itself
    poses = goal_q[:, None, None] + np.asarray(levels)[None, :, None, None] * u[:, None]  # (G, L, K, 2)
    low, high = batch.physics.wrist_range
    poses[..., 1] = np.clip(poses[..., 1], low, high)
    frames = _render(batch, poses.reshape(-1, 2))  # (G*L*K, H, W, 3)
    goal_frames = _render(batch, goal_q)
    z = _encode(model, frames).reshape(goals, len(levels), directions, -1)
    z_goal = _encode(model, goal_frames)[:, None, None]  # (G, 1, 1, D)
    d = (z - z_goal).norm(dim=-1).cpu().numpy()  # (G, L, K)
    pix = np.abs(frames.reshape(goals, len(levels), directions, -1).astype(np.float32) -
                 goal_frames.reshape(goals, 1, 1, -1)).mean(-1)  # (G, L, K) mean absolute pixel difference
    error = joint_error(poses, goal_q[:, None, None])  # (G, L, K), the wrist may have been clipped
    out = {"levels": list(levels), "latent_median": [], "latent_q25": [], "latent_q75": [], "pixel_median": [],
           "ranked": [], "twice": [], "joint_error_median": [], "tolerance_ranked": None}
    for k, level in enumerate(levels):
        out["latent_median"].append(float(np.median(d[:, k])))
        out["latent_q25"].append(float(np.quantile(d[:, k], 0.25)))
        out["latent_q75"].append(float(np.quantile(d[:, k], 0.75)))
        out["pixel_median"].append(float(np.median(pix[:, k])))
        out["joint_error_median"].append(float(np.median(error[:, k])))
        double = [j for j, other in enumerate(levels) if np.isclose(other, 2 * level, rtol=0.3)]
        twice = min(double, key=lambda j: (round(abs(levels[j] / (2 * level) - 1), 9), levels[j]), default=None)
        out["twice"].append(None if twice is None else levels[twice])
        out["ranked"].append(None if twice is None else float(np.mean(d[:, k] < d[:, twice])))
    within, beyond = [levels.index(x) for x in (0.03, 0.07)] if 0.03 in levels and 0.07 in levels else (None, None)
    if within is not None:  # inside against outside the success tolerance, same goal and direction
        out["tolerance_ranked"] = float(np.mean(d[:, within] < d[:, beyond]))
    return out


def _render(batch, qpos: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate([batch.render_goals(qpos[s:s + chunk]) for s in range(0, len(qpos), chunk)])


def _encode(model, frames: np.ndarray, chunk: int = 512) -> torch.Tensor:
    return torch.cat([model.encode(torch.from_numpy(frames[s:s + chunk]).to(model.device)).float()
                      for s in range(0, len(frames), chunk)])


def classify(error: np.ndarray, qvel: np.ndarray, tolerance: float, still: float = 0.005, tail: int = 20) -> str:
    """What happened in one episode that does not hold its goal at the end: errors (T+1,), velocities
    (T+1, 2). ``still``: rad per env step below which the arm counts as stopped (0.25 rad/s: a tenth of the
    tolerance in a step; qvel is in rad/s, 50 steps/s)."""
    hit = error[1:] < tolerance
    speed = np.abs(qvel[-tail:]).max(-1) / 50  # rad per env step over the last ``tail`` steps
    if not hit.any():
        return "never arrived" if speed[-1] < still else "never arrived, still moving"
    if speed[-1] >= still:
        return "arrived, still moving at the end"
    if (np.diff(np.sign(wrap_angle(error[-tail:]))) != 0).sum() > 2:
        return "arrived, oscillating"
    return "arrived, stopped off the goal"


def settling(setup, policy: PolicyConfig, protocol: str = "reach25", episodes: int = 50, seed: int = 0,
             tolerance: float = 0.05, bar=None) -> dict:
    """The closed loop with every step kept: rates, the classes of the episodes that do not hold, and their
    last 20 steps of joint error and speed."""
    proto = PROTOCOLS[protocol]
    cfg = EvalConfig(episodes=episodes, seeds=1, policy=policy, baselines="", tolerance=tolerance)
    eps = sample_episodes(setup.store, setup.episodes, proto, episodes, seed, setup.batch.physics.wrist_range,
                          tolerance)
    goals = setup.batch.render_goals(eps["goal_qpos"])
    act, mpc, _ = world_model_controller(setup, cfg, proto, eps, goals, seed)
    trace: dict = {}
    errors = run_episodes(setup.batch, eps, proto, act, bar, trace)
    per = episode_records(errors, tolerance)
    failed = np.flatnonzero(~per["held"])
    classes = [classify(errors[b], trace["qvel"][b], tolerance) for b in failed]
    return {"latched": float(per["success"].mean()), "held": float(per["held"].mean()), "failed": failed.tolist(),
            "classes": {c: classes.count(c) for c in sorted(set(classes))},
            "tail_error": errors[failed, -20:].tolist(), "tail_speed": (np.abs(trace["qvel"][failed, -20:]).max(-1) /
                                                                        50).tolist(),
            "final_error": per["final_error"].tolist(), "eps": eps, "trace": trace, "policy": mpc, "errors": errors}


def brake_then_rest(qvel: np.ndarray, horizon_steps: int, gains=(0.25, 0.5, 1.0), brake_steps=(1, 2, 3, 5)):
    """Candidate action sequences (K, horizon_steps, 2) that push against the current velocity (B=1) for a
    few steps, then let the arm rest."""
    out = [np.zeros((horizon_steps, 2))]
    for g in gains:
        for m in brake_steps:
            a = np.zeros((horizon_steps, 2))
            a[:m] = np.clip(-g * np.sign(qvel), -1, 1)
            out.append(a)
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def holding_plans(setup, run: dict, tolerance: float = 0.05) -> dict:
    """For each failed episode of ``settling``'s ``run``: from the state at the end, the model's cost (sum
    over the plan, to the goal's latent) of the plan the planner chooses and of "brake then rest"
    candidates, and the real arm's final joint error under each (MuJoCo from the true state)."""
    mpc, eps, trace = run["policy"], run["eps"], run["trace"]
    model, fs = setup.model, setup.model.frameskip
    horizon = mpc.planner.cfg.horizon
    sim = SimulatorModel(setup.batch.physics, fs, setup.batch.action_repeat)
    n = len(eps["index"])
    mpc.act_latent(lambda: mpc.encode_images(setup.batch.render()), n)  # a chunk boundary: look and replan
    z_hist, a_hist = mpc._z_hist, mpc._a_hist if mpc._z_hist.shape[1] > 1 else None
    rows = []
    for b in run["failed"]:
        v = trace["qvel"][b, -1]
        cands = brake_then_rest(v, horizon * fs)  # (K, H*fs, 2)
        chosen = mpc._plan[b].reshape(horizon * fs, 2).cpu().numpy()[None]  # what the policy would play
        actions = torch.from_numpy(np.concatenate([chosen, cands]).reshape(len(cands) + 1, horizon, 2 * fs))
        zh = z_hist[b:b + 1].expand(len(actions), -1, -1)
        ah = None if a_hist is None else a_hist[b:b + 1].expand(len(actions), -1, -1)
        z = model.rollout(zh, ah, actions.to(zh))  # (K+1, H, D)
        cost = (z - mpc._z_goal[b]).square().sum((-1, -2)).cpu().numpy()
        start = sim.states([setup.batch.datas[b]])  # (1, S): where episode b ended
        final = sim.rollout(start.repeat(len(actions), 1)[:, None], None, actions.double())[:, -1, 1:3].numpy()
        err = joint_error(final, eps["goal_qpos"][b][None])
        rows.append({"episode": int(b), "cost": cost.tolist(), "final_error": err.tolist(),
                     "model_picks": int(np.argmin(cost)), "sim_best": int(np.argmin(err)),
                     "best_holds": bool(err.min() < tolerance), "chosen_holds": bool(err[0] < tolerance)})
    picks_right = [r["model_picks"] == r["sim_best"] or r["final_error"][r["model_picks"]] < tolerance for r in rows]
    return {"episodes": rows, "a_candidate_holds": float(np.mean([r["best_holds"] for r in rows])) if rows else None,
            "model_ranks_a_holder_first": float(np.mean(picks_right)) if rows else None}


def one_seed(setup, policy: PolicyConfig, seed: int, episodes: int, bar=None) -> dict:
    """Whether the controller settles and the planner finds the holding plan, on one seed's episodes."""
    run = settling(setup, policy, seed=seed, episodes=episodes, bar=bar)
    return {"holding": holding_plans(setup, run),
            "settling": {k: v for k, v in run.items() if k not in ("eps", "trace", "policy", "errors")}}


def run_all(checkpoint: str, episodes: int = 50, seeds: int = 1, device: str = "auto", data: str = "",
            overrides: dict | None = None, split: str = "val", progress: bool = True,
            units: str | Path | None = None) -> dict:
    """The three measurements on ``checkpoint``'s ``split`` episodes (the policy its model file records, with
    ``overrides`` on top, settings by name). With ``units`` (a directory), the pose discrimination and each seed
    are kept there as they are done, and a rerun after an interruption measures only the rest."""
    setup = load_setup(checkpoint, data, episodes, device, split=split)
    try:
        policy = policy_config(checkpoint, overrides)
        cfg = EvalConfig(episodes=episodes, split=split, data=data, device=device, policy=policy)
        kept = KeptRuns(units, measured_with(cfg, setup), STUDY_ADVICE)
        out = {"checkpoint": checkpoint, "split": split, "episodes": episodes, "seeds": seeds,
               "discrimination": kept.run("discrimination", lambda: pose_discrimination(setup),
                                          fields=DISCRIMINATION_FIELDS),
               "settling": [], "holding": []}
        with tqdm(total=seeds * PROTOCOLS["reach25"].budget, desc="hold study: closed loop", unit="step",
                  disable=not progress) as bar:
            for seed in range(seeds):
                done = kept.run(f"seed{seed}", lambda: one_seed(setup, policy, seed, episodes, bar),
                                lambda: bar.update(PROTOCOLS["reach25"].budget), SEED_FIELDS)
                out["holding"].append(done["holding"])
                out["settling"].append(done["settling"])
    finally:
        setup.batch.close()
    return out


def report(result: dict, checkpoint: str, split: str = "val") -> str:
    """Markdown of ``run_all``'s result."""
    d = result["discrimination"]
    lines = [f"# Why the arm does not always hold its goal: `{checkpoint}`, {split} episodes", "",
             "## Can the model see the difference? Latent distance to the goal pose's latent against the joint error",
             "", "| joint error (rad) | latent distance, median (IQR) | pixel difference, mean per pixel | "
                 "ranked below the error nearest twice it (that error) |", "|---|---|---|---|"]
    for k, level in enumerate(d["levels"]):
        ranked = "-" if d["ranked"][k] is None else f"{100 * d['ranked'][k]:.0f}% ({d['twice'][k]:g})"
        lines.append(f"| {level:g} | {d['latent_median'][k]:.3f} ({d['latent_q25'][k]:.3f}-{d['latent_q75'][k]:.3f}) | "
                     f"{d['pixel_median'][k]:.3f} | {ranked} |")
    if d["tolerance_ranked"] is not None:
        lines += ["", f"A pose 0.03 rad from the goal (inside the tolerance) is nearer in latent space than one 0.07 "
                      f"rad away (outside) in {100 * d['tolerance_ranked']:.0f}% of same-direction pairs."]
    lines += ["", "## Does the controller settle? Episodes that do not hold the goal at the end", "",
              "| seed | latched | held | why the others did not hold |", "|---|---|---|---|"]
    for seed, s in enumerate(result["settling"]):
        why = ", ".join(f"{c}: {n}" for c, n in s["classes"].items()) or "-"
        lines.append(f"| {seed} | {100 * s['latched']:.0f}% | {100 * s['held']:.0f}% | {why} |")
    lines += ["", "## Does the planner find the holding plan? At the end of each failed episode", "",
              "| seed | failed episodes | a candidate (the plan or brake-then-rest) holds in MuJoCo | the model's "
              "cheapest candidate holds or is MuJoCo's best |", "|---|---|---|---|"]
    for seed, h in enumerate(result["holding"]):
        if h["episodes"]:
            lines.append(f"| {seed} | {len(h['episodes'])} | {100 * h['a_candidate_holds']:.0f}% | "
                         f"{100 * h['model_ranks_a_holder_first']:.0f}% |")
        else:  # every episode held its goal: nothing to look at
            lines.append(f"| {seed} | 0 | - | - |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Latent and pixel distance against joint error (left); the last 20 steps of the episodes that do not
    hold, joint error against step (right)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to leak, no backend switched

    d = result["discrimination"]
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(d["levels"], d["latent_median"], "o-", color="tab:blue", label="latent distance (median)")
    ax1.fill_between(d["levels"], d["latent_q25"], d["latent_q75"], color="tab:blue", alpha=0.2, label="IQR")
    ax1.axvline(0.05, color="k", linestyle="--", linewidth=1, label="success tolerance")
    ax1.set_xscale("log")
    ax1.set_xlabel("joint error of the pose (rad)")
    ax1.set_ylabel("latent distance to the goal's latent")
    twin = ax1.twinx()
    twin.plot(d["levels"], d["pixel_median"], "s--", color="tab:orange", label="pixel difference")
    twin.set_ylabel("mean absolute pixel difference (0-255)")
    ax1.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="lower right")
    ax1.set_title("can the model see the difference?", fontsize=9)
    for s in result["settling"]:
        for tail in s["tail_error"]:
            ax2.plot(range(-len(tail) + 1, 1), tail, color="tab:red", alpha=0.4, linewidth=1)
    ax2.axhline(0.05, color="k", linestyle="--", linewidth=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("env steps before the end of the budget")
    ax2.set_ylabel("joint error (rad)")
    ax2.set_title("the last 20 steps of the episodes that do not hold", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
