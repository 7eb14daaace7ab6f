"""``wm eval``: closed-loop goal reaching in MuJoCo, with baselines, on the protocols of ``planners.protocols``.

Every method runs on the same episodes, all episodes of a (protocol, seed) in lock-step, so the world
model plans for all of them in one batched call per replan. Each episode plans with its own noise
stream, keyed by (seed, episode index). The world-model policy starts with the frames and actions the
episode saw before its start (``--history true``), as the simulator baseline starts with the true
velocity. Frames are rendered only when a policy looks at them (the world model's chunk boundaries).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.config import (apply_overrides, comma_list, config_fields, distinct_list, model_paths, nested, option,
                           option_flag)
from common.device import THREADS_HELP
from common.files import (KeptRuns, callable_name, json_text, write_together,
                          keeping_what_was_measured, output_dir, output_lock, remove_stale_temporaries,
                          saying_what_is_kept)
from common.provenance import code_version, provenance, signed
from common.text import counted
from envs.dataset import EpisodeStore
from envs.reacher import GOAL_TOLERANCE, joint_error
from envs.storage import recording
from envs.vector import ReacherBatch
from evaluation.baselines import (SIMULATOR_BUDGET, exploration_controller, exploration_policies, random_controller,
                                  simulator_controller)
from evaluation.protocols import (Protocol, episode_records, history_before, lewm_training_rows, parse_protocols,
                                  sample_episodes, start_rows)
from evaluation.html import evaluation_page
from evaluation.report import log_to_tensorboard, plot_results, results_markdown, summarize
from evaluation.simulator import JOINT_COSTS
from evaluation.stats import METHOD
from planners.config import CEMConfig, MPPIConfig
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig, check_context, check_policy_device, policy_config
from worldmodel.datasplit import (HELD_OUT, load_with_data, recording_differences, resolve_data,
                                  split_episodes, training_episodes)
from worldmodel.graph import GraphConfig, LatentGraph, graph_for_checkpoint, keep_graph, saved_graph
from worldmodel.model import check_model_file, recorded_weights_sha256, weights_digest

METHODS = ("world_model", "random", "exploration", "simulator", "simulator-pose")
OUTPUTS = ("results.md", "index.html", "results.png", "tb", "results.json")  # in the order written: results.json last
UNITS = "units"  # in the output while it runs: one file per (model, protocol, seed, method) measured
KEPT_ADVICE = "pass --overwrite to measure everything again, or give another --out"
DEFAULT_CHECKPOINT = "runs/demo/model.pt"
RECORD_KINDS = {"success": "bool", "held": "bool", "steps_to_success": "number", "final_error": "number",
                "min_error": "number", "history_frames": "number", "history_wanted": "number",
                "start_qpos": "numbers", "goal_qpos": "numbers", "plan_time_per_call_s": "number",
                "plan_time_per_episode_s": "number"}  # of an episode's record, what the results read


@dataclass
class EvalConfig:
    """wm eval: closed-loop success of MPC with the world model, beside reference methods on the same episodes."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run, or a comma list of several (e.g. "
                                                 "training seeds: pooled, with the spread between them)", path=True)
    data: str = option("", "dataset whose --split episodes give starts and goals (default: the one the model was "
                           "trained on)", path=True)
    protocol: str = option("reach25", "comma list of reach25, reach50, uniform, lewm (LeWM's published protocol), "
                                      "lewm-mpc (its episodes and rule, our planner), lewm-history (LeWM's "
                                      "planner given the frames before the start: a counterfactual), or reachK "
                                      "(the goal K env steps ahead, budget 2K)")
    split: str = option("test", "the model's episodes that give starts and goals: test (to report) or val (to "
                                "choose settings on)", choices=HELD_OUT)
    lewm_rows: str = option("split", "lewm protocol's starts: from --split episodes as every protocol draws them "
                                     "(split), or as LeWM's evaluation draws them: rows of the model's training "
                                     "episodes, default_rng(42 + seed) (train)", choices=("split", "train"))
    episodes: int = option(50, "episodes per seed")
    seeds: int = option(3, "seeds: each draws its own episodes; every episode plans with its own noise")
    policy: PolicyConfig = nested(PolicyConfig, "the MPC policy", flat=True)
    history: str = option("true", "start the world model with the frames and actions before the start (true) "
                                  "or as if the arm had been at rest (padded)", choices=("true", "padded"))
    baselines: str = option("random,exploration,simulator", "comma list of reference methods (or empty): random "
                                                            "(i.i.d. uniform actions), exploration (the data's own "
                                                            "policy), simulator (CEM on the true state with a "
                                                            "hand-made joint cost), simulator-pose (the same "
                                                            "seeing the joint angles only, velocities as zero: "
                                                            "what one frame shows)")
    sim_samples: int | None = option(None, f"simulator-CEM candidates per iteration (default: --samples, at "
                                           f"least {SIMULATOR_BUDGET[0]}: the simulator takes no gradient steps)")
    sim_iterations: int | None = option(None, f"simulator-CEM iterations per replan (default: --iterations, "
                                              f"at least {SIMULATOR_BUDGET[1]})")
    tolerance: float = option(GOAL_TOLERANCE, "success: every joint within this many rad of the goal (it also "
                                               "decides the draw: a start already within it is never drawn)")
    score_at: str = option("", "comma list of further tolerances (rad) at which the same episodes are scored too, "
                               "latched and held (e.g. 0.1, LeWM's paper-era threshold); the draw stays that of "
                               "--tolerance")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)
    out: str = option("", "output directory (default: eval/ beside the checkpoint; needed for several)", path=True)
    overwrite: bool = option(False, "replace results already in --out")

    def __post_init__(self):
        if self.episodes < 1 or self.seeds < 1 or not self.tolerance > 0:
            raise ValueError(f"--episodes and --seeds must be >= 1 and --tolerance > 0, got {self.episodes}, "
                             f"{self.seeds}, {self.tolerance}")
        parse_protocols(self.protocol)
        baselines = parse_baselines(self.baselines)
        for name in ("sim_samples", "sim_iterations"):  # left out (None): the world model's planner's
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise ValueError(f"{option_flag(name)} must be >= 1 (or left out), got {getattr(self, name)}")
        cost = self.policy.plan.cost
        simulated = [b for b in baselines if b.startswith("simulator")]
        if simulated and cost not in JOINT_COSTS:  # a cost of one's own, given from Python
            raise ValueError(f"cost {callable_name(cost)} has no joint-angle counterpart for the "
                             f"{', '.join(simulated)} baseline (it plans on the true state with the final or sum "
                             f"cost): leave it out of --baselines")
        self.other_tolerances  # a bad --score-at is refused before anything runs
        check_policy_device(self.policy, self.device)
        if len(self.checkpoints) > 1 and not self.out:  # (a mistyped path holding a comma is said missing)
            raise ValueError("several --checkpoint: give --out for their pooled results")
        if not self.checkpoints:
            raise ValueError("--checkpoint: give at least one model.pt")

    @property
    def checkpoints(self) -> list[str]:
        return model_paths(self.checkpoint)

    @property
    def other_tolerances(self) -> list[float]:
        """The ``--score-at`` tolerances, each > 0 and not ``--tolerance`` itself, in the order given."""
        try:
            found = [float(t) for t in comma_list(self.score_at)]
        except ValueError:
            raise ValueError(f"--score-at must be a comma list of tolerances in rad, got {self.score_at!r}") from None
        if any(not t > 0 or not math.isfinite(t) for t in found):
            raise ValueError(f"--score-at: every tolerance must be a number > 0, got {self.score_at!r}")
        return [t for t in dict.fromkeys(found) if t != self.tolerance]

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoints[0]).parent / "eval"


def parse_baselines(names: str) -> list[str]:
    chosen = distinct_list(names, "--baselines")
    unknown = [b for b in chosen if b not in METHODS[1:]]
    if unknown:
        raise ValueError(f"--baselines must be among {list(METHODS[1:])}, got {unknown}")
    return chosen


# --- setup ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What an evaluation runs on: the model, its dataset, the episodes starts and goals come from (one
    split), the environments, and the model's training episodes in this dataset (the subgoal graph's)."""

    model: object
    meta: dict
    store: EpisodeStore
    episodes: list[int]
    split_note: str
    batch: ReacherBatch
    checkpoint: str = ""
    train: list[int] = field(default_factory=list)
    recorded_otherwise: str = ""  # how the episodes were recorded otherwise than the model's training data
    _graphs: dict = field(default_factory=dict)

    def action_std(self) -> float:
        """The std of the actions of the model's training episodes here (all episodes when it holds none),
        averaged over the action dimensions: one unit of a z-scored action space."""
        ids = self.train or range(len(self.store))
        return float(np.concatenate([self.store.states(i)["action"] for i in ids]).std(0).mean())

    def graph(self, cfg: GraphConfig) -> LatentGraph:
        """The subgoal graph over the model's training episodes (built once per setting): those of this
        dataset, or, when it holds none, those of the dataset training recorded."""
        key = tuple(asdict(cfg).values())
        if key not in self._graphs and self.checkpoint:  # the one the model file holds, if built alike
            self._graphs[key] = saved_graph(self.model, cfg, self.checkpoint)
        if self._graphs.get(key) is None:
            if self.train or not self.checkpoint:
                graph = LatentGraph.build(self.model, self.store, self.train, cfg)
                if self.checkpoint:
                    keep_graph(self.checkpoint, self.model, graph, cfg)
            else:
                try:
                    graph = graph_for_checkpoint(self.model, self.checkpoint, cfg)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"subgoals need the model's training frames, and this dataset holds none of "
                                     f"them; the dataset its checkpoint records cannot be read ({exc}); give it "
                                     f"with --data, or plan without subgoals (--no-subgoals.enabled)") from None
            self._graphs[key] = graph
        return self._graphs[key]


def load_setup(checkpoint: str, data: str, episodes: int, device: str = "auto", split: str = "test") -> Setup:
    """The model, its dataset (the one it was trained on unless ``data``), the episodes of ``split`` (test
    to report, val to choose), and a batch of ``episodes`` environments like the dataset's."""
    model, meta, store, data = load_with_data(checkpoint, data, device)
    store.require_states(("qpos", "qvel"), "evaluation episodes")
    ids, note = split_episodes(store, meta, split)
    if not ids:
        raise ValueError(f"{data}: no {split} episode for this model ({note})")
    rows = sum(store.episodes[i].steps + 1 for i in ids)  # an upper bound of the usable start rows
    if episodes > rows:  # checked before the environments are allocated
        raise ValueError(f"--episodes {episodes}: the model's {len(ids)} {split} episodes of {data} have {rows} start "
                         f"rows in all, and each evaluation episode needs its own")
    try:
        train = training_episodes(store, meta)
    except ValueError:
        train = []  # none here: the graph comes from the recorded dataset, if asked for
    return Setup(model, meta, store, ids, note, batch_like(store, episodes), str(checkpoint), train,
                 recording_differences(meta, store))


def batch_like(store: EpisodeStore, n: int) -> ReacherBatch:
    """``n`` environments that render and step as the dataset's were recorded (its size, look, target
    visibility and action repeat), frames resized as the store resizes them for the model."""
    return batch_recorded(recording(store.attrs), store.size, n, store.source_size)


def batch_recorded(rec: dict, image_size: int, n: int, stored_size: int | None = None) -> ReacherBatch:
    """``n`` environments as the recording ``rec`` (``envs.storage.recording``) says its frames were made,
    resized to the model's ``image_size``: what a dataset, or a model that keeps its data's recording, rebuilds."""
    # `wm collect --image-size` renders larger; a square copy of frames that were not square renders nothing like them
    render = None if rec.get("stretched_from") else rec["render_size"] or rec.get("size") or stored_size
    if render is None:
        stretched = (f" (stretched from {'x'.join(map(str, rec['stretched_from']))} by `wm convert --image-size`)"
                     if rec.get("stretched_from") else "")
        raise ValueError(f"the data's frames are not square{stretched}, and our environments render square frames: "
                         f"a closed loop cannot show the model frames like the ones it trained on (it can be trained "
                         f"and probed on them, not evaluated or filmed)")
    render = int(render)
    return ReacherBatch(str(rec["env"]), n, size=render, image_size=image_size if image_size != render else None,
                        action_repeat=int(rec["action_repeat"]), hide_target=bool(rec["hide_target"]),
                        render_quality=str(rec["render_quality"]))


# --- the closed loop -----------------------------------------------------------------------------------
def run_episodes(batch: ReacherBatch, episodes: dict, protocol: Protocol, act, bar=None,
                 trace: dict | None = None) -> np.ndarray:
    """Closed loop for all episodes at once; ``act() -> (B, 2)`` renders only if it needs frames.
    Returns joint errors (B, budget + 1) under the protocol's rule, column 0 the start; (B, budget + 1, R)
    after each of the R control steps of every env step when the protocol checks them all. ``trace``, when
    given, receives the joint angles and velocities of every step (B, budget + 1, 2) and the actions
    (B, budget, 2)."""
    batch.reset_to(episodes["qpos"], episodes["qvel"], episodes["target"], render=False)
    goal = episodes["goal_qpos"]
    repeat = batch.action_repeat if protocol.control_steps else 1
    qpos, qvel, actions = [np.repeat(batch.qpos()[:, None], repeat, 1)], [batch.qvel()], []
    for _ in range(protocol.budget):
        actions.append(np.asarray(act(), np.float32))
        inside: list = []  # the joint angles after each control step of this env step
        batch.step(actions[-1], render=False, control_qpos=inside if protocol.control_steps else None)
        qpos.append(np.stack(inside, 1) if protocol.control_steps else batch.qpos()[:, None])
        if trace is not None:
            qvel.append(batch.qvel())
        if bar is not None:
            bar.update(1)
    qpos = np.stack(qpos, 1)  # (B, budget + 1, control steps checked per env step)
    if trace is not None:
        trace.update(qpos=qpos[:, :, -1], qvel=np.stack(qvel, 1), action=np.stack(actions, 1))
    errors = joint_error(qpos, goal[:, None, None], protocol.wrap)
    return errors if protocol.control_steps else errors[..., 0]


def protocol_policy(setup: Setup, cfg: EvalConfig, protocol: Protocol, seed: int) -> PolicyConfig:
    """The policy as configured, with what ``protocol`` fixes: the settings every planner of it plans with."""
    fixed = {**protocol.policy, "seed": seed}
    if protocol.data_action_std:  # a sample of unit std in z-scored action space, as LeWM plans
        fixed["cem.init_std"] = setup.action_std()
    base = cfg.policy
    if "planner" in fixed:  # a planner of its own: none of the configured planner's own settings
        base = replace(base, plan=replace(base.plan, cem=CEMConfig(), mppi=MPPIConfig()))
    return apply_overrides(base, fixed)


def world_model_controller(setup: Setup, cfg: EvalConfig, protocol: Protocol, eps: dict, goal_images: np.ndarray,
                           seed: int):
    """MPC on the world model; returns (act, policy, real history frames per episode)."""
    model, batch = setup.model, setup.batch
    pcfg = protocol_policy(setup, cfg, protocol, seed)
    graph = setup.graph(pcfg.subgoals.graph) if pcfg.subgoals.enabled else None
    policy = MPCPolicy(model, pcfg, graph)
    n = len(goal_images)
    policy.reset(goal_images, keys=problem_keys(seed, eps["index"]))
    real = np.full(n, -1)  # -1: no history asked for
    if protocol.true_history and cfg.history == "true" and policy.history > 1:
        first = batch.reset_to(eps["qpos"], eps["qvel"], eps["target"])  # the start frames, to pad with
        frames, chunks, real = history_before(setup.store, eps, policy.history, model.frameskip, first)
        policy.set_history(frames, chunks)
    first_frames = stored_frames(setup.store, eps, 0) if protocol.stored_frames else None
    looked = []

    def observe():  # the first look at the stored start frame when the protocol says so, then the camera
        frames = first_frames if first_frames is not None and not looked else batch.render()
        looked.append(True)
        return policy.encode_images(frames)

    act = lambda: policy.act_latent(observe, n)  # noqa: E731
    return act, policy, real


def controller(setup: Setup, cfg: EvalConfig, protocol: Protocol, method: str, eps: dict, goal_images: np.ndarray,
               seed: int):
    """``method``'s actions on the episodes ``eps``: (act, its policy or None, real history frames per episode,
    -1 where it reads none)."""
    n = len(eps["index"])
    if method == "world_model":
        return world_model_controller(setup, cfg, protocol, eps, goal_images, seed)
    if method == "random":
        return random_controller(eps["index"], seed), None, np.full(n, -1)
    if method == "exploration":
        policies = exploration_policies(setup.store, eps["episode"])
        return exploration_controller(eps["index"], seed, policies), None, np.full(n, -1)
    pcfg = protocol_policy(setup, cfg, protocol, seed)
    act, policy = simulator_controller(setup.batch, pcfg, setup.model.frameskip, eps, seed, cfg.sim_samples,
                                       cfg.sim_iterations, sees_velocity=method == "simulator")
    return act, policy, np.full(n, -1)


def stored_frames(store: EpisodeStore, eps: dict, offset: int) -> np.ndarray:
    """The dataset's own frames (B, H, W, 3) of each episode's row ``t0 + offset`` (the start, or its goal)."""
    return np.stack([store.frames(int(i), np.array([int(t) + offset]))[0] for i, t in zip(eps["episode"], eps["t0"])])


# --- the command ---------------------------------------------------------------------------------------
def check_output(cfg: EvalConfig, digests: list[str] = ()) -> Path:
    """The output directory, refusing to overwrite finished results (``results.json``, an evaluation's or a
    study's, whatever else is left beside it) unless asked, and a demo's directory (its page would be
    replaced) in any case. Results of weights other than ``digests`` (the models' now) are said to be so."""
    out = cfg.out_dir
    if (out / "demo.json").exists():
        raise ValueError(f"{out} holds a demo's videos (demo.json), whose index.html an evaluation would replace; "
                         f"choose another --out")
    results = out / "results.json"  # written last: what says the evaluation finished
    if results.exists() and not cfg.overwrite:
        try:
            done = json.loads(results.read_text())
            what = (f"the results of {done['config']['protocol']} ({len(done['episodes'])} episode records: one per "
                    f"episode, seed, method and model)")
            then = done.get("weights_sha256")
            if then is not None and list(digests) and then != list(digests):
                what += f", measured on other weights than {', '.join(cfg.checkpoints)} holds now"
        except (ValueError, KeyError, TypeError):
            what = "results"
        raise ValueError(f"{out} already holds {what}; pass --overwrite to replace them, or --out for another "
                         f"directory")
    return out


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """``wm eval``: every method on the same episodes of every protocol and seed, for each checkpoint (its
    own split); results pooled over checkpoints with the spread between them."""
    protocols = parse_protocols(cfg.protocol)
    methods = ["world_model", *parse_baselines(cfg.baselines)]
    models = [check_model_file(c) for c in cfg.checkpoints]  # every model readable before the first is evaluated
    metas = [meta for meta, _ in models]
    digests = [recorded_weights_sha256(checkpoint, meta) for meta, checkpoint in zip(metas, cfg.checkpoints)]
    seen = {}
    for digest, checkpoint in zip(digests, cfg.checkpoints):  # a copy of a model, pooled with it, would count twice
        first = seen.setdefault(digest, checkpoint)
        if first != checkpoint:
            raise ValueError(f"--checkpoint: {checkpoint} holds the same weights as {first} (a copy?): pooled with "
                             f"itself, its episodes would count twice")
    if any("context" not in p.policy for p in protocols):  # and planned with a context it has (lewm fixes its own)
        for _, model_cfg in models:
            check_context(cfg.policy, model_cfg.history)
    if not cfg.data:  # and the dataset each recorded found
        for meta, checkpoint in zip(metas, cfg.checkpoints):
            resolve_data(meta, checkpoint)
    with output_dir(check_output(cfg, digests)) as out, output_lock(out):  # one evaluation at a time in a directory
        return _evaluate(cfg, out, protocols, methods, digests, progress)


def _evaluate(cfg: EvalConfig, out: Path, protocols, methods, digests: list[str], progress: bool) -> dict:
    """``evaluate`` once ``out`` is checked and locked; results.json, written last, says it finished. Each
    (model, protocol, seed, method) measured is kept in ``out/units`` until then, so the same command after
    an interruption measures only what is missing (and gives the results an uninterrupted run gives)."""
    remove_stale_temporaries(out, OUTPUTS)
    units_dir = out / UNITS  # with --overwrite, parts kept from a run measured otherwise are measured again
    remove_stale_temporaries(units_dir, r".*\.json")
    kept = len(list(units_dir.glob("*.json")))  # 0 when the directory is not there
    if progress and kept:
        tqdm.write(f"resuming: the {kept} (model, protocol, seed, method) runs already measured in {units_dir} "
                   f"are kept")
    total = sum(p.budget for p in protocols) * cfg.seeds * len(methods) * len(cfg.checkpoints)
    records, curves, notes, steps, otherwise, data_paths = [], {}, [], [], [], []
    with saying_what_is_kept(units_dir), tqdm(total=total, desc="eval", unit="step", disable=not progress) as bar:
        for run, checkpoint in enumerate(cfg.checkpoints):
            setup = load_setup(checkpoint, cfg.data, cfg.episodes, cfg.device, cfg.split)
            try:  # the environments are closed whatever happens
                if "exploration" in methods:  # data no policy of ours collected: refused before its episodes run
                    training_rows = any(p.from_training_rows(cfg.lewm_rows) for p in protocols)
                    exploration_policies(setup.store, setup.episodes + (setup.train if training_rows else []))
                notes.append(setup.split_note)
                data_paths.append(str(setup.store.paths))
                if setup.recorded_otherwise:
                    otherwise.append(f"**Warning**: the episodes of {checkpoint} were recorded otherwise than its "
                                     f"training data: {setup.recorded_otherwise}.")
                steps.append(setup.meta.get("step"))
                for protocol in protocols:  # each can be drawn here, before this model's first runs
                    draw_episodes(setup, cfg, protocol, 0)
                if progress:
                    tqdm.write(f"evaluating {checkpoint} on {len(setup.episodes)} episodes of "
                               f"{setup.store.paths}: {setup.split_note}")  # the data opened, wherever it was found
                units = KeptRuns(units_dir, measured_with(cfg, setup), KEPT_ADVICE, prefix=f"model{run}-",
                                 replace_other=cfg.overwrite)
                for protocol in protocols:
                    for seed in range(cfg.seeds):
                        rows = run_protocol_seed(setup, cfg, protocol, seed, methods, curves, bar, units)
                        records += [{**r, "run": run, "checkpoint": checkpoint} for r in rows]
            finally:
                setup.batch.close()
    with keeping_what_was_measured(units_dir):  # an interruption from here on keeps what was measured
        summary = summarize(records, methods, protocols, cfg.tolerance, cfg.other_tolerances)
        split_note = notes[0] if len(notes) == 1 else f"each model's own {cfg.split} episodes"
        made = provenance()
        report = {"config": asdict(cfg), "checkpoints": cfg.checkpoints, "checkpoint_steps": steps,
                  "weights_sha256": digests, "data": data_paths, "split": notes, "interval": METHOD,
                  "torch_threads": torch.get_num_threads(), "provenance": made, "summary": summary,
                  "episodes": records}
        markdown = signed("\n".join([results_markdown(summary, cfg, split_note, cfg.checkpoints), *otherwise]), made)
        title = (f"{', '.join(cfg.checkpoints)}: {counted(cfg.episodes, 'episode')} x {counted(cfg.seeds, 'seed')} "
                 f"per protocol"
                 f"{' and model' if len(cfg.checkpoints) > 1 else ''}, {cfg.split} split")
        # all or none of them replace the results of an earlier run (--overwrite); results.json last: it says the
        # evaluation finished. tb/ holds the scalars of these results only.
        write_together({
            out / "results.md": markdown, out / "index.html": evaluation_page(markdown),
            out / "results.png": lambda tmp: plot_results(summary, curves, cfg.tolerance, tmp, title,
                                                          cfg.other_tolerances),
            out / "tb": lambda tmp: log_to_tensorboard(tmp, summary, steps[0] or 0),
            out / "results.json": json_text(report)})
    shutil.rmtree(units_dir, ignore_errors=True)  # all in results.json now
    return report


def measured_with(cfg: EvalConfig, setup: Setup) -> dict:
    """What a model's evaluation records of one (protocol, seed, method) depend on: the model's weights, the
    dataset's episodes, the device and torch threads it ran with, the code's commit and every setting but
    where the records go, which other models, protocols, seeds and methods run beside them (each seed draws
    its own episodes), and ``--score-at`` (read from the records afterwards). What was typed for the data,
    the device and the threads is left out: their fingerprint, the device resolved and the thread count are
    what the records depend on (``--device auto`` and ``cpu`` on a CPU machine measure alike)."""
    beside = ("checkpoint", "out", "overwrite", "protocol", "seeds", "baselines", "score_at", "data", "device",
              "threads")
    settings = {f.name: f.value for f in config_fields(cfg) if f.name not in beside}
    # the weights' digest (model.json's, checked when the model was loaded), not the file's: an evaluation may
    # save a subgoal graph into the file
    return {**settings, "weights_sha256": setup.meta.get("weights_sha256") or weights_digest(setup.model.state_dict()),
            "data_fingerprint": setup.store.fingerprint, "device": str(setup.model.device),
            "torch_threads": torch.get_num_threads(), "code": code_version()}


def draw_episodes(setup: Setup, cfg: EvalConfig, protocol: Protocol, seed: int) -> dict[str, np.ndarray]:
    """The starts and goals of one (protocol, seed); a ValueError when the model's episodes hold too few."""
    if protocol.from_training_rows(cfg.lewm_rows):  # as LeWM's eval draws them
        return lewm_training_rows(setup.store, setup.train, cfg.episodes, protocol.goal_offset, 42 + seed)
    return sample_episodes(setup.store, setup.episodes, protocol, cfg.episodes, seed,
                           setup.batch.physics.wrist_range, cfg.tolerance)


def run_protocol_seed(setup: Setup, cfg: EvalConfig, protocol: Protocol, seed: int, methods, curves: dict,
                      bar=None, units: KeptRuns | None = None) -> list[dict]:
    """Every method on the episodes of one (protocol, seed); one record per episode and method. With
    ``units``, a method measured before is read back, and each one measured here is kept."""
    batch = setup.batch  # the environments, one per episode
    eps = draw_episodes(setup, cfg, protocol, seed)
    goal_images = (stored_frames(setup.store, eps, protocol.goal_offset) if protocol.stored_frames
                   else batch.render_goals(eps["goal_qpos"]))
    units = units if units is not None else KeptRuns(None, {}, "")
    # what the results read of a kept run's records, one per episode: a damaged one is named, not summed
    fields = {"records": "list", "curve": "numbers",
              **{f"records.{j}.{name}": kind for j in range(len(eps["index"])) for name, kind in RECORD_KINDS.items()}}
    records = []
    for method in methods:
        kept_bar = (lambda: bar.update(protocol.budget)) if bar is not None else None
        unit = units.run(f"{protocol.name}-seed{seed}-{method}",
                         lambda: measure_method(setup, cfg, protocol, seed, method, eps, goal_images, bar), kept_bar,
                         fields)
        records += unit["records"]
        curves.setdefault((protocol.name, method), []).append(np.asarray(unit["curve"], dtype=np.float64))
    return records


def measure_method(setup: Setup, cfg: EvalConfig, protocol: Protocol, seed: int, method: str, eps: dict,
                   goal_images: np.ndarray, bar=None) -> dict:
    """One method on the episodes ``eps`` of a (protocol, seed): {"records": one per episode, "curve": the
    joint error of each episode at every step (n, budget + 1)}, as JSON keeps them."""
    n = len(eps["index"])
    if bar is not None:
        bar.set_postfix(protocol=protocol.name, seed=seed, method=method)
    act, policy, real = controller(setup, cfg, protocol, method, eps, goal_images, seed)
    start = time.perf_counter()
    errors = run_episodes(setup.batch, eps, protocol, act, bar)
    wall = time.perf_counter() - start
    plan_times = policy.plan_times if policy is not None else []
    route = float(sum(policy.route_times)) if policy is not None else 0.0
    waypoints = float(sum(policy.waypoint_times)) if policy is not None else 0.0
    strays = policy.route_strays if policy is not None else 0
    wanted = policy.history - 1 if method == "world_model" else -1  # history frames asked for (--context caps)
    per = episode_records(errors, cfg.tolerance)
    call = float(np.mean(plan_times)) if plan_times else 0.0
    records = [{
        "protocol": protocol.name, "seed": seed, "method": method, "index": j,
        "source_episode": setup.store.episodes[int(eps["episode"][j])].uid, "t0": int(eps["t0"][j]),
        "start_qpos": eps["qpos"][j].tolist(), "goal_qpos": eps["goal_qpos"][j].tolist(),
        "success": bool(per["success"][j]), "held": bool(per["held"][j]),
        "steps_to_success": int(per["steps_to_success"][j]), "final_error": float(per["final_error"][j]),
        "min_error": float(per["min_error"][j]), "history_frames": int(real[j]),
        "history_wanted": wanted,
        # one planning call serves all episodes of the batch; an episode's share of all of them
        "plan_time_per_call_s": call, "plan_time_per_episode_s": (call * len(plan_times) + route) / n,
        "plan_calls": len(plan_times),
        "route_time_batch_s": route,
        "waypoint_time_batch_s": waypoints,  # part of the planning calls' time
        "route_strays_batch": strays,  # plans in which some arm was beyond the solved paths (subgoals only)
        "wall_time_batch_s": wall,
    } for j in range(n)]
    return {"records": records, "curve": (errors if errors.ndim == 2 else errors[..., -1]).tolist()}


def closed_loop_check(model, store: EpisodeStore, train_ids: list[int], val_ids: list[int], episodes: int,
                      planner: dict | None = None, protocol: str = "reach25") -> dict:
    """A small closed-loop evaluation during training on validation episodes (world model only, one seed,
    the default planner with ``planner``'s settings (by name) on top, subgoals over the training episodes):
    {"<protocol>_latched": rate, "<protocol>_held": rate}, logged to TensorBoard by ``wm train``. The model
    is left in eval mode (the caller puts it back in training)."""
    model.eval()
    batch = batch_like(store, episodes)
    try:
        setup = Setup(model, {}, store, val_ids, "", batch, train=train_ids)
        latched, held, *_ = world_model_rates(setup, apply_overrides(PolicyConfig(), planner or {}), protocol, episodes)
    finally:
        batch.close()
    return {f"{protocol}_latched": latched, f"{protocol}_held": held}


def check_closed_loop_episodes(store: EpisodeStore, val_ids: list[int], episodes: int, protocol: str = "reach25"):
    """A ValueError when ``closed_loop_check`` could not draw ``episodes`` episodes: what ``wm train`` asks
    before its first step, not after its last."""
    start_rows(store, val_ids, parse_protocols(protocol)[0], episodes, GOAL_TOLERANCE)


closed_loop_check.check_episodes = check_closed_loop_episodes


def world_model_records(setup: Setup, policy: PolicyConfig, protocol: str, episodes: int, seed: int = 0) -> list[dict]:
    """The evaluation records of the world-model policy on one seed of ``protocol``: ``episodes`` episodes
    planned together (the same episodes and noise keys for every ``policy``)."""
    cfg = EvalConfig(episodes=episodes, seeds=1, policy=policy, baselines="")
    return run_protocol_seed(setup, cfg, parse_protocols(protocol)[0], seed, ["world_model"], {})


def world_model_rates(setup: Setup, policy: PolicyConfig, protocol: str, episodes: int, seed: int = 0):
    """(latched rate, held rate, seconds per planning call, planning seconds per episode) of
    ``world_model_records`` (an episode's share of every call, subgoal routing included)."""
    records = world_model_records(setup, policy, protocol, episodes, seed)
    first = records[0]  # the batch's timings, the same in every record
    return (float(np.mean([r["success"] for r in records])), float(np.mean([r["held"] for r in records])),
            first["plan_time_per_call_s"], first["plan_time_per_episode_s"])


def closed_loop_rates(checkpoint: str, data: str = "", split: str = "test", episodes: int = 50,
                      protocol: str = "reach25", seed: int = 0, policy: PolicyConfig | None = None,
                      device: str = "auto") -> tuple[float, float]:
    """(latched rate, held rate) of the world-model policy (as the model file records, unless ``policy``) on
    one seed of ``protocol`` from ``checkpoint``'s ``split`` episodes: what a study records beside its own
    numbers."""
    setup = load_setup(checkpoint, data, episodes, device, split)
    try:
        latched, held, *_ = world_model_rates(setup, policy or policy_config(checkpoint), protocol, episodes, seed)
    finally:
        setup.batch.close()
    return latched, held
