"""``wm eval``: closed-loop goal reaching in MuJoCo, with baselines, on the protocols of ``planners.protocols``.

Every method runs on the same episodes, all episodes of a (protocol, seed) in lock-step, so the world
model plans for all of them in one batched call per replan. Each episode plans with its own noise
stream, keyed by (seed, episode index). The world-model policy starts with the frames and actions the
episode saw before its start (``--history true``), as the simulator baseline starts with the true
velocity. Frames are rendered only when a policy looks at them (the world model's chunk boundaries).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import apply_overrides, nested, option
from common.files import atomic_write_json, prepare_output_dir
from envs.dataset import EpisodeStore
from envs.reacher import GOAL_TOLERANCE, joint_error
from envs.storage import recording
from envs.vector import ReacherBatch
from evaluation.baselines import random_controller, simulator_controller
from evaluation.protocols import Protocol, episode_records, history_before, parse_protocols, sample_episodes
from evaluation.report import log_to_tensorboard, plot_results, results_markdown, summarize
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig
from worldmodel.datasplit import held_out, load_with_data, not_held_out, recorded_data
from worldmodel.graph import GraphConfig, LatentGraph, graph_for_checkpoint

METHODS = ("world_model", "random", "simulator")
DEFAULT_CHECKPOINT = "runs/demo/model.pt"


@dataclass
class EvalConfig:
    """``wm eval``: success of MPC with the world model against random actions and the true simulator."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run")
    data: str = option("", "dataset whose held-out episodes give starts and goals (default: the one the model was "
                           "trained on)")
    protocol: str = option("reach25", "comma list of reach25, reach50, uniform, lewm (the published protocol)")
    episodes: int = option(50, "episodes per seed")
    seeds: int = option(3, "seeds: each draws its own episodes; every episode plans with its own noise")
    policy: PolicyConfig = nested(PolicyConfig, "the MPC policy", flat=True)
    history: str = option("true", "start the world model with the frames and actions before the start (true) "
                                  "or as if the arm had been at rest (padded)", choices=("true", "padded"))
    baselines: str = option("random,simulator", "comma list of random, simulator (or empty)")
    sim_samples: int | None = option(None, "simulator-CEM candidates per iteration (default: --samples)")
    sim_iterations: int | None = option(None, "simulator-CEM iterations per replan (default: --iterations)")
    tolerance: float = option(GOAL_TOLERANCE, "success: every joint within this many rad of the goal")
    device: str = option("auto", "auto, cpu or cuda")
    out: str = option("", "output directory (default: eval/ beside the checkpoint)")
    overwrite: bool = option(False, "replace results already in --out")

    def __post_init__(self):
        if self.episodes < 1 or self.seeds < 1 or not self.tolerance > 0:
            raise ValueError(f"--episodes and --seeds must be >= 1 and --tolerance > 0, got {self.episodes}, "
                             f"{self.seeds}, {self.tolerance}")
        parse_protocols(self.protocol)
        parse_baselines(self.baselines)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoint).parent / "eval"


def parse_baselines(names: str) -> list[str]:
    chosen = [b.strip() for b in names.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in METHODS[1:]]
    if unknown:
        raise ValueError(f"--baselines must be among {list(METHODS[1:])}, got {unknown}")
    return chosen


# --- setup ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: object
    meta: dict
    store: EpisodeStore
    held_out: list[int]
    split_note: str
    batch: ReacherBatch
    checkpoint: str = ""
    _graphs: dict = field(default_factory=dict)

    def graph(self, cfg: GraphConfig) -> LatentGraph:
        """The subgoal graph over the model's training episodes (built once per setting): those of this
        dataset that are not held out, or, when it holds none, those of the dataset training recorded."""
        key = (cfg.neighbours, cfg.radius, cfg.max_nodes)
        if key not in self._graphs:
            train = not_held_out(self.store, self.held_out)
            if train or not self.checkpoint:
                graph = LatentGraph.build(self.model, self.store, train, cfg)
            else:
                try:
                    graph = graph_for_checkpoint(self.model, self.checkpoint, cfg)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"subgoals need the model's training frames, and this dataset holds none of "
                                     f"them; the dataset its checkpoint records cannot be read ({exc}); give it "
                                     f"with --data, or plan without subgoals (--no-subgoals.enabled)") from None
            self._graphs[key] = graph
        return self._graphs[key]


def load_setup(checkpoint: str, data: str, episodes: int, device: str = "auto") -> Setup:
    """The model, its dataset (the one it was trained on unless ``data``), the episodes it never trained on,
    and a batch of ``episodes`` environments like the dataset's."""
    model, meta, store, data = load_with_data(checkpoint, data, device)
    store.require_states(("qpos", "qvel"), "evaluation episodes")
    ids, note = held_out(store, meta)
    if not ids:
        raise ValueError(f"{data}: no episode the model did not train on ({note})")
    return Setup(model, meta, store, ids, note, batch_like(store, episodes), str(checkpoint))


def batch_like(store: EpisodeStore, n: int) -> ReacherBatch:
    """``n`` environments that render and step as the dataset's were recorded (its size, look, target
    visibility and action repeat), frames resized as the store resizes them for the model."""
    rec = recording(store.attrs)
    render = int(rec["render_size"] or store.source_size)  # `wm collect --image-size` renders larger
    return ReacherBatch(str(rec["env"]), n, size=render, image_size=store.size if store.size != render else None,
                        action_repeat=int(rec["action_repeat"]), hide_target=bool(rec["hide_target"]),
                        render_quality=str(rec["render_quality"]))


# --- the closed loop -----------------------------------------------------------------------------------
def run_episodes(batch: ReacherBatch, episodes: dict, protocol: Protocol, act, bar=None) -> np.ndarray:
    """Closed loop for all episodes at once; ``act() -> (B, 2)`` renders only if it needs frames.
    Returns joint errors (B, budget + 1) under the protocol's rule; column 0 is the start."""
    batch.reset_to(episodes["qpos"], episodes["qvel"], episodes["target"], render=False)
    goal = episodes["goal_qpos"]
    errors = [joint_error(batch.states()["qpos"], goal, protocol.wrap)]
    for _ in range(protocol.budget):
        batch.step(act(), render=False)
        errors.append(joint_error(batch.states()["qpos"], goal, protocol.wrap))
        if bar is not None:
            bar.update(1)
    return np.stack(errors, 1)


def world_model_controller(setup: Setup, cfg: EvalConfig, protocol: Protocol, eps: dict, goal_images: np.ndarray,
                           seed: int):
    """MPC on the world model; returns (act, policy, real history frames per episode)."""
    model, batch = setup.model, setup.batch
    pcfg = apply_overrides(cfg.policy, {**protocol.policy, "seed": seed})
    graph = setup.graph(pcfg.subgoals.graph) if pcfg.subgoals.enabled else None
    policy = MPCPolicy(model, pcfg, graph)
    n = len(goal_images)
    policy.reset(goal_images, keys=problem_keys(seed, eps["index"]))
    real = np.full(n, -1)  # -1: no history asked for
    if protocol.true_history and cfg.history == "true" and policy.history > 1:
        first = batch.reset_to(eps["qpos"], eps["qvel"], eps["target"])  # the start frames, to pad with
        frames, chunks, real = history_before(setup.store, eps, policy.history, model.frameskip, first)
        policy.set_history(frames, chunks)
    act = lambda: policy.act_latent(lambda: policy.encode_images(batch.render()), n)  # noqa: E731
    return act, policy, real


# --- the command ---------------------------------------------------------------------------------------
def check_output(cfg: EvalConfig) -> Path:
    """The output directory, refusing to overwrite finished results unless asked."""
    out = cfg.out_dir
    results = out / "results.json"
    if results.exists() and not cfg.overwrite:
        try:
            done = json.loads(results.read_text())
            what = f"{len(done['episodes'])} episodes of {done['config']['protocol']}"
        except (ValueError, KeyError, TypeError):
            what = "results"
        raise ValueError(f"{out} already holds {what}; pass --overwrite to replace them, or --out for another "
                         f"directory")
    prepare_output_dir(out)
    return out


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    protocols = parse_protocols(cfg.protocol)
    methods = ["world_model", *parse_baselines(cfg.baselines)]
    out = check_output(cfg)
    setup = load_setup(cfg.checkpoint, cfg.data, cfg.episodes, cfg.device)
    if progress:
        print(f"evaluating {cfg.checkpoint} on {len(setup.held_out)} episodes of "
              f"{cfg.data or recorded_data(setup.meta)}: {setup.split_note}")
    total = sum(p.budget for p in protocols) * cfg.seeds * len(methods)
    bar = tqdm(total=total, desc="eval", unit="step", disable=not progress)
    records, curves = [], {}
    try:
        for protocol in protocols:
            for seed in range(cfg.seeds):
                records += run_protocol_seed(setup, cfg, protocol, seed, methods, curves, bar)
    finally:
        bar.close()
        setup.batch.close()
    summary = summarize(records, methods, protocols)
    report = {"config": asdict(cfg), "checkpoint_step": setup.meta.get("step"), "split": setup.split_note,
              "summary": summary, "episodes": records}
    atomic_write_json(out / "results.json", report)
    (out / "results.md").write_text(results_markdown(summary, cfg, setup.split_note))
    plot_results(summary, curves, cfg.tolerance, out / "results.png")
    log_to_tensorboard(out / "tb", summary, setup.meta.get("step") or 0)
    return report


def run_protocol_seed(setup: Setup, cfg: EvalConfig, protocol: Protocol, seed: int, methods, curves: dict,
                      bar=None) -> list[dict]:
    """Every method on the episodes of one (protocol, seed); one record per episode and method."""
    batch, n = setup.batch, cfg.episodes
    eps = sample_episodes(setup.store, setup.held_out, protocol, n, seed, batch.physics.wrist_range, cfg.tolerance)
    goal_images = batch.render_goals(eps["goal_qpos"])
    records = []
    for method in methods:
        if bar is not None:
            bar.set_postfix(protocol=protocol.name, seed=seed, method=method)
        real = np.full(n, -1)
        policy = None
        if method == "world_model":
            act, policy, real = world_model_controller(setup, cfg, protocol, eps, goal_images, seed)
        elif method == "random":
            act = random_controller(n, seed)
        else:
            pcfg = apply_overrides(cfg.policy, protocol.policy)
            act, policy = simulator_controller(batch, pcfg, setup.model.frameskip, eps, seed, cfg.sim_samples,
                                               cfg.sim_iterations)
        start = time.perf_counter()
        errors = run_episodes(batch, eps, protocol, act, bar)
        wall = time.perf_counter() - start
        curves.setdefault((protocol.name, method), []).append(errors)
        plan_times = policy.plan_times if policy is not None else []
        route = float(sum(policy.route_times)) if policy is not None else 0.0
        wanted = policy.history - 1 if method == "world_model" else -1  # history frames asked for (--context caps)
        per = episode_records(errors, cfg.tolerance)
        call = float(np.mean(plan_times)) if plan_times else 0.0
        for j in range(n):
            records.append({
                "protocol": protocol.name, "seed": seed, "method": method, "index": j,
                "source_episode": setup.store.episodes[int(eps["episode"][j])].uid, "t0": int(eps["t0"][j]),
                "start_qpos": eps["qpos"][j].tolist(), "goal_qpos": eps["goal_qpos"][j].tolist(),
                "success": bool(per["success"][j]), "held": bool(per["held"][j]),
                "steps_to_success": int(per["steps_to_success"][j]), "final_error": float(per["final_error"][j]),
                "min_error": float(per["min_error"][j]), "history_frames": int(real[j]),
                "history_wanted": wanted,
                # one planning call serves all episodes of the batch
                "plan_time_per_call_s": call, "plan_time_per_episode_s": call / n, "plan_calls": len(plan_times),
                "route_time_batch_s": route,
                "wall_time_batch_s": wall,
            })
    return records


def closed_loop_check(model, store: EpisodeStore, held_out_ids: list[int], episodes: int, protocol: str = "reach25",
                      iterations: int = 10) -> dict:
    """A small closed-loop evaluation during training (world model only, one seed, CEM with ``iterations``):
    {"<protocol>_latched": rate, "<protocol>_held": rate}, logged to TensorBoard by ``wm train``. The model
    is left in eval mode (the caller puts it back in training)."""
    model.eval()
    batch = batch_like(store, episodes)
    try:
        setup = Setup(model, {}, store, held_out_ids, "", batch)
        policy = apply_overrides(PolicyConfig(), {"iterations": iterations})
        latched, held, _ = world_model_rates(setup, policy, protocol, episodes)
    finally:
        batch.close()
    return {f"{protocol}_latched": latched, f"{protocol}_held": held}


def world_model_rates(setup: Setup, policy: PolicyConfig, protocol: str, episodes: int, seed: int = 0):
    """(latched rate, held rate, seconds per planning call) of the world-model policy on one seed of
    ``protocol``: ``episodes`` episodes planned together."""
    cfg = EvalConfig(episodes=episodes, seeds=1, policy=policy, baselines="")
    records = run_protocol_seed(setup, cfg, parse_protocols(protocol)[0], seed, ["world_model"], {})
    return (float(np.mean([r["success"] for r in records])), float(np.mean([r["held"] for r in records])),
            records[0]["plan_time_per_call_s"])
