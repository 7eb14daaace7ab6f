"""``wm train``: the LeJEPA world-model training loop (prediction loss + SIGReg), no framework.

Every random draw of step ``k`` (the batch, the SIGReg directions) comes from ``(seed, k, rank)``, so
``--resume`` continues a run exactly as if it had never stopped. Ctrl-C and SIGTERM finish the step in
flight, save, and stop. Run data-parallel with ``torchrun --nproc_per_node=N -m wm train ...``.

The step never waits for the GPU: a non-finite loss sets a flag on the device, read at logging steps
and before every checkpoint (a diverged run stops there, naming the steps, and keeps the last good
checkpoint). Before a checkpoint is written the model is also checked sound (finite parameters of
bounded size and growth, a loss in line with the last good checkpoint's), so a run blown up by a huge
learning rate never replaces a sound checkpoint. The run directory is locked while a run uses it.
"""

from __future__ import annotations

import logging
import dataclasses
import math
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from common.config import (apply_overrides, check_at_least, check_at_most, check_choices, check_paths_named,
                           config_fields, nested, option)
from common.device import THREADS_HELP, autocast_for
from common.files import atomic_write_json, output_dir, output_lock, remove_stale_temporaries
from common.process import ignore_stop_signals
from envs.dataset import EpisodeStore, WindowDataset, WindowSpec, check_fractions
from envs.storage import DEFAULT_DATA, DatasetError, check_not_the_source, recording
from worldmodel import distributed, rundir
from worldmodel.datasplit import split_record
from worldmodel.graph import GraphConfig, LatentGraph, graph_settings
from worldmodel.model import PRESET_PLANNER, WorldModel, WorldModelConfig
from worldmodel.objective import (SIGREG_SCOPES, batch_indices, effective_rank, lr_at, step_generator,
                                  validation_metrics, world_model_losses)
from worldmodel.probe import PROBE_STATES, run_probe
from worldmodel.sigreg import TARGETS as SIGREG_TARGETS

log = logging.getLogger(__name__)

DEFAULT_RUN = "runs/demo"  # where `wm train` writes and `wm eval/probe/demo` read, by default


@dataclass
class TrainConfig:
    """``wm train``: train encoder and predictor with prediction loss + SIGReg."""

    data: str = option(DEFAULT_DATA, "dataset: a directory of .h5 shards, or one .h5 file (ours or "
                                     "stable-worldmodel's)", path=True)
    env: str | None = option(None, "the environment of a dataset that does not record it (a stable-worldmodel file; "
                                   "default: reacher-easy); a dataset that records another is refused")
    out: str = option(DEFAULT_RUN, "run directory: model.pt, checkpoint.pt, tb/", path=True)
    preset: str = option("demo", "demo (2-core CPU), quick (demo on frames resized to 32 px, 3,000 steps: about "
                                 "a third of its training time, what `make demo` trains; holds the goal less), "
                                 "hold (demo on 96 px frames, 5,000 steps: holds the goal "
                                 "more; its model records CEM 100 x 10 as its planner, which wm eval and wm demo "
                                 "plan it with unless told otherwise), "
                                 "lewm-data (data of LeWorldModel's kind, 2-core CPU) or full (one GPU); the options "
                                 "you type override it", choices=("demo", "quick", "hold", "lewm-data", "full"))
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    overwrite: bool = option(False, "start again in --out although it holds a run (its model and checkpoint go)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    threads: int = option(0, THREADS_HELP)
    seed: int = option(0, "seed of initialisation, batches, SIGReg directions and the train/val/test split")
    # optimisation
    steps: int = option(3500, "optimiser steps")
    batch_size: int = option(32, "windows per step (per process under torchrun; at most 8192)")
    lr: float = option(1e-3, "peak learning rate (AdamW); may be lowered on --resume after a divergence")
    weight_decay: float = option(1e-3, "AdamW weight decay")
    warmup_steps: int = option(100, "linear warmup, then cosine decay to 0")
    grad_clip: float = option(1.0, "gradient norm clip; may change on --resume after a divergence")
    sigreg_weight: float = option(0.05, "lambda: weight of SIGReg in the loss (the LeJEPA reference's scale; "
                                        "LeWM uses 0.09)")
    sigreg_directions: int = option(256, "random 1-D projections per step")
    sigreg_scope: str = option("frames", "SIGReg over all frames of the batch pooled (frames) or per time step "
                                         "(step, LeWM's choice)", choices=SIGREG_SCOPES)
    sigreg_target: str = option("gaussian", "the distribution SIGReg pulls each projection towards (gaussian: "
                                            "LeJEPA; uniform, laplace: to test the theory's claim that only the "
                                            "Gaussian keeps the state linearly identifiable)",
                                choices=tuple(SIGREG_TARGETS))
    # data windows
    n_pred: int = option(5, "frames per window after the history (teacher-forced targets)")
    rollout_steps: int = option(5, "also train open-loop rollouts of this many steps (<= n-pred); 0: teacher "
                                   "forcing only")
    rollout_weight: float = option(1.0, "weight of the open-loop rollout loss")
    first_frame_rollout_weight: float = option(0.0, "weight of a second open-loop rollout loss, from each window's "
                                                    "first frame alone (left-padded), the way a planner conditioned "
                                                    "on one frame uses the model (LeWM's); 0: off")
    padded_history: str = option("unknown", "what a left-padded history (one frame repeated, zero actions) means: "
                                            "unknown (its predictions are scored in every window, so it stands for "
                                            "the data's mean motion) or rest (scored only in windows that start "
                                            "an episode, where the arm is at rest, so one frame is read as an arm "
                                            "at rest)", choices=("unknown", "rest"))
    slow_weight: float = option(0.0, "weight each predicted step by its latent change to the power -slow-weight, "
                                     "normalised to mean 1: more weight on slow motion, what holding a goal "
                                     "needs (0: every step alike)")
    val_fraction: float = option(0.1, "fraction of episodes held out to choose on (validation losses, probes, the "
                                      "closed-loop check, planner settings); recorded in the checkpoint")
    test_fraction: float = option(0.1, "fraction of episodes held out to report on (wm eval, probe, demo), never "
                                       "used to choose anything; recorded in the checkpoint")
    train_episodes: int = option(0, "train on at most this many of the training split's episodes (0: all; the "
                                    "validation and test episodes stay the same): a curve of data size")
    model: WorldModelConfig = nested(WorldModelConfig, "the architecture", flat=True)
    graph: GraphConfig = nested(GraphConfig, "the graph of training frames saved with the model (subgoals)")
    save_graph: bool = option(True, "build that graph when training ends and save it in model.pt, so the model "
                                     "plans with subgoals without its dataset")
    # bookkeeping
    log_every: int = option(25, "steps between TensorBoard scalars (and checks for a non-finite loss)")
    val_every: int = option(500, "steps between validation losses and rollouts")
    val_horizon: int = option(5, "rollout steps scored in validation")
    probe_every: int = option(0, "steps between linear probes (0: only at the end)")
    ckpt_every: int = option(500, "steps between checkpoints")
    eval_every: int = option(0, "steps between small closed-loop evaluations (0: only at the end)")
    eval_episodes: int = option(20, "episodes of the closed-loop evaluation logged to TensorBoard (0: none)")
    num_workers: int = option(0, "DataLoader worker processes (at most 256)")
    compile: bool = option(False, "torch.compile the model")

    def __post_init__(self):
        check_paths_named(self, ("data", "out"))
        check_at_least(self, 1, ("steps", "batch_size", "sigreg_directions", "n_pred", "val_horizon", "log_every",
                                 "val_every", "ckpt_every"))
        check_at_least(self, 0, ("seed", "warmup_steps", "rollout_steps", "probe_every", "eval_every", "eval_episodes",
                                 "num_workers", "train_episodes", "weight_decay", "sigreg_weight", "rollout_weight",
                                 "first_frame_rollout_weight", "slow_weight"))
        check_at_least(self, 0, ("lr", "grad_clip"), strictly=True)
        # a mistyped size is refused, not met by the OOM killer (--batch-size 100000 took a 2-core machine down)
        check_at_most(self, 8192, ("batch_size",))
        check_at_most(self, 256, ("num_workers",))
        check_fractions(self.val_fraction, self.test_fraction)
        if self.rollout_steps > self.n_pred:
            raise ValueError(f"--rollout-steps ({self.rollout_steps}) must be <= --n-pred ({self.n_pred}): the "
                             f"window holds the targets")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        check_choices(self)


PRESETS = {
    # 2-core CPU, the defaults: the conv encoder (16-32-64-128 channels) and MLP predictor on 64px
    # frames, windows of 3 + 5 frames with a 5-step open-loop rollout loss, 3,500 steps (README: results
    # and the validation curves behind each choice).
    "demo": {},
    # The demo's model on its 64 px frames area-resized to 32 px, with three conv stages (the last map still 4 x
    # 4), for 3,000 steps: 2.5x the steps per second, so about a third of the demo's training; what `make demo`
    # trains. On validation (with the subgoal graph's detour check) it reaches near and far goals about as often
    # as the demo and holds them more than at 2,000 steps, less than the demo (docs/NOTES.md: The `quick` preset at
    # 3,000 steps; A demo of 5.5 minutes; Links with no detour).
    "quick": {"steps": 3000, "image_size": 32, "encoder.conv_stages": 3},
    # The demo's model trained longer, meant for frames collected at 96 px (`wm collect --size 96`): planned
    # with CEM 100 x 10 (PRESET_PLANNER; the default planner held less on validation) it holds the goal at the
    # end 96-98% of the time, at 2.7-3.0x the demo's training (chosen on validation against 96 px at 3,500
    # steps and the demo: docs/NOTES.md and Results).
    "hold": {"steps": 5000},
    # Data of LeWorldModel's kind on a 2-core CPU (200-step episodes of i.i.d. uniform actions held for two
    # control steps: `wm collect --policy random --action-repeat 2 --steps 200`): the demo architecture,
    # 12,000 steps, meant for 1,200 episodes (chosen on validation over 6,000 steps and over 400 episodes:
    # docs/NOTES.md).
    "lewm-data": {"steps": 12000},
    # One GPU: a larger batch, longer schedule; bf16 autocast is on by itself on CUDA.
    "full": {"steps": 20000, "batch_size": 256, "lr": 5e-4, "warmup_steps": 500, "latent_dim": 128,
             "encoder.conv_channels": 64, "predictor.hidden": 1024, "num_workers": 4,
             "val_every": 1000, "probe_every": 2000, "ckpt_every": 2000},
}


def planner_settings(cfg: TrainConfig) -> dict:
    """The planner settings a run's model records (model.json's ``planner``): its preset's, and the subgoal
    graph's where ``--graph.*`` differs from the default (so it plans with the graph its file holds)."""
    return {**PRESET_PLANNER.get(cfg.preset, {}), **graph_settings(cfg.graph)}


# The data a preset was chosen on, where it was chosen on data of one kind: (what the dataset records, the
# collection that gives such data)
PRESET_DATA = {"hold": ({"size": 96, "policy": "mixed", "action_repeat": 1}, "wm collect --size 96"),
               "lewm-data": ({"size": 64, "action_repeat": 2, "policy": "random"},
                             "wm collect --policy random --action-repeat 2 --steps 200")}


def check_preset_data(cfg: TrainConfig, size: int, attrs: dict) -> None:
    """A preset chosen on data of one kind trains on any, with a warning naming what differs (``size``: the
    frames as trained on; ``attrs``: the dataset's attributes, defaults filled; a policy it does not record is
    no difference)."""
    wanted, collect = PRESET_DATA.get(cfg.preset, ({}, ""))
    here = {**recording(attrs), "policy": attrs.get("policy"), "size": size}
    differs = [f"{key} {here[key]!r} (chosen on {value!r})" for key, value in wanted.items()
               if here.get(key) is not None and here[key] != value]
    if differs:
        log.warning(f"--preset {cfg.preset} was chosen on other data than {cfg.data}: {', '.join(differs)}; "
                    f"`{collect}` collects data of its kind, for the results it was chosen for")


def preset_config(name: str, overrides: dict | None = None, **kwargs) -> TrainConfig:
    """The preset's config with ``overrides`` ({setting's name: value}, e.g. ``{"encoder.kind": "vit"}``) and
    keyword settings applied on top."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    return apply_overrides(TrainConfig(), {**PRESETS[name], "preset": name, **(overrides or {}), **kwargs})


class TrainingDiverged(RuntimeError):
    pass


class StepBatches(torch.utils.data.Sampler):
    """Batch indices for steps ``start..steps-1``, each drawn from ``(seed, step, rank)`` alone."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start, self.steps, self.rank = n, batch_size, seed, start, steps, rank

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield batch_indices(self.n, self.batch_size, self.seed, step, self.rank)


class StopRequest:
    """SIGINT/SIGTERM during training: remember it, let the step in flight finish, then stop at the
    step boundary (so the checkpoint holds exactly the completed steps; under torchrun all ranks stop
    together at the next logging step). A second Ctrl-C, a second or more later, stops at once. ``loud``:
    whether this process says so (rank 0 alone under torchrun, as for every other message)."""

    def __init__(self, loud: bool = True):
        self.loud = loud
        self.signal: int | None = None
        self.saved: int | None = None  # the last step, once its training state is saved: only measuring is left
        self.measuring: int | None = None  # a step saved before a mid-run measurement (--eval-every, --probe-every)
        self._at = 0.0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if time.monotonic() - self._at < 1.0:  # the same stop, delivered twice (terminal and torchrun)
                return
            raise KeyboardInterrupt
        self.signal, self._at = signum, time.monotonic()
        if self.saved is not None:
            self.say_saved()
        elif self.measuring is not None:
            if self.loud:
                log.warning(f"{signal.Signals(signum).name}: every step is saved (checkpoint.pt, step "
                            f"{self.measuring}); finishing this measurement, then stopping (Ctrl-C again to stop "
                            f"at once: --resume continues from step {self.measuring} either way)")
        elif self.loud:
            log.warning(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                        f"(Ctrl-C again to stop at once)")

    def say_saved(self) -> None:
        """What a stop during the end-of-training measurements means: nothing is lost either way."""
        if self.loud:
            log.warning(f"{signal.Signals(self.signal).name}: every step is saved (checkpoint.pt, step {self.saved}); "
                        f"finishing the end-of-training measurements and the model files (Ctrl-C again to stop "
                        f"at once: the same command then measures again and writes them)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def train(cfg: TrainConfig, progress: bool = True,
          closed_loop: Callable[..., dict] | None = None) -> dict:
    """Train (or resume) a world model; returns the final metrics. Writes under ``cfg.out``.

    ``closed_loop(model, store, train_ids, val_ids, episodes, planner) -> {name: value}`` (given by the
    command line, which sees the planners) runs a small closed-loop evaluation every ``eval_every`` steps
    and at the end, planned as the model will be (``planner``: the settings it records); its values are
    logged to TensorBoard under ``closed_loop/`` and kept in model.json. Its ``check_episodes(store,
    val_ids, episodes)``, if it has one, runs before the first step: a ValueError there stops the run.
    """
    out = Path(cfg.out)
    check_not_the_source(Path(cfg.data), out, "trains on")  # its model and logs would mix with the shards
    rank, world, device = distributed.setup(cfg.device)
    is_main = rank == 0
    try:
        with ExitStack() as held:
            def decide() -> str:  # one rank decides (--overwrite clears the run there later, in _train)
                held.enter_context(output_dir(out))  # removed again if the run fails before writing anything
                held.enter_context(output_lock(out))  # one run at a time in a directory
                remove_stale_temporaries(out, rundir.RUN_TEMPORARIES)
                return rundir.status(out, cfg)
            state = distributed.rank0_decides(decide)
            if state == "done":
                if is_main:
                    log.warning(f"{out} already holds this finished run (step {cfg.steps}); pass --overwrite to train "
                          f"it again, or choose another --out")
                return {**rundir.finished_metrics(out), "already_done": True}
            if state == "rebuild" and is_main:
                log.warning(f"{out} holds a finished run whose model.pt or model.json is missing or damaged: writing "
                            f"them again from checkpoint.pt (the end-of-training measurements run again)")
            return _train(cfg, rank, world, device, state in ("resume", "rebuild"), progress, closed_loop,
                          overwrite=state == "overwrite")
    finally:
        rundir.release_checkpoint()  # read to decide what to do, when it was not loaded after all
        distributed.teardown(world)


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, resume: bool, progress: bool,
           closed_loop, overwrite: bool = False) -> dict:
    # --- setup: data, model, optimiser, where to start, logs ---------------------------------------------
    is_main, out = rank == 0, Path(cfg.out)
    data = TrainingData(cfg)

    def check_and_clear() -> None:  # rank 0's; a refusal here stops every rank
        log.info(data.summary(cfg, device))
        if note := data.store.enlarged():
            log.warning(note)
        check_preset_data(cfg, data.store.size, data.store.attrs)
        check = getattr(closed_loop, "check_episodes", None)
        if check is not None and cfg.eval_episodes and data.can_evaluate:  # its episodes exist: checked now
            try:
                check(data.store, data.val.episode_ids, cfg.eval_episodes)
            except ValueError as exc:
                raise ValueError(f"--eval-episodes {cfg.eval_episodes}: {exc}; ask for fewer (0: no closed-loop "
                                 f"check)") from None
        if overwrite:  # the run there goes only now that this one can start
            stale = rundir.clear(out)
            if stale:
                log.warning(f"{out}: kept the results measured on the model this run replaces, which no longer "
                            f"describe it: {', '.join(str(p.relative_to(out)) for p in stale)} (their commands "
                            f"refuse to write over them without --overwrite)")
    distributed.rank0_decides(check_and_clear)
    torch.manual_seed(cfg.seed)
    model = WorldModel(dataclasses.replace(cfg.model, image_size=data.store.size,
                                           env=str(data.store.attrs["env"]))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a finished run rebuilt on another number of processes records the number that trained it
    start, history, good, trained_world = (rundir.load(out, cfg, model, opt, data.store, world) if resume
                                           else (0, [], {}, world))
    if is_main:
        atomic_write_json(out / "train_config.json", dataclasses.asdict(cfg))
    net = _wrap(model, cfg, world, device)
    loader = data.loader(cfg, start, rank, device)
    writer = _writer(out, start) if is_main else None
    if writer is not None and start == 0:
        _log_frames(writer, data.train)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", disable=not (progress and is_main),
               unit="step")
    guard = DivergenceGuard(cfg, out, start, device, good)
    metrics: dict = {}
    t_last, frames_seen = time.perf_counter(), 0
    checkpointed, checked = (start if resume else None), None  # the step checkpoint.pt holds; its judged health

    def save(done: int, model_files: bool = True) -> None:
        nonlocal checkpointed, checked
        # never save weights a diverging run has touched; judged once per step (the model files of a step
        # whose checkpoint was saved before its measurements reuse that judgement)
        health = checked if checkpointed == done and checked else guard.check_sound(model, done)
        if world > 1:
            metrics["ddp_max_param_diff"] = distributed.check_in_sync(model)
        if is_main:  # the finished model carries what planning needs: the graph of its training frames
            extras = ({"graph": LatentGraph.build(model, data.store, data.train.episode_ids, cfg.graph).state(cfg.graph)}
                      if model_files and done == cfg.steps and cfg.save_graph else {})
            rundir.save(out, model, opt, cfg, done, metrics, history, data.record, health, extras,
                        planner_settings(cfg), checkpoint=checkpointed != done, model_files=model_files,
                        world=trained_world)
        checkpointed, checked = done, health

    if start == cfg.steps:  # a finished run whose model files were lost: written again from its checkpoint
        if is_main:
            metrics.update(_evaluate(model, data, cfg, start, _MissingPoints(writer, start), closed_loop, device))
        save(start)

    # --- the loop --------------------------------------------------------------------------------------
    finished = False  # every step run and the model saved
    step_keys = ("pixels", "actions") + (("starts_episode",) if cfg.padded_history == "rest" else ())
    batches = iter(loader)  # its worker processes, with --num-workers, stopped in `finally`
    with StopRequest(loud=is_main) as stop:
        try:
            for step, batch in enumerate(batches, start=start):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_at(step, cfg.warmup_steps, cfg.steps)
                # only what the step reads goes to the device
                batch = {k: batch[k].to(device, non_blocking=True) for k in step_keys}
                with autocast_for(device):
                    losses = world_model_losses(net, batch, cfg, step_generator(cfg.seed, step, 0, device))
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                guard.note(losses["loss"], grad_norm)
                opt.step()

                done = step + 1
                frames_seen += batch["pixels"].shape[0] * batch["pixels"].shape[1] * world
                bar.update(1)
                last = done == cfg.steps
                logging = done % cfg.log_every == 0 or last
                if logging:
                    guard.check(done)
                    logged = _over_ranks(losses)  # on every rank: a collective
                    if writer is not None:
                        now = time.perf_counter()
                        scalars = _scalars(logged, opt, grad_norm, frames_seen / (now - t_last))
                        t_last, frames_seen = now, 0
                        _log(writer, scalars, done)
                        guard.logged(float(losses["loss"].detach()))  # this rank's own, as the guard's other losses
                        bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", fps=f"{scalars['speed/frames_per_s']:.0f}")
                        metrics.update(scalars)
                if last or any(every and done % every == 0 for every in (cfg.eval_every, cfg.probe_every)):
                    save(done, model_files=False)  # the training state first: a stop while measuring loses no step
                    if last:
                        stop.saved = done
                        if stop.signal is not None:  # a stop during the last step: it said "saving"
                            stop.say_saved()
                    else:
                        stop.measuring = done
                if is_main:
                    metrics.update(_evaluate(model, data, cfg, done, writer, closed_loop, device))
                stop.measuring = None
                saved = done % cfg.ckpt_every == 0 or last
                if saved:
                    save(done)
                # one process stops at the step boundary; data-parallel ranks agree at a logging step
                stopping = stop.signal is not None if world == 1 else (
                    logging and distributed.any_rank(torch.tensor(stop.signal is not None, device=device)))
                if stopping and not last:
                    if not saved:
                        save(done)
                    if is_main:
                        log.warning(f"stopped: checkpoint at step {done} in {out}; continue with --resume")
                    raise KeyboardInterrupt
            distributed.finish(world)
            finished = True
        except DatasetError as exc:
            raise _from_worker(exc) from None
        finally:
            _stop_workers(batches)
            bar.close()
            if writer is not None:
                if finished and (cfg.steps > start or not (out / "tb" / "hparams").is_dir()):  # once per run
                    _log_hparams(writer, cfg, metrics)
                writer.close()
    return metrics


# --- what the loop uses ---------------------------------------------------------------------------------
class TrainingData:
    """The dataset, its training and validation windows (split by episode), and what the checkpoint
    records about them."""

    def __init__(self, cfg: TrainConfig):
        self.store = EpisodeStore(cfg.data, image_size=cfg.model.image_size, env=cfg.env)
        history, fs = cfg.model.history, cfg.model.frameskip
        fractions = (cfg.val_fraction, cfg.seed, cfg.test_fraction)
        self.train = WindowDataset(self.store, WindowSpec(history, cfg.n_pred, fs), "train", *fractions, states=False,
                                   episodes=cfg.train_episodes)
        if len(self.train.episode_ids) < cfg.train_episodes:
            raise ValueError(f"--train-episodes {cfg.train_episodes}: {cfg.data} has only "
                             f"{len(self.train.episode_ids)} training episodes")
        try:
            self.val = WindowDataset(self.store, WindowSpec(history, cfg.val_horizon, fs), "val", *fractions,
                                     states=False)
        except DatasetError as exc:  # its windows predict --val-horizon steps, not --n-pred
            raise DatasetError(f"{exc} (validation windows predict --val-horizon {cfg.val_horizon} steps: lower it "
                               f"too)") from None
        if not self.val.episode_ids:  # too few episodes to hold one out: nothing to choose on, or to validate
            least, roles = (3, ", one to report on") if cfg.test_fraction > 0 else (2, "")
            raise ValueError(f"{cfg.data} holds {len(self.store)} episode(s): training needs at least {least} (one to "
                             f"train on, one held out to validate on{roles}; --val-fraction {cfg.val_fraction}, "
                             f"--test-fraction {cfg.test_fraction})")
        self.val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.val, _spread(len(self.val), 512)),
                                                      batch_size=256)
        ids = {"train": self.train.episode_ids, "val": self.val.episode_ids, "test": self.store.split("test", *fractions)}
        self.record = split_record(self.store, cfg.data, ids, model_dir=cfg.out)
        self.can_probe = not set(PROBE_STATES) & set(self.store.missing_states)
        self.can_evaluate = not {"qpos", "qvel"} & set(self.store.missing_states)  # starts of closed-loop episodes

    def summary(self, cfg: TrainConfig, device: torch.device) -> str:
        """One paragraph: what was read, what was assumed, and what runs when training ends."""
        rec, store = recording(self.store.attrs), self.store
        assumed = f"; assumed (the data does not say): {', '.join(store.assumed)}" if store.assumed else ""
        stored = (f"{store.source_size} px" if store.source_size else
                  "x".join(map(str, store.attrs.get("frame_shape") or ("?", "?"))) + " px (not square: stretched)")
        sizes = f"{stored} stored, resized to {store.size}" if store.size != store.source_size else f"{store.size} px"
        if rec["stretched_from"]:
            sizes += f" (a copy of {'x'.join(map(str, rec['stretched_from']))} px frames stretched to a square)"
        used = (self.train.episode_ids, self.val.episode_ids, self.record["test"])
        unused = len(store) - sum(len(ids) for ids in used)  # --train-episodes leaves these out
        trained = f"{len(self.train.episode_ids)} train" + (f" ({unused} left out: --train-episodes)" if unused else "")
        lines = [f"data: {cfg.data} ({store.layout}, {len(store)} episodes: {trained}, "
                 f"{len(self.val.episode_ids)} validation, {len(self.record['test'])} test); env {rec['env']}, "
                 f"{rec['action_repeat']} control step(s) per action, {rec['render_quality']} look, target "
                 f"{'hidden' if rec['hide_target'] else 'shown'}, frames {sizes}{assumed}; missing states: "
                 f"{', '.join(store.missing_states) or 'none'}",
                 f"device {device}, {torch.get_num_threads()} torch thread(s)"]
        if cfg.eval_episodes and self.can_evaluate:
            lines.append(f"when training ends: the probes and a closed-loop check of {cfg.eval_episodes} validation "
                         f"episodes (about a minute on a CPU; --eval-episodes 0 turns it off)")
        elif cfg.eval_episodes:
            lines.append("no closed-loop check when training ends: the data lacks the joint angles or velocities "
                         "its episodes start from (qpos, qvel)")
        return "\n".join(lines)

    def loader(self, cfg: TrainConfig, start: int, rank: int, device: torch.device):
        """Batches of steps ``start..steps-1``; step k's windows come from (seed, k, rank) alone."""
        return torch.utils.data.DataLoader(
            self.train, batch_sampler=StepBatches(len(self.train), cfg.batch_size, cfg.seed, start, cfg.steps, rank),
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


def _stop_workers(batches) -> None:
    """Stop the DataLoader's worker processes now, whatever ended the loop. Left to the iterator's garbage
    collection, an error raised in a worker (a corrupt chunk read lazily) kept them alive to the end, where
    multiprocessing's exit terminates and joins them: they ignore SIGTERM (``ignore_stop_signals``), so the
    command hung after printing its error."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # a multi-process iterator's (torch has no public one)
    if shutdown is not None:
        shutdown()


def _from_worker(exc: DatasetError) -> DatasetError:
    """A dataset error (naming the file and episode) as raised, also when a DataLoader worker raised it: torch
    raises it again with the worker's traceback as its message, the error's own at the bottom."""
    text = str(exc)
    if not (text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]):
        return exc
    message = text.rstrip().rsplit(f"{type(exc).__name__}: ", 1)[-1]
    return distributed.same_error(type(exc), message)  # its own kind (an EnvMismatchError stays one)


def _wrap(model: WorldModel, cfg: TrainConfig, world: int, device: torch.device):
    """What the step calls: the model, data-parallel under torchrun, compiled with ``--compile``."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(net) if cfg.compile else net


PARAM_LIMIT = 1e4  # largest |parameter| of a sound model (trained ones stay within a few units)
PARAM_GROWTH = 10.0  # how much the parameters' norm may grow between two checkpoints
LOSS_GROWTH = 10.0  # how far the recent loss may rise above the last good checkpoint's
LOSS_FLOOR = 0.01  # losses below this count as this (a rise from 1e-6 to 1e-5 is no divergence)


class DivergenceGuard:
    """A non-finite loss or gradient sets a flag on the device (no host sync in the step); the flag is read
    at logging steps and before every checkpoint, and a set flag stops the run naming the steps. Before a
    checkpoint the model is also checked sound against the last good checkpoint (``check_sound``): a run
    whose parameters or loss blew up while staying finite is stopped instead of saved."""

    def __init__(self, cfg: TrainConfig, out: Path, start: int, device: torch.device, good: dict | None = None):
        self.cfg, self.out = cfg, out
        self.done = self.checked = start  # completed steps; steps known to have had finite losses
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # the last good checkpoint's health (HEALTH_KEYS); before the first, only the learning rate
        self.good = {"lr": cfg.lr, **(good or {})}
        self.losses: list[float] = []  # losses read since the last good checkpoint
        self.first: float | None = None  # the run's first logged loss: the baseline before a good checkpoint
        self._loss: torch.Tensor | None = None

    def note(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)
        self._loss = loss.detach()

    def logged(self, loss: float) -> None:
        """A loss read on the host at a logging step: part of the run's recent history."""
        self.losses.append(loss)
        if self.first is None:
            self.first = loss

    def check(self, done: int) -> None:
        self.done = done
        if self.checked == done:  # already checked at this step (a logging step that also saves)
            return
        if distributed.any_rank(self.nonfinite):
            raise TrainingDiverged(_divergence_message(self, f"non-finite loss {_steps(self.checked, done)}"))
        self.checked = done

    def check_sound(self, model: torch.nn.Module, done: int) -> dict:
        """Before saving step ``done``: finite losses, and parameters and loss in line with the last good
        checkpoint; returns the health the checkpoint records, or stops the run (``TrainingDiverged``)."""
        self.check(done)
        recent = self.losses + ([float(self._loss)] if self._loss is not None else [])
        health = {"step": done, "lr": self.cfg.lr, **parameter_health(model)}
        if recent:
            health["loss"] = float(np.median(recent))
        # before the first good checkpoint, the loss is held to the run's first logged one (a sound run's
        # first logged loss is its highest)
        baseline = self.good if "loss" in self.good or self.first is None else {**self.good, "loss": self.first}
        problem = unsound(health, baseline)
        if distributed.any_rank(torch.tensor(problem is not None, device=self.nonfinite.device)):
            raise TrainingDiverged(_divergence_message(self, f"the model at step {done} is unsound: "
                                                              f"{problem or 'on another rank'}; it was not saved"))
        self.good, self.losses = health, []
        return health


def parameter_health(model: torch.nn.Module) -> dict:
    """The parameters' norm, and the largest magnitude of parameters and running statistics (buffers, such
    as a BatchNorm's running variance, which a blow-up inflates too); inf when any of them is not finite."""
    with torch.no_grad():
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        stats = [b.detach().float().flatten() for b in model.buffers() if b.is_floating_point()]
        every = torch.cat([flat, *stats])
        if not bool(torch.isfinite(every).all()):
            return {"param_norm": math.inf, "param_max": math.inf}
        return {"param_norm": float(torch.linalg.vector_norm(flat)), "param_max": float(every.abs().max())}


def unsound(health: dict, good: dict) -> str | None:
    """Why a model with ``health`` must not replace the checkpoint with ``good`` health, or None."""
    if not math.isfinite(health["param_max"]):
        return "non-finite parameters"
    if health["param_max"] > PARAM_LIMIT:
        return (f"parameters or running statistics up to {health['param_max']:.3g} (a sound model's stay far below "
                f"{PARAM_LIMIT:g})")
    if good.get("param_norm") and health["param_norm"] > PARAM_GROWTH * good["param_norm"]:
        return (f"the parameters' norm grew {health['param_norm'] / good['param_norm']:.3g}x since the last good "
                f"checkpoint (at most {PARAM_GROWTH:g}x)")
    if good.get("loss") is not None and health.get("loss") is not None:
        if health["loss"] > LOSS_GROWTH * max(good["loss"], LOSS_FLOOR):
            since = "at the last good checkpoint" if "step" in good else "when first logged"
            return f"the loss rose from {good['loss']:.4g} {since} to {health['loss']:.4g}"
    return None


def _steps(checked: int, done: int) -> str:
    return f"at step {done}" if done == checked + 1 else f"between steps {checked + 1} and {done}"


def _evaluate(model: WorldModel, data: TrainingData, cfg: TrainConfig, done: int, writer, closed_loop,
              device: torch.device) -> dict:
    """The measurements due at step ``done`` (rank 0): validation losses, probes, the closed-loop check."""
    last, metrics = done == cfg.steps, {}
    if done % cfg.val_every == 0 or last:
        with autocast_for(device):
            val = validation_metrics(model, data.val_loader, cfg.model.history, device)
        writer.add_scalar("val/prediction_loss", val["prediction_loss"], done)
        for k, (mse, rel) in enumerate(zip(val["mse"], val["relative"]), start=1):
            writer.add_scalar(f"val/rollout_mse_step{k}", mse, done)
            writer.add_scalar(f"val/rollout_relative_step{k}", rel, done)
        for k, rel in enumerate(val["first_frame_relative"], start=1):
            writer.add_scalar(f"val/first_frame_rollout_relative_step{k}", rel, done)
        metrics["val"] = val
    if data.can_probe and ((cfg.probe_every and done % cfg.probe_every == 0) or last):
        probe = run_probe(model, data.store, data.train.episode_ids, data.val.episode_ids)
        _log(writer, {f"probe/r2_{k}": v for k, v in probe.items()}, done)
        metrics["probe"] = probe
    if (closed_loop is not None and cfg.eval_episodes and data.can_evaluate
            and ((cfg.eval_every and done % cfg.eval_every == 0) or last)):
        result = closed_loop(model, data.store, data.train.episode_ids, data.val.episode_ids, cfg.eval_episodes,
                             planner_settings(cfg))
        model.train()
        _log(writer, {f"closed_loop/{k}": v for k, v in result.items()}, done)
        metrics["closed_loop"] = result
    return metrics


def _log(writer, scalars: dict, step: int) -> None:
    for k, v in scalars.items():
        writer.add_scalar(k, v, step)


# the losses world_model_losses returns (beside the embeddings, "z")
LOSS_KEYS = ("loss", "pred_loss", "sigreg", "rollout_loss", "first_frame_rollout_loss")


def _over_ranks(losses: dict) -> dict:
    """``losses`` with each loss averaged over the ranks (each draws its own windows) and the embeddings of
    every rank's windows, so what is logged is the run's, not rank 0's."""
    keys = [k for k in LOSS_KEYS if k in losses]
    mean = distributed.mean_over_ranks(torch.stack([losses[k].detach().float() for k in keys]))
    return {**losses, **dict(zip(keys, mean)), "z": distributed.rows_of_all_ranks(losses["z"].detach())}


def _scalars(losses: dict, opt, grad_norm, frames_per_s: float) -> dict:
    """What a logging step writes (the loop reads tensors on the host only at logging steps and saves)."""
    z = rearrange(losses["z"], "b l d -> (b l) d")
    scalars = {"loss/total": losses["loss"].item(), "loss/prediction": losses["pred_loss"].item(),
               "loss/sigreg": losses["sigreg"].item(), "embedding/std": z.std(0).mean().item(),
               "embedding/effective_rank": effective_rank(z), "opt/lr": opt.param_groups[0]["lr"],
               "opt/grad_norm": float(grad_norm), "speed/frames_per_s": frames_per_s}
    if "rollout_loss" in losses:
        scalars["loss/rollout"] = losses["rollout_loss"].item()
    if "first_frame_rollout_loss" in losses:
        scalars["loss/first_frame_rollout"] = losses["first_frame_rollout_loss"].item()
    return scalars


def _divergence_message(guard: DivergenceGuard, what: str) -> str:
    """``what`` went wrong, what is kept, and advice that works: a quarter of the lowest of this run's
    learning rate and the one the last good checkpoint was reached with, and before any checkpoint at most
    the default rate (an absurd rate is never scaled)."""
    cfg, ckpt = guard.cfg, guard.out / "checkpoint.pt"
    lr = min(cfg.lr, guard.good["lr"]) / 4
    if not ckpt.is_file():  # a run that diverged from the start: not a quarter of an absurd rate
        lr = min(lr, TrainConfig.lr)
    if ckpt.is_file():
        previous = guard.out / rundir.PREVIOUS
        before = f" (and the one before it as {previous})" if previous.is_file() else ""
        step = int(guard.good["step"]) if "step" in guard.good else "?"
        advice = (f"the last good checkpoint is {ckpt} (step {step}){before}; continue "
                  f"from it with a lower learning rate, e.g. `wm train ... --resume --lr {lr:g}` (or another "
                  f"--grad-clip)")
    else:
        advice = (f"no checkpoint was written yet (the first is due at step {cfg.ckpt_every}); start again with "
                  f"a lower learning rate, e.g. --lr {lr:g}")
    return f"{what}; {advice}"


def _log_hparams(writer, cfg: TrainConfig, metrics: dict) -> None:
    """The run's settings beside its final numbers, for TensorBoard's HParams tab."""
    hparams = {f.path: f.value if isinstance(f.value, (int, float, str, bool)) else str(f.value)
               for f in config_fields(cfg) if f.path not in ("data", "out", "resume", "overwrite", "device")}
    final = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k.startswith("loss/")}
    final |= {f"hparam/probe_{k}": v for k, v in metrics.get("probe", {}).items()}
    final |= {f"hparam/closed_loop_{k}": v for k, v in metrics.get("closed_loop", {}).items()}
    writer.add_hparams(hparams, final, run_name="hparams")


def _spread(n: int, k: int) -> list[int]:
    """At most k indices spread evenly over range(n): a fixed validation subset."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).astype(int).tolist()))


def _writer(out: Path, start: int):
    """TensorBoard's writer for a run continuing after step ``start``: what an earlier process logged after it
    (a run killed after its checkpoint, a diverged one) is hidden, so each step shows once, as logged now."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"), purge_step=start + 1)


class _MissingPoints:
    """A writer adding only the scalars TensorBoard lacks at ``step``: a finished run measured again (its model
    files rebuilt) logged them there already, unless it was stopped while measuring; ``_writer`` hides only
    what came after that step, so each measurement showed twice."""

    def __init__(self, writer, step: int):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        writer.flush()
        # the reader's own notes ("Directory watcher advancing", a purge of what a resume hid) are not the run's,
        # and wm shows INFO on stderr
        quiet = logging.getLogger("tensorboard")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            events = EventAccumulator(writer.log_dir).Reload()
        finally:
            quiet.setLevel(level)
        self.writer = writer
        self.logged = {tag for tag in events.Tags()["scalars"] if any(e.step == step for e in events.Scalars(tag))}

    def add_scalar(self, tag: str, value, step: int) -> None:
        if tag not in self.logged:
            self.writer.add_scalar(tag, value, step)


def _log_frames(writer, ds: WindowDataset, rows: int = 6) -> None:
    """An image grid of a few training windows (rows: windows, columns: time)."""
    pick = _spread(len(ds), rows)
    frames = torch.stack([ds[k]["pixels"] for k in pick])  # (R, L, H, W, 3)
    writer.add_image("data/windows", rearrange(frames, "r l h w c -> c (r h) (l w)"), 0)
