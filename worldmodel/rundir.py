"""A training run's directory: whether it may be started, continued or left alone, and writing it safely.

    runs/NAME/model.pt, model.json   the model for users: weights; config, step, data split, metrics
    runs/NAME/checkpoint.pt          model + optimizer + step + settings + history + health, for --resume
    runs/NAME/checkpoint.prev.pt     the checkpoint before it, kept as a way back
    runs/NAME/train_config.json      the settings of the run
    runs/NAME/tb/                    TensorBoard
    runs/NAME/.wm.lock               while a run uses the directory: its pid

Every file is written atomically, so an interrupt or a full disk leaves the last good checkpoint; a
checkpoint is written only after the training loop checked the model sound (``train.DivergenceGuard``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

from common.config import config_fields, from_dict
from common.files import read_json, temporary_path
from common.provenance import provenance
from envs.dataset import fingerprint_at
from envs.storage import DatasetError
from worldmodel.model import CheckpointError, WorldModel, atomic_torch_save, load_weights_file, read_model_meta

# Settings that may differ on --resume without changing what the run computes (a moved run or dataset
# included: the dataset's fingerprint is checked instead of its path).
RESUME_FREE = {"out", "data", "resume", "overwrite", "device", "num_workers", "log_every", "val_every",
               "probe_every", "ckpt_every", "compile", "eval_every", "eval_episodes", "threads", "save_graph",
               "graph.neighbours", "graph.radius", "graph.max_nodes", "graph.detour"}
# Settings a resumed run may change to recover from a divergence; each change is kept in the run's history.
RECOVERY = ("lr", "grad_clip")
PREVIOUS = "checkpoint.prev.pt"
RUN_FILES = ("model.pt", "model.json", "checkpoint.pt", PREVIOUS, "train_config.json")
RUN_TEMPORARIES = "|".join(map(re.escape, RUN_FILES))  # what killed runs leave: <name>.<pid>.tmp
HEALTH_KEYS = ("step", "lr", "loss", "param_norm", "param_max")  # what a checkpoint records of the model's health


class RunWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, lost permissions); the last good one is kept."""


def flat_settings(cfg) -> dict:
    """{name: value} of every setting of a (nested) config."""
    return {f.name: f.value for f in config_fields(cfg)}


def saved_settings(saved: dict, cls, what: str, filled: list | None = None) -> dict:
    """{name: value} of a config saved by ``dataclasses.asdict``, read as today's code reads it: settings
    added since it was written take today's defaults (their names go to ``filled``)."""
    missing: list = []
    cfg = from_dict(cls, saved, what, missing)
    if filled is not None:  # from attribute paths ("model.encoder.x") to the settings' names ("encoder.x")
        names = {f.path: f.name for f in config_fields(cfg)}
        filled.extend(names.get(p, p) for p in missing)
    return flat_settings(cfg)


def _differences(saved: dict, cfg, ignore) -> dict:
    now = flat_settings(cfg)
    return {k: (saved.get(k), v) for k, v in now.items() if k not in ignore and saved.get(k) != v}


def status(out: Path, cfg) -> str:
    """What to do with ``out``: ``fresh`` (start), ``overwrite`` (start, the run there cleared by ``clear``
    once the new one has checked its data and settings), ``resume`` (continue), ``done`` (nothing: it holds a
    finished run of these settings) or ``rebuild`` (a finished run whose model.pt or model.json is missing or
    damaged: written again from its checkpoint). A run in the way is an error that says what to type."""
    ckpt = out / "checkpoint.pt"
    if cfg.overwrite:
        return "overwrite"
    step, saved = recorded_run(out, type(cfg))
    finished = step is not None and step == saved.get("steps") and not _differences(saved, cfg, RESUME_FREE | set(RECOVERY))
    if finished and (other := _other_data(out, cfg)):  # --data may move, not change: the run is not this one
        raise ValueError(f"{out} holds a finished run of these settings trained on other data: {other}; --overwrite "
                         f"trains it again on {cfg.data}, or choose another --out")
    if finished and not model_intact(out, step):
        if not ckpt.is_file():
            raise CheckpointError(f"{out / 'model.pt'} is missing or damaged and the finished run in {out} has no "
                                  f"checkpoint to write it again from; --overwrite trains it again")
        return "rebuild"
    if cfg.resume:
        if finished:  # nothing to resume (its checkpoint may have been deleted to save room)
            return "done"
        if not ckpt.is_file():
            if step is not None or (out / PREVIOUS).is_file():  # its checkpoint went missing
                raise ValueError(f"--resume: no checkpoint at {ckpt}{_previous_hint(out)}; --overwrite starts "
                                 f"the run again")
            raise ValueError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
        return "resume"
    if step is None and (out / "model.pt").is_file():  # a model handed over, say: never replaced unasked
        raise ValueError(f"{out / 'model.pt'} is there without a readable model.json or checkpoint.pt of its run; "
                         f"training would replace it: --overwrite does, or choose another --out")
    if step is None:  # nothing worth keeping (a run that stopped before its first checkpoint)
        return "fresh"
    if finished:  # the same settings, so the same number of steps
        return "done"
    diff = _differences(saved, cfg, RESUME_FREE)
    other = f" with other settings (saved, now): {diff}" if diff else ""
    data = _other_data(out, cfg)
    other += f"{' and' if diff else ''} trained on other data: {data}" if data else ""
    if step >= saved.get("steps", 0):
        advice = "it is finished"
    elif ckpt.is_file():  # on its own data: --resume refuses other data
        advice = f"pass --resume{' without --data (it finds its own)' if data else ''} to continue it"
    else:
        advice = f"its {ckpt.name} is gone{_previous_hint(out)}"
    raise ValueError(f"{out} already holds a run at step {step} of {saved.get('steps')}{other}; {advice}, --overwrite "
                     f"to start again, or choose another --out")


def _other_data(out: Path, cfg) -> str:
    """How the data the run in ``out`` records differs from ``cfg.data`` (by fingerprint: a moved dataset is the
    same), or "" when alike or either is unknown (an older record; data not there, which the run does not need)."""
    ckpt = out / "checkpoint.pt"
    record = read_checkpoint(ckpt).get("data") if ckpt.is_file() else None
    if not isinstance(record, dict):  # no checkpoint, or one from before it kept the data record
        record = read_json(out / "model.json").get("data")
    if not isinstance(record, dict) or not record.get("fingerprint"):
        return ""
    try:
        here = fingerprint_at(cfg.data, cfg.env)
    except (DatasetError, OSError):
        return ""
    if here == record["fingerprint"]:
        return ""
    return f"{record.get('path')} (fingerprint {record['fingerprint']}), not {cfg.data} ({here})"


def _previous_hint(out: Path) -> str:
    """How to resume from the checkpoint before the last, when it is there."""
    previous = out / PREVIOUS
    return (f" (the one before it is kept: rename {previous} to checkpoint.pt and pass --resume to continue "
            f"from it)" if previous.is_file() else "")


# What the commands that read a run's model write beside it by default (wm eval, wm probe, wm demo, wm study)
MEASURED_BESIDE = ("eval/results.json", "probe.json", "videos/demo.json", "study-*/results.json")


def clear(out: Path) -> list[Path]:
    """Remove the run in ``out`` (``--overwrite``): its model, checkpoints, settings and TensorBoard logs.
    Returns what other commands measured on the model it replaces (kept: they are results, and say so)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)
    return sorted(path for pattern in MEASURED_BESIDE for path in out.glob(pattern))


def recorded_run(out: Path, cls) -> tuple[int | None, dict]:
    """(step, settings) of the run in ``out``: from its checkpoint (what --resume continues), else from its
    model.json; (None, {}) when it holds neither."""
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        try:
            state = read_checkpoint(ckpt)
        except CheckpointError as exc:
            before = (f"; the checkpoint before it is kept: rename {out / PREVIOUS} to {ckpt.name} to resume from it"
                      if (out / PREVIOUS).is_file() else "")
            raise CheckpointError(f"{exc}{before}; --overwrite starts the run again") from None
        return state["step"], saved_settings(state["config"], cls, str(ckpt))
    meta_path = out / "model.json"
    meta = read_json(meta_path)
    if not meta:
        return None, {}
    step = meta.get("step")
    if not _is_count(step):
        raise CheckpointError(f"{meta_path}: 'step' must be a count of steps, got {step!r}")
    return step, saved_settings(meta.get("train_config", {}), cls, str(meta_path))


_READ: dict = {}  # {a checkpoint file's identity: its contents}, the last read, until ``release_checkpoint``


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint's contents, each field checked: a ``CheckpointError`` naming the file and the
    field otherwise. Read once while the file stays as it is (``wm train --resume`` looks up the run's settings
    and data, decides what to do and loads it from one read, on each rank); shared: never modified."""
    try:
        st = os.stat(path)
    except OSError:  # said by the read
        return _read_checkpoint(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _READ:
        release_checkpoint()  # one at a time: a checkpoint holds the model and the optimizer's state
        _READ[key] = _read_checkpoint(path)
    return _READ[key]


def release_checkpoint() -> None:
    """Let the checkpoint read last go: its memory, once the run has loaded it; and the next read (a later run
    in this process) opens the file again, even one rewritten in place within a tick of the file system's clock."""
    _READ.clear()


def _read_checkpoint(path: Path) -> dict:
    state = load_weights_file(path, "a training checkpoint")
    missing = [k for k in ("step", "model", "optimizer", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {missing})")
    if not _is_count(state["step"]):
        raise CheckpointError(f"{path}: 'step' must be a count of steps, got {state['step']!r}")
    for key, kind, what in (("config", dict, "the run's settings"), ("model", dict, "the model's weights"),
                            ("optimizer", dict, "the optimizer's state"), ("history", list, "the run's history"),
                            ("data", dict, "the record of the training data")):
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(f"{path}: {key!r} must be {what} (a {kind.__name__}), got a "
                                  f"{type(state[key]).__name__}")
    return state


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_same_data(recorded: dict, store, data: str) -> None:
    """A resumed run trains on the data it started with (wherever it now lies): the same fingerprint as the
    ``recorded`` data record (the checkpoint's; an older checkpoint's is in model.json)."""
    if recorded.get("fingerprint") and recorded["fingerprint"] != store.fingerprint:
        raise ValueError(f"--resume: {data} is not the dataset this run started on ({recorded.get('path')}): "
                         f"its fingerprint differs")


def model_intact(out: Path, step: int) -> bool:
    """Whether a run's user-facing model is whole at ``step``: model.json readable and at that step, and the
    model.pt beside it loads with the weights that json records (not truncated, not another model's)."""
    if read_json(out / "model.json").get("step") != step or not (out / "model.pt").is_file():
        return False
    try:
        WorldModel.load(out / "model.pt")
    except CheckpointError:
        return False
    return True


def finished_metrics(out: Path) -> dict:
    """The metrics a finished run recorded in its model.json."""
    return read_json(out / "model.json").get("metrics", {})


def save(out: Path, model: WorldModel, opt, cfg, step: int, metrics: dict, history: list, data: dict,
         health: dict | None = None, extras: dict | None = None, planner: dict | None = None,
         checkpoint: bool = True, model_files: bool = True, world: int = 1) -> None:
    """The training state (checkpoint.pt, with the model's ``health`` as the guard measured it; the
    checkpoint replaced is kept as checkpoint.prev.pt) and the user-facing model (model.pt + model.json,
    which records ``planner``: the settings it is planned with, by name); ``checkpoint`` and ``model_files``
    leave either out (the training state is saved before measurements that take a while). ``world``: the
    number of processes that trained it (torchrun's; --batch-size is per process)."""
    settings = dataclasses.asdict(cfg)
    extra = {"step": step, "train_config": settings, "world_size": world, "planner": planner or {},
             "history": history, "data": data, "provenance": provenance(),
             "metrics": {k: v for k, v in metrics.items()
                         if k in ("probe", "val", "loss/prediction", "ddp_max_param_diff", "closed_loop")}}
    had = (out / "checkpoint.pt").is_file()
    if checkpoint:  # model.json last: it is what says which step the run has reached
        try:
            _keep_previous(out / "checkpoint.pt", out / PREVIOUS)
            atomic_torch_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "config": settings, "history": history, "health": health or {}, "data": data,
                               "world_size": world},
                              out / "checkpoint.pt")  # all --resume needs: model.json can be damaged or gone
        except OSError as exc:
            kept = ("the files of the last good checkpoint are kept" if had else
                    "no checkpoint of this run was written before")
            raise RunWriteError(f"could not write the checkpoint of step {step} in {out} ({exc.filename or out}: "
                                f"{exc.strerror or exc}); {kept}") from None
    if model_files:
        try:
            model.save(out / "model.pt", extra=extra, extras=extras)
        except OSError as exc:
            again = ("the same command writes them again" if step == cfg.steps else
                     "`wm train ... --resume` continues from it")
            raise RunWriteError(f"could not write the model files of step {step} in {out} ({exc.filename or out}: "
                                f"{exc.strerror or exc}); checkpoint.pt holds step {step}: {again} once there "
                                f"is room") from None


def _keep_previous(path: Path, previous: Path) -> None:
    """``previous`` becomes (atomically) the file ``path`` holds now: a hard link, or a copy where links fail."""
    if not path.is_file():
        return
    tmp = temporary_path(previous)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    finally:
        tmp.unlink(missing_ok=True)


def load(out: Path, cfg, model: WorldModel, opt, store, world: int = 1) -> tuple[int, list, dict, int]:
    """Restore model and optimizer from ``out/checkpoint.pt``; returns (step, history, health, world),
    ``health`` what the checkpoint records of the model it holds (``HEALTH_KEYS``; at least its step and
    learning rate), ``world`` the number of processes that trained it (``world``, this run's, when an older
    checkpoint does not say).

    The settings must be the saved ones, except those in ``RESUME_FREE`` and the recovery settings
    (``lr``, ``grad_clip``), whose changes are appended to the run's history; the data ``store`` must be
    the one the run started on; an unfinished run continues on as many processes as it was trained by
    (each draws its own windows of --batch-size).
    """
    path = out / "checkpoint.pt"
    state = read_checkpoint(path)
    release_checkpoint()  # no copy of the weights kept while the run trains
    recorded = state.get("data")
    if recorded is None:  # a checkpoint from before it kept the data record: model.json's, its fields checked
        recorded = (read_model_meta(out / "model.pt").get("data") or {}) if (out / "model.json").is_file() else {}
    check_same_data(recorded, store, cfg.data)
    filled: list = []
    saved = saved_settings(state["config"], type(cfg), str(path), filled)
    diff = _differences(saved, cfg, RESUME_FREE | set(RECOVERY))
    if diff:
        raise ValueError(f"--resume: settings differ from those {path} holds (saved, now): {diff}; `wm train "
                         f"--resume` reads the settings not typed from {out / 'train_config.json'}, so an edit there "
                         f"counts as one typed; only {', '.join('--' + k.replace('_', '-') for k in RECOVERY)} may "
                         f"change on resume (of the settings that decide what the run computes)")
    step = state["step"]
    if step > saved["steps"]:
        raise CheckpointError(f"{path}: 'step' is {step}, beyond the run's {saved['steps']} steps")
    trained = state.get("world_size", world)
    if not _is_count(trained) or trained < 1:
        raise CheckpointError(f"{path}: 'world_size' must be a number of processes, got {trained!r}")
    if trained != world and step < saved["steps"]:
        how = (f"`torchrun --nproc_per_node {trained} -m wm train --out {out} --resume`" if trained > 1 else
               f"`wm train --out {out} --resume` (no torchrun)")
        raise ValueError(f"--resume: {path} was trained by {trained} process{'es' * (trained > 1)} (a global batch "
                         f"of {trained * saved['batch_size']} windows), this run has {world}: another number "
                         f"computes another run; resume it with {how}")
    changed = {k: [saved.get(k), getattr(cfg, k)] for k in RECOVERY if saved.get(k) != getattr(cfg, k)}
    history = list(state.get("history", [])) + ([{"step": step, "changed": changed}] if changed else [])
    if filled:  # settings this code has and the run's own did not: they take today's defaults
        history.append({"step": step, "new_settings": {k: saved[k] for k in sorted(filled) if k in saved}})
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit this model: {str(exc)[:300]}") from None
    return step, history, {**_health(state.get("health")), "step": step, "lr": saved["lr"]}, trained


def _health(recorded) -> dict:
    """The numbers of a checkpoint's health record that are numbers (an older checkpoint has none)."""
    if not isinstance(recorded, dict):
        return {}
    return {k: float(v) for k, v in recorded.items()
            if k in HEALTH_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
