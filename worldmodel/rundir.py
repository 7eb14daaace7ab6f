"""A training run's directory: whether it may be started, continued or left alone, and writing it safely.

    runs/NAME/model.pt, model.json   the model for users: weights; config, step, data split, metrics
    runs/NAME/checkpoint.pt          model + optimizer + step + settings + history, for --resume
    runs/NAME/train_config.json      the settings of the run
    runs/NAME/tb/                    TensorBoard

Every file is written atomically, so an interrupt or a full disk leaves the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from common.config import config_fields, from_dict
from common.files import read_json
from worldmodel.model import CheckpointError, WorldModel, atomic_torch_save, load_weights_file

# Settings that may differ on --resume without changing what the run computes (a moved run or dataset
# included: the dataset's fingerprint is checked instead of its path).
RESUME_FREE = {"out", "data", "resume", "overwrite", "device", "num_workers", "log_every", "val_every",
               "probe_every", "ckpt_every", "compile", "eval_every", "eval_episodes"}
# Settings a resumed run may change to recover from a divergence; each change is kept in the run's history.
RECOVERY = ("lr", "grad_clip")
RUN_FILES = ("model.pt", "model.json", "checkpoint.pt", "train_config.json")


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
    """What to do with ``out``: ``fresh`` (start), ``resume`` (continue) or ``done`` (nothing: it holds a
    finished run of these settings). A run in the way is an error that says what to type."""
    ckpt, meta = out / "checkpoint.pt", read_json(out / "model.json")
    step = meta.get("step")
    saved = saved_settings(meta.get("train_config", {}), type(cfg), str(out / "model.json")) if meta else {}
    finished = step is not None and step == saved.get("steps") and not _differences(saved, cfg, RESUME_FREE | set(RECOVERY))
    if cfg.resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
        return "done" if finished else "resume"
    if not ckpt.exists() and not meta:  # nothing worth keeping (a run that stopped before its first checkpoint)
        return "fresh"
    if cfg.overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
        return "fresh"
    if finished:  # the same settings, so the same number of steps
        return "done"
    diff = _differences(saved, cfg, RESUME_FREE)
    where = f"a run at step {step} of {saved.get('steps')}" if step is not None else "a run"
    other = f" with other settings (saved, now): {diff}" if diff else ""
    advice = ("pass --resume to continue it" if step is not None and step < saved.get("steps", 0)
              else "it is finished")
    raise ValueError(f"{out} already holds {where}{other}; {advice}, --overwrite to start again, or choose another "
                     f"--out")


def check_same_data(out: Path, store, data: str) -> None:
    """A resumed run trains on the data it started with (wherever it now lies): same fingerprint."""
    recorded = read_json(out / "model.json").get("data", {})
    if recorded.get("fingerprint") and recorded["fingerprint"] != store.fingerprint:
        raise ValueError(f"--resume: {data} is not the dataset this run started on ({recorded.get('path')}): "
                         f"its fingerprint differs")


def finished_metrics(out: Path) -> dict:
    """The metrics a finished run recorded in its model.json."""
    return read_json(out / "model.json").get("metrics", {})


def save(out: Path, model: WorldModel, opt, cfg, step: int, metrics: dict, history: list, data: dict) -> None:
    """The user-facing model (model.pt + model.json) and the training state (checkpoint.pt)."""
    settings = dataclasses.asdict(cfg)
    extra = {"step": step, "train_config": settings, "history": history, "data": data,
             "metrics": {k: v for k, v in metrics.items()
                         if k in ("probe", "val", "loss/prediction", "ddp_max_param_diff", "closed_loop")}}
    try:  # model.json last: it is what says which step the run has reached
        atomic_torch_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "config": settings, "history": history}, out / "checkpoint.pt")
        model.save(out / "model.pt", extra=extra)
    except OSError as exc:
        raise RunWriteError(f"could not write the checkpoint of step {step} in {out} ({exc.strerror or exc}); "
                            f"the files of the last good checkpoint are kept") from None


def load(out: Path, cfg, model: WorldModel, opt) -> tuple[int, list]:
    """Restore model and optimizer from ``out/checkpoint.pt``; returns (step, history).

    The settings must be the saved ones, except those in ``RESUME_FREE`` and the recovery settings
    (``lr``, ``grad_clip``), whose changes are appended to the run's history.
    """
    path = out / "checkpoint.pt"
    state = load_weights_file(path, "a training checkpoint")
    missing = [k for k in ("step", "model", "optimizer", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {missing})")
    filled: list = []
    saved = saved_settings(state["config"], type(cfg), str(path), filled)
    diff = _differences(saved, cfg, RESUME_FREE | set(RECOVERY))
    if diff:
        raise ValueError(f"--resume: settings differ from the checkpoint's (saved, now): {diff}; only "
                         f"{', '.join('--' + k.replace('_', '-') for k in RECOVERY)} may change on resume")
    step = int(state["step"])
    changed = {k: [saved.get(k), getattr(cfg, k)] for k in RECOVERY if saved.get(k) != getattr(cfg, k)}
    history = list(state.get("history", [])) + ([{"step": step, "changed": changed}] if changed else [])
    if filled:  # settings this code has and the run's own did not: they take today's defaults
        history.append({"step": step, "new_settings": {k: saved[k] for k in sorted(filled) if k in saved}})
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit this model: {str(exc)[:300]}") from None
    return step, history
