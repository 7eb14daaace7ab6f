"""``wm eval``: closed-loop goal reaching in MuJoCo, the protocol of the design, with baselines.

Every method runs on the same episodes, all episodes of a (protocol, seed) in lock-step, so the world
model plans for all of them in one batched call per replan.

Protocols (success: at some step, every joint within ``tolerance`` rad of the goal, angles wrapped):
- ``reach25``: start at a random state of a held-out episode, goal = the pose 25 steps later, budget 50.
- ``reach50``: goal 50 steps later, budget 100.
- ``uniform``: start as above, goal pose uniform over the joint range, budget 100.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from envs.dataset import EpisodeStore
from envs.vector import ReacherBatch
from planners.cem import CEMConfig, CEMPlanner
from planners.policy import MPCPolicy, make_planner
from planners.simulator import JOINT_COSTS, SimulatorModel, wrap_angle
from worldmodel.model import atomic_write_json

PROTOCOLS = {"reach25": (25, 50), "reach50": (50, 100), "uniform": (None, 100)}  # goal offset, budget
METHODS = ("world_model", "random", "simulator")


@dataclass
class EvalConfig:
    """``wm eval``: success rate of MPC with the world model against random actions and the true simulator."""

    checkpoint: str = field(default="runs/demo/model.pt", metadata={"help": "model.pt of a trained run"})
    data: str = field(default="runs/demo/data", metadata={"help": "dataset whose held-out episodes give start and goal"})
    protocol: str = field(default="reach25", metadata={"help": "reach25, reach50, uniform, or a comma list"})
    episodes: int = field(default=50, metadata={"help": "episodes per seed"})
    seeds: int = field(default=3, metadata={"help": "seeds (each draws its own episodes and planner noise)"})
    planner: str = field(default="cem", metadata={"help": "cem or mppi"})
    samples: int = field(default=300, metadata={"help": "planner candidates per iteration"})
    iterations: int = field(default=30, metadata={"help": "planner iterations per replan"})
    horizon: int = field(default=5, metadata={"help": "planned action chunks"})
    cost: str = field(default="sum", metadata={"help": "sum (distance to the goal summed over the plan) or final "
                                                       "(last step only, which under replanning keeps deferring arrival)"})
    receding_horizon: int = field(default=1, metadata={"help": "chunks executed between replans"})
    baselines: str = field(default="random,simulator", metadata={"help": "comma list of random, simulator (or empty)"})
    sim_samples: int = field(default=300, metadata={"help": "simulator-CEM candidates per iteration"})
    sim_iterations: int = field(default=30, metadata={"help": "simulator-CEM iterations per replan"})
    tolerance: float = field(default=0.05, metadata={"help": "success: every joint within this many rad"})
    val_fraction: float = field(default=-1.0, metadata={"help": "held-out fraction; <0: the one the model was trained with"})
    split_seed: int = field(default=-1, metadata={"help": "split seed; <0: the one the model was trained with"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    out: str = field(default="runs/demo/eval", metadata={"help": "output directory"})


# --- the protocol ------------------------------------------------------------------------------------
def joint_error(qpos: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Largest wrapped joint-angle error: (..., 2), (..., 2) -> (...)."""
    return np.abs(wrap_angle(qpos - goal)).max(-1)


def sample_episodes(store: EpisodeStore, episode_ids: list[int], protocol: str, n: int, seed: int,
                    wrist_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Start states and goal poses of ``n`` protocol episodes, drawn from held-out dataset episodes."""
    offset, _ = PROTOCOLS[protocol]
    rng = np.random.default_rng([seed, list(PROTOCOLS).index(protocol)])
    need = offset or 0
    usable = [i for i in episode_ids if store.episodes[i].steps >= need]
    if not usable:
        raise ValueError(f"{protocol}: no held-out episode has {need} steps")
    rows = {k: [] for k in ("episode", "t0", "qpos", "qvel", "target", "goal_qpos")}
    for _ in range(n):
        i = usable[rng.integers(len(usable))]
        s = store.states(i)
        t0 = int(rng.integers(store.episodes[i].steps - need + 1))
        goal = (s["qpos"][t0 + offset] if offset is not None
                else np.array([rng.uniform(-math.pi, math.pi), rng.uniform(*wrist_range)]))
        for k, v in (("episode", i), ("t0", t0), ("qpos", s["qpos"][t0]), ("qvel", s["qvel"][t0]),
                     ("target", s["target"][t0]), ("goal_qpos", goal)):
            rows[k].append(v)
    return {k: np.asarray(v) for k, v in rows.items()}


def run_episodes(batch: ReacherBatch, episodes: dict, budget: int, act, bar=None) -> np.ndarray:
    """Closed loop for all episodes at once; ``act(frames) -> (B, 2)``. Returns joint errors (B, budget+1)."""
    frames = batch.reset_to(episodes["qpos"], episodes["qvel"], episodes["target"])
    errors = [joint_error(batch.states()["qpos"], episodes["goal_qpos"])]
    for _ in range(budget):
        frames = batch.step(act(frames))
        errors.append(joint_error(batch.states()["qpos"], episodes["goal_qpos"]))
        if bar is not None:
            bar.update(1)
    return np.stack(errors, 1)


def episode_records(errors: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    """Success, first step of success (-1 if never), final and best error, per episode."""
    hit = errors < tolerance  # (B, T+1)
    success = hit.any(1)
    return {"success": success, "steps_to_success": np.where(success, hit.argmax(1), -1),
            "final_error": errors[:, -1], "min_error": errors.min(1)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a success rate (Wilson score): sound at 0% and 100% too."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # contains p despite rounding


# --- the methods --------------------------------------------------------------------------------------
def world_model_controller(model, cfg: EvalConfig, goal_images: np.ndarray, seed: int):
    planner = make_planner(model, cfg.planner, samples=cfg.samples, iterations=cfg.iterations,
                           horizon=cfg.horizon, cost=cfg.cost, seed=seed)
    policy = MPCPolicy(model, planner, cfg.receding_horizon)
    policy.reset(goal_images)
    return policy.act_batch, policy


def random_controller(n: int, seed: int):
    rng = np.random.default_rng([seed, 7])
    return (lambda frames: rng.uniform(-1, 1, (n, 2)).astype(np.float32)), None


def simulator_controller(batch: ReacherBatch, cfg: EvalConfig, frameskip: int, goal_qpos: np.ndarray, seed: int):
    sim = SimulatorModel(batch.physics, frameskip)
    planner = CEMPlanner(sim, CEMConfig(samples=cfg.sim_samples, iterations=cfg.sim_iterations, horizon=cfg.horizon,
                                        cost=JOINT_COSTS[cfg.cost], seed=seed))
    policy = MPCPolicy(sim, planner, cfg.receding_horizon)
    policy.reset_latent(sim.goal_states(goal_qpos))
    return (lambda frames: policy.act_latent(lambda: sim.states(batch.datas), len(frames))), policy


# --- the command ------------------------------------------------------------------------------------
def load_setup(checkpoint: str, data: str, episodes: int, device: str = "auto", val_fraction: float = -1.0,
               split_seed: int = -1):
    """The model, the dataset, its held-out episodes (the split the model was trained with, unless
    given) and a batch of ``episodes`` environments like the dataset's."""
    from worldmodel.model import WorldModel, resolve_device

    model = WorldModel.load(checkpoint, resolve_device(device))
    train_cfg = json.loads(Path(checkpoint).with_suffix(".json").read_text()).get("train_config", {})
    val_fraction = val_fraction if val_fraction >= 0 else train_cfg.get("val_fraction", 0.1)
    split_seed = split_seed if split_seed >= 0 else train_cfg.get("seed", 0)
    store = EpisodeStore(data)
    if int(store.size) != model.cfg.image_size:
        raise ValueError(f"{data} has {store.size}px frames, the model takes {model.cfg.image_size}px")
    batch = ReacherBatch(str(store.attrs["env"]), episodes, size=store.size,
                         hide_target=bool(store.attrs.get("hide_target", True)),
                         render_quality=str(store.attrs.get("render_quality", "fast")))
    return model, store, store.split("val", val_fraction, split_seed), batch


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    if cfg.cost not in JOINT_COSTS:
        raise ValueError(f"cost must be one of {sorted(JOINT_COSTS)}, got {cfg.cost!r}")
    protocols = [p.strip() for p in cfg.protocol.split(",") if p.strip()]
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocol must be among {sorted(PROTOCOLS)}, got {p!r}")
    baselines = [b.strip() for b in cfg.baselines.split(",") if b.strip()]
    methods = ["world_model", *baselines]
    for m in baselines:
        if m not in METHODS[1:]:
            raise ValueError(f"baselines must be among {METHODS[1:]}, got {m!r}")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, store, held_out, batch = load_setup(cfg.checkpoint, cfg.data, cfg.episodes, cfg.device,
                                               cfg.val_fraction, cfg.split_seed)
    total = sum(PROTOCOLS[p][1] for p in protocols) * cfg.seeds * len(methods)
    bar = tqdm(total=total, desc="eval", unit="step", disable=not progress)
    records, curves = [], {}
    try:
        for protocol in protocols:
            budget = PROTOCOLS[protocol][1]
            for seed in range(cfg.seeds):
                eps = sample_episodes(store, held_out, protocol, cfg.episodes, seed, batch.physics.wrist_range)
                goal_images = batch.render_goals(eps["goal_qpos"])
                for method in methods:
                    bar.set_postfix(protocol=protocol, seed=seed, method=method)
                    if method == "world_model":
                        act, policy = world_model_controller(model, cfg, goal_images, seed)
                    elif method == "random":
                        act, policy = random_controller(cfg.episodes, seed)
                    else:
                        act, policy = simulator_controller(batch, cfg, model.frameskip, eps["goal_qpos"], seed)
                    start = time.perf_counter()
                    errors = run_episodes(batch, eps, budget, act, bar)
                    wall = time.perf_counter() - start
                    curves.setdefault((protocol, method), []).append(errors)
                    plan_times = policy.plan_times if policy is not None else []
                    per = episode_records(errors, cfg.tolerance)
                    for j in range(cfg.episodes):
                        records.append({
                            "protocol": protocol, "seed": seed, "method": method, "index": j,
                            "source_episode": int(eps["episode"][j]), "t0": int(eps["t0"][j]),
                            "start_qpos": eps["qpos"][j].tolist(), "goal_qpos": eps["goal_qpos"][j].tolist(),
                            "success": bool(per["success"][j]), "steps_to_success": int(per["steps_to_success"][j]),
                            "final_error": float(per["final_error"][j]), "min_error": float(per["min_error"][j]),
                            # one planning call serves all episodes of the batch
                            "plan_time_per_call_s": float(np.mean(plan_times)) if plan_times else 0.0,
                            "plan_time_per_episode_s": float(np.mean(plan_times)) / cfg.episodes if plan_times else 0.0,
                            "wall_time_batch_s": wall,
                        })
    finally:
        bar.close()
        batch.close()
    summary = summarize(records, methods, protocols)
    report = {"config": asdict(cfg), "summary": summary, "episodes": records}
    atomic_write_json(out / "results.json", report)
    (out / "results.md").write_text(results_markdown(summary, cfg))
    plot_results(summary, curves, cfg.tolerance, out / "results.png")
    return report


def summarize(records: list[dict], methods, protocols) -> dict:
    summary = {}
    for protocol in protocols:
        for method in methods:
            rows = [r for r in records if r["protocol"] == protocol and r["method"] == method]
            if not rows:
                continue
            wins = sum(r["success"] for r in rows)
            per_seed = {}
            for r in rows:
                per_seed.setdefault(r["seed"], []).append(r["success"])
            final = np.array([r["final_error"] for r in rows])
            steps = [r["steps_to_success"] for r in rows if r["success"]]
            summary[f"{protocol}/{method}"] = {
                "protocol": protocol, "method": method, "episodes": len(rows), "success_rate": wins / len(rows),
                "ci95": wilson_interval(wins, len(rows)),
                "per_seed": [float(np.mean(v)) for _, v in sorted(per_seed.items())],
                "final_error_quantiles": {q: float(np.quantile(final, q / 100)) for q in (10, 25, 50, 75, 90)},
                "median_steps_to_success": float(np.median(steps)) if steps else None,
                "plan_time_per_call_s": float(np.mean([r["plan_time_per_call_s"] for r in rows])),
                "plan_time_per_episode_s": float(np.mean([r["plan_time_per_episode_s"] for r in rows])),
            }
    return summary


def results_markdown(summary: dict, cfg: EvalConfig) -> str:
    lines = [f"# Evaluation of `{cfg.checkpoint}`", "",
             f"{cfg.episodes} episodes x {cfg.seeds} seeds per protocol; planner {cfg.planner} "
             f"{cfg.samples} samples x {cfg.iterations} iterations, horizon {cfg.horizon}, cost {cfg.cost}, replan every "
             f"{cfg.receding_horizon} chunk(s); simulator CEM {cfg.sim_samples} x {cfg.sim_iterations}; "
             f"success = every joint within {cfg.tolerance} rad.", "",
             "| protocol | method | success | 95% CI | per seed | median final joint error (rad) "
             f"| median steps to success | planning time per call ({cfg.episodes} episodes at once) | per episode |",
             "|---" * 9 + "|"]
    for s in summary.values():
        lo, hi = s["ci95"]
        steps = "-" if s["median_steps_to_success"] is None else f"{s['median_steps_to_success']:.0f}"
        plan = (f"{1000 * s['plan_time_per_call_s']:.0f} ms | {1000 * s['plan_time_per_episode_s']:.0f} ms"
                if s["plan_time_per_call_s"] else "- | -")
        lines.append(f"| {s['protocol']} | {s['method']} | {100 * s['success_rate']:.1f}% | "
                     f"{100 * lo:.1f}-{100 * hi:.1f}% | {', '.join(f'{100 * p:.0f}%' for p in s['per_seed'])} | "
                     f"{s['final_error_quantiles'][50]:.3f} | {steps} | {plan} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, curves: dict, tolerance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{s['protocol']}\n{s['method']}" for s in summary.values()]
    rates = [100 * s["success_rate"] for s in summary.values()]
    err = np.array([[100 * (s["success_rate"] - s["ci95"][0]), 100 * (s["ci95"][1] - s["success_rate"])]
                    for s in summary.values()]).T
    ax1.bar(range(len(rates)), rates, yerr=err, capsize=4, color="tab:blue")
    ax1.set_xticks(range(len(rates)), labels, fontsize=8)
    ax1.set_ylabel("success (%) with 95% CI")
    ax1.set_ylim(0, 100)
    for (protocol, method), runs in curves.items():
        e = np.concatenate(runs)  # (episodes, T+1)
        ax2.plot(np.median(e, 0), label=f"{protocol} {method}")
    ax2.axhline(tolerance, color="k", linestyle="--", linewidth=1, label="success tolerance")
    ax2.set_yscale("log")
    ax2.set_xlabel("env step")
    ax2.set_ylabel("median max joint error (rad)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
