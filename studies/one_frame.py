"""What one frame costs LeWM's planner on a trained model, and where the rest of its misses come from.

LeWM's planner (the ``lewm`` protocol) conditions on the current frame alone, which shows where the arm is
and not how it moves, and plays each 25-step plan open loop. Here each method's first plan, as played, is
replayed from the same start with the velocities zeroed: the state one frame shows (the second plan was
made from where the first one really ended, so only the first is replayed). An episode whose first plan
reaches the goal from rest but not from the true start was lost to the unseen velocity; one it misses from
rest too was lost to the plan itself (for the world model: how it reads and rolls out one frame). The
pose-only simulator (``simulator-pose``: CEM on MuJoCo seeing the joint angles, the velocities as zero) is
the perfect model of one frame, the reference for both. The same model given the frames before the start
(``lewm-history``) separates how it reads one frame from how precisely it rolls a plan out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import model_paths
from common.files import KeptRuns
from common.text import counted
from evaluation.evaluate import EvalConfig, controller, load_setup, measured_with, run_episodes, stored_frames
from evaluation.protocols import PROTOCOLS, episode_records, sample_episodes
from evaluation.report import COLOURS
from studies import STUDY_ADVICE

# the study's rows: (the evaluation's method, the protocol it plans under); the history row is the counterfactual
# that separates how the model reads one frame from how precisely it rolls a plan out
METHODS = {"world_model": ("world_model", "lewm"), "world_model_history": ("world_model", "lewm-history"),
           "simulator-pose": ("simulator-pose", "lewm")}
LABELS = {"world_model": "the world model", "world_model_history": "the world model given the frames before the "
                                                                   "start (`lewm-history`, a counterfactual)",
          "simulator-pose": "CEM on the true pose, velocity unseen (a perfect model of one frame)"}
PLOT_COLOURS = {"world_model": COLOURS["world_model"], "world_model_history": "tab:purple",
                "simulator-pose": COLOURS["simulator-pose"]}
QUANTILES = (25, 50, 75, 90)


def replay(actions: np.ndarray):
    """An ``act`` that plays the recorded actions (B, T, 2), one env step per call."""
    steps = iter(range(actions.shape[1]))
    return lambda: actions[:, next(steps)]


def one_seed(setup, cfg: EvalConfig, seed: int, methods=tuple(METHODS), bar=None) -> list[dict]:
    """Each of ``methods`` on the ``lewm`` episodes of ``seed`` (as ``wm eval`` draws them); the first plan
    of those that see one frame replayed from the same starts at rest. One record per episode and method."""
    first = PROTOCOLS["lewm"].policy["receding_horizon"] * setup.model.frameskip  # env steps of the first plan
    eps = sample_episodes(setup.store, setup.episodes, PROTOCOLS["lewm"], cfg.episodes, seed,
                          setup.batch.physics.wrist_range, cfg.tolerance)
    goals = stored_frames(setup.store, eps, PROTOCOLS["lewm"].goal_offset)
    at_rest = dict(eps, qvel=np.zeros_like(eps["qvel"]))
    rows = []
    for name in methods:
        method, proto = METHODS[name][0], PROTOCOLS[METHODS[name][1]]
        act, _, _ = controller(setup, cfg, proto, method, eps, goals, seed)
        trace: dict = {}
        if bar is not None:
            bar.set_postfix(seed=seed, method=name)
        errors = run_episodes(setup.batch, eps, proto, act, bar, trace)  # (B, budget + 1, control steps)
        episode = episode_records(errors, cfg.tolerance)
        played = episode_records(errors[:, :first + 1], cfg.tolerance)
        rest = None
        if not proto.true_history:  # one frame: its first plan from the state that frame shows
            rest = episode_records(run_episodes(setup.batch, at_rest, dataclasses.replace(proto, budget=first),
                                                replay(trace["action"][:, :first])), cfg.tolerance)
        for j in range(len(eps["index"])):
            rows.append({"method": name, "seed": seed, "index": j, "success": bool(episode["success"][j]),
                         "held": bool(episode["held"][j]), "first_plan": bool(played["success"][j]),
                         "closest": float(played["min_error"][j]),
                         "first_plan_at_rest": None if rest is None else bool(rest["success"][j]),
                         "closest_at_rest": None if rest is None else float(rest["min_error"][j])})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per method: the protocol's latched and held rates, how often the first plan reaches the goal from
    the true start and (one frame) from rest, how the episodes split between the two, and the quantiles
    of the first plan's closest approach to the goal (rad) in each."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        true = np.array([r["first_plan"] for r in mine])
        s = {"episodes": len(mine), "latched": float(np.mean([r["success"] for r in mine])),
             "held": float(np.mean([r["held"] for r in mine])), "first_plan": float(true.mean()),
             "closest": np.percentile([r["closest"] for r in mine], QUANTILES).tolist(),
             "first_plan_at_rest": None, "lost_to_velocity": None, "missed_at_rest_too": None,
             "reached_only_moving": None, "closest_at_rest": None}
        if mine[0]["first_plan_at_rest"] is not None:
            rest = np.array([r["first_plan_at_rest"] for r in mine])
            s.update(first_plan_at_rest=float(rest.mean()),
                     lost_to_velocity=float(np.mean(rest & ~true)),  # reached from rest, missed from the true start
                     missed_at_rest_too=float(np.mean(~rest & ~true)), reached_only_moving=float(np.mean(true & ~rest)),
                     closest_at_rest=np.percentile([r["closest_at_rest"] for r in mine], QUANTILES).tolist())
        out[method] = s
    return out


def run(checkpoints: str, split: str = "val", episodes: int = 50, seeds: int = 1, device: str = "auto",
        data: str = "", tolerance: float = 0.05, progress: bool = True, units: str | Path | None = None) -> dict:
    """The study on every model of the comma list ``checkpoints`` (each on its own ``split`` episodes),
    pooled. With ``units`` (a directory), each (model, seed) is kept there as it is done, and a rerun after
    an interruption measures only the rest."""
    cfg = EvalConfig(episodes=episodes, seeds=seeds, baselines="", tolerance=tolerance, split=split, data=data,
                     device=device)
    models, rows = model_paths(checkpoints), []
    steps = len(METHODS) * PROTOCOLS["lewm"].budget  # of one seed
    with tqdm(total=len(models) * seeds * steps, desc="one-frame study", unit="step", disable=not progress) as bar:
        for run_index, checkpoint in enumerate(models):
            setup = load_setup(checkpoint, data, episodes, device, split=split)
            kept = KeptRuns(units, measured_with(cfg, setup), STUDY_ADVICE, prefix=f"model{run_index}-")
            try:
                for seed in range(seeds):
                    done = kept.run(f"seed{seed}", lambda: {"rows": one_seed(setup, cfg, seed, bar=bar)},
                                    lambda: bar.update(steps), {"rows": "list"})
                    rows += [{**r, "run": run_index} for r in done["rows"]]
            finally:
                setup.batch.close()
    return {"checkpoints": models, "split": split, "episodes": episodes, "seeds": seeds,
            "tolerance": tolerance, "summary": summarize(rows), "rows": rows}


def report(result: dict) -> str:
    """Markdown of ``run``'s result."""
    models = ", ".join(f"`{c}`" for c in result["checkpoints"])
    q = " / ".join(f"p{k}" for k in QUANTILES)
    lines = [f"# What one frame costs LeWM's planner: {models}", "",
             f"The `lewm` protocol on each model's {result['split']} episodes ("
             f"{counted(result['episodes'], 'episode')} x {counted(result['seeds'], 'seed')} per model, pooled), "
             f"LeWM's planner as released. Each method's first plan, as played, is replayed from the same start "
             f"with the velocities zeroed (the state one frame shows). "
             f"Success: every joint within {result['tolerance']} rad, latched.", "",
             f"| method | latched / held (the protocol) | first plan reaches the goal | the same from rest | lost to "
             f"the unseen velocity (reached from rest only) | missed from rest too | reached only moving | first "
             f"plan's closest approach {q} (rad) | the same from rest |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    quantiles = lambda q: "-" if q is None else " / ".join(f"{x:.3f}" for x in q)  # noqa: E731
    for method, s in result["summary"].items():
        lines.append(f"| {LABELS[method]} | {pct(s['latched'])} / {pct(s['held'])} | {pct(s['first_plan'])} | "
                     f"{pct(s['first_plan_at_rest'])} | {pct(s['lost_to_velocity'])} | "
                     f"{pct(s['missed_at_rest_too'])} | {pct(s['reached_only_moving'])} | "
                     f"{quantiles(s['closest'])} | {quantiles(s['closest_at_rest'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Per method, the distribution of the first plan's closest approach to the goal from the true start
    and from rest, the tolerance marked."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to leak, no backend switched

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for method in result["summary"]:
        mine = [r for r in result["rows"] if r["method"] == method]
        for key, style, what in (("closest", "-", "from the true start"), ("closest_at_rest", "--", "from rest")):
            if mine[0][key] is None:
                continue
            x = np.sort([r[key] for r in mine])
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), style, color=PLOT_COLOURS[method],
                    label=f"{LABELS[method]}, {what}")
    ax.axvline(result["tolerance"], color="k", linewidth=1, linestyle=":", label="tolerance")
    ax.set_xscale("log")
    ax.set_xlabel("the first plan's closest approach to the goal (rad, largest joint)")
    ax.set_ylabel("share of episodes")
    ax.legend(fontsize=7)
    ax.set_title("LeWM's planner from one frame: its first plan as played, and from rest", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
