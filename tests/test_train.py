import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_synthetic
import worldmodel.train as train_module
from worldmodel import distributed
from worldmodel.model import PRESET_PLANNER, CheckpointError, WorldModel
from worldmodel.objective import effective_rank, lr_at
from worldmodel.rundir import RunWriteError
from worldmodel.train import TrainingDiverged, preset_config, train

TINY = {"latent_dim": 16, "encoder.proj_hidden": 32, "encoder.conv_channels": 8,
        "predictor.hidden": 32, "predictor.depth": 2, "history": 2, "frameskip": 2,
        "batch_size": 8, "n_pred": 1, "rollout_steps": 0, "val_horizon": 2, "warmup_steps": 2, "log_every": 2,
        "val_every": 4, "probe_every": 0, "ckpt_every": 4, "sigreg_directions": 32, "eval_episodes": 0,
        "device": "cpu"}


@pytest.fixture
def data(tmp_path):
    return write_synthetic(tmp_path / "data", n_episodes=6, steps=20)


def fail_in_step_7(monkeypatch, exc: BaseException) -> None:
    """A tiny run (``tiny``) raises ``exc`` in its 7th step: steps 2, 4 and 6 logged, the checkpoint of step 4
    written."""
    real, calls = train_module.world_model_losses, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", failing)


def tiny(data, out, **kw):
    return preset_config("demo", {**TINY, "steps": 8, **kw}, data=str(data), out=str(out))


def test_train_writes_model_checkpoint_logs_and_split(data, tmp_path):
    metrics = train(tiny(data, tmp_path / "run"), progress=False)
    for name in ("model.pt", "model.json", "checkpoint.pt", "train_config.json"):
        assert (tmp_path / "run" / name).exists()
    assert list((tmp_path / "run" / "tb").iterdir())
    assert len(metrics["val"]["mse"]) == 2 and "joints_mean" in metrics["probe"]
    assert metrics["val"]["prediction_loss"] > 0
    WorldModel.load(tmp_path / "run" / "model.pt")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["planner"] == {}  # the demo's: the default
    record = json.loads((tmp_path / "run" / "model.json").read_text())["data"]
    fit, val, test = set(record["train"]), set(record["val"]), set(record["test"])
    assert len(fit) + len(val) + len(test) == 6 and len(fit | val | test) == 6 and val and test
    assert record["path"] == str(data) and record["fingerprint"]


def test_train_episodes_trains_on_a_nested_subset_and_keeps_the_held_out_episodes(data, tmp_path):
    train(tiny(data, tmp_path / "all", steps=2), progress=False)
    seen = []
    train(tiny(data, tmp_path / "two", steps=2, train_episodes=2, eval_episodes=1), progress=False,
          closed_loop=lambda model, store, train_ids, val_ids, episodes, planner: seen.append(train_ids) or {})
    full, part = (json.loads((tmp_path / d / "model.json").read_text())["data"] for d in ("all", "two"))
    assert len(full["train"]) == 4 and part["train"] == full["train"][:2]  # the first two, by index
    assert part["val"] == full["val"] and part["test"] == full["test"]
    assert [len(ids) for ids in seen] == [2]  # the subgoal graph and checks see only those
    with pytest.raises(ValueError, match="--train-episodes -1"):
        tiny(data, tmp_path / "bad", train_episodes=-1)
    with pytest.raises(ValueError, match="--train-episodes 5: .* has only 4 training episodes"):
        train(tiny(data, tmp_path / "five", train_episodes=5), progress=False)


def test_too_few_episodes_to_hold_one_out_is_refused_before_any_step(tmp_path):
    """Two episodes leave none to validate on beside one to report on: said before training, nothing written
    (the validation at the end divided by zero, after the training)."""
    two = write_synthetic(tmp_path / "two", n_episodes=2, steps=20)
    with pytest.raises(ValueError, match=r"holds 2 episode\(s\): training needs at least 3 \(one to train on, one "
                                         r"held out to validate on, one to report on"):
        train(tiny(two, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    train(tiny(two, tmp_path / "run", test_fraction=0.0, steps=2), progress=False)  # two serve without a test split
    assert (tmp_path / "run" / "model.pt").exists()


def test_tensorboard_has_validation_loss_hparams_and_closed_loop(data, tmp_path):
    """The closed-loop check plans as the model will be: with the planner its preset records in model.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    def closed_loop(model, store, train_ids, val_ids, episodes, planner):
        calls.append((len(val_ids), episodes, planner))
        return {"reach25_latched": 0.5, "reach25_held": 0.25}

    metrics = train(tiny(data, tmp_path / "run", eval_episodes=3, preset="hold"), progress=False,
                    closed_loop=closed_loop)
    assert calls == [(1, 3, PRESET_PLANNER["hold"])] and metrics["closed_loop"]["reach25_held"] == 0.25
    assert json.loads((tmp_path / "run" / "model.json").read_text())["planner"] == PRESET_PLANNER["hold"]
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"val/prediction_loss", "loss/total", "closed_loop/reach25_latched"} <= set(tags)
    assert (tmp_path / "run" / "tb" / "hparams").is_dir()
    assert json.loads((tmp_path / "run" / "model.json").read_text())["metrics"]["closed_loop"]["reach25_latched"] == 0.5


def test_a_resumed_run_replaces_the_curves_logged_after_its_checkpoint(data, tmp_path, monkeypatch):
    """A run killed after its checkpoint logged the steps since; the resumed run logs them again (here with
    another --lr): TensorBoard shows each step once, the resumed run's (both were plotted, a zig-zag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    fail_in_step_7(monkeypatch, SystemExit("killed"))
    with pytest.raises(SystemExit):
        train(tiny(data, out), progress=False)
    monkeypatch.undo()
    train(tiny(data, out, resume=True, lr=5e-4), progress=False)
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("opt/lr")] == [2, 4, 6, 8]
    assert events.Scalars("opt/lr")[2].value < 5e-4  # step 6 as resumed, with the lower rate


def test_a_finished_run_written_again_logs_each_step_once(data, tmp_path):
    """A finished run whose model.pt was lost measures again at its last step: TensorBoard keeps one point per
    step (the measurements were drawn twice there: the writer hides only what came after that step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny(data, out, probe_every=4), progress=False)
    (out / "model.pt").unlink()
    assert "probe" in train(tiny(data, out, probe_every=4, resume=True), progress=False)
    events = EventAccumulator(str(out / "tb")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["loss/total"] == [2, 4, 6, 8] and steps["val/prediction_loss"] == [4, 8]
    assert steps["probe/r2_joints_mean"] == [4, 8]
    assert all(len(s) == len(set(s)) for s in steps.values()), steps


def test_a_finished_run_written_again_after_a_resume_says_nothing_of_tensorboards_reader(data, tmp_path,
                                                                                         monkeypatch, caplog):
    """Reading what tb/ holds at the last step is not the run's news: the reader's notes (its files, a purge of
    what the resume hid) stayed off wm's stderr, which shows INFO."""
    out = tmp_path / "run"
    fail_in_step_7(monkeypatch, RuntimeError("a crash after step 6 was logged, its checkpoint at step 4"))
    with pytest.raises(RuntimeError):
        train(tiny(data, out), progress=False)
    monkeypatch.undo()
    train(tiny(data, out, resume=True), progress=False)
    (out / "model.pt").unlink()
    with caplog.at_level(logging.INFO):
        assert "probe" in train(tiny(data, out), progress=False)
    assert "writing them again from checkpoint.pt" in caplog.text
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("tensorboard")]
    assert logging.getLogger("tensorboard").level == logging.NOTSET  # as it was


def test_data_without_starting_states_trains_without_a_closed_loop_check(tmp_path, caplog):
    """Rollouts without joint velocities (or angles) train, and say up front that no closed-loop check can run
    at the end (it needs the states its episodes start from) rather than failing after the last step."""
    from conftest import write_swm_file

    calls = []
    no_qvel = write_swm_file(tmp_path / "no_qvel.h5", n_episodes=6, rows=30, drop=("qvel",))
    with caplog.at_level("INFO", logger="worldmodel.train"):
        train(tiny(no_qvel, tmp_path / "run", eval_episodes=2), progress=False,
              closed_loop=lambda *args: calls.append(args) or {})
    assert not calls and (tmp_path / "run" / "model.pt").exists()
    assert "no closed-loop check when training ends: the data lacks" in caplog.text


def test_training_on_enlarged_frames_says_it_adds_no_detail(data, tmp_path, caplog):
    """--image-size above the stored frames' size trains on upsampled frames: said up front, naming the data and
    both sizes; at their size or smaller nothing is said."""
    with caplog.at_level("WARNING", logger="worldmodel.train"):
        train(tiny(data, tmp_path / "same", steps=2, image_size=32), progress=False)
        train(tiny(data, tmp_path / "small", steps=2, image_size=16), progress=False)
        assert "enlarges" not in caplog.text
        train(tiny(data, tmp_path / "big", steps=2, image_size=48), progress=False)
    assert f"{data}: --image-size 48 enlarges its 32 px frames" in caplog.text


def test_rollout_loss_is_trained_and_logged(data, tmp_path):
    metrics = train(tiny(data, tmp_path / "run", steps=4, n_pred=2, rollout_steps=2), progress=False)
    assert metrics["loss/rollout"] > 0 and "loss/first_frame_rollout" not in metrics
    first = train(tiny(data, tmp_path / "first", steps=4, n_pred=2, rollout_steps=2, first_frame_rollout_weight=1.0),
                  progress=False)
    assert first["loss/first_frame_rollout"] > 0
    with pytest.raises(ValueError, match="rollout-steps"):
        tiny(data, tmp_path / "bad", steps=2, n_pred=1, rollout_steps=2)


def test_a_finished_run_is_kept_and_another_is_refused(data, tmp_path, caplog):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "results.json").write_text("{}")  # an evaluation of this model
    again = train(tiny(data, tmp_path / "run", steps=2), progress=False)  # the same run: nothing to do
    assert again["already_done"] and "already holds this finished run" in caplog.text
    with pytest.raises(ValueError, match="already holds a run at step 2 of 2 with other settings.*batch_size.*"
                                         "it is finished, --overwrite"):
        train(tiny(data, tmp_path / "run", steps=2, batch_size=4), progress=False)
    assert train(tiny(data, tmp_path / "run", steps=2, batch_size=4, overwrite=True), progress=False)["loss/total"] > 0
    assert "kept the results measured on the model this run replaces, which no longer describe it: " \
           "eval/results.json" in caplog.text


def test_a_finished_run_is_not_said_done_for_other_data(data, tmp_path, caplog):
    """The same settings on another dataset (by fingerprint) are another run: refused, naming both datasets
    (it said "already holds this finished run" and returned the old run's metrics); the run's own data moved
    elsewhere is the same run."""
    out = tmp_path / "run"
    train(tiny(data, out, steps=2), progress=False)
    other = write_synthetic(tmp_path / "other", n_episodes=7, steps=20)
    for resume in (False, True):
        with pytest.raises(ValueError, match=rf"{out} holds a finished run of these settings trained on other data: "
                                             rf"{data} \(fingerprint \w+\), not {other} \(\w+\); --overwrite"):
            train(tiny(other, out, steps=2, resume=resume), progress=False)
    assert "already holds" not in caplog.text
    moved = data.rename(tmp_path / "moved")
    assert train(tiny(moved, out, steps=2), progress=False)["already_done"]


def test_an_unfinished_run_on_other_data_is_not_told_to_resume_with_it(data, tmp_path, monkeypatch):
    """Its data named, and --resume advised without --data (it said "pass --resume", which then refused the data)."""
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch)
    other = write_synthetic(tmp_path / "other", n_episodes=7, steps=20)
    with pytest.raises(ValueError, match=rf"at step 4 of 12 trained on other data: {data} \(fingerprint \w+\), not "
                                         rf"{other} \(\w+\); pass --resume without --data \(it finds its own\)"):
        train(tiny(other, out, steps=12), progress=False)


def test_overwrite_keeps_the_old_run_until_the_new_one_can_start(data, tmp_path):
    """--overwrite with a mistyped --data, or a closed-loop check its validation episodes cannot hold, is
    refused before the first step, and the run already there is still whole."""
    from evaluation.evaluate import closed_loop_check

    out = tmp_path / "run"
    train(tiny(data, out, steps=2), progress=False)
    before = (out / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="no such dataset"):
        train(tiny(tmp_path / "nowhere", out, steps=2, overwrite=True), progress=False)
    with pytest.raises(ValueError, match=r"--eval-episodes 1: reach25: 0 usable start rows .*ask for fewer"):
        train(tiny(data, out, steps=2, overwrite=True, eval_episodes=1), progress=False, closed_loop=closed_loop_check)
    assert (out / "model.pt").read_bytes() == before and (out / "checkpoint.pt").is_file()
    assert train(tiny(data, out, steps=2), progress=False)["already_done"]


def test_a_stop_while_measuring_at_the_end_loses_no_step(data, tmp_path, monkeypatch):
    """The training state is saved before the end-of-training measurements: a run killed while they run
    (SIGKILL after a stop's grace period, say) keeps every step, and the same command measures and writes
    the model files."""
    out = tmp_path / "run"
    real = train_module._evaluate

    def killed_at_the_end(model, data_, cfg, done, *args):
        if done == cfg.steps:
            raise KeyboardInterrupt
        return real(model, data_, cfg, done, *args)
    monkeypatch.setattr(train_module, "_evaluate", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, out), progress=False)
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8
    assert json.loads((out / "model.json").read_text())["step"] == 4
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["step"] == 4
    result = train(tiny(data, out), progress=False)
    assert "probe" in result and json.loads((out / "model.json").read_text())["step"] == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb")).Reload()  # the measurements it lacked, the last loss kept
    assert [e.step for e in events.Scalars("val/prediction_loss")] == [4, 8]
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6, 8]
    assert (out / "tb" / "hparams").is_dir()  # the HParams entry, which the stopped run never wrote


def test_a_stop_while_measuring_at_the_end_says_every_step_is_saved(data, tmp_path, monkeypatch, caplog):
    """Ctrl-C while the end-of-training measurements run: the training state is already saved, so the message
    says so and what a second Ctrl-C costs (it said "finishing this step, then saving a checkpoint", while it
    went on measuring); the run then finishes."""
    real = train_module._evaluate

    def stopped_at_the_end(model, data_, cfg, done, *args):
        if done == cfg.steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, data_, cfg, done, *args)
    monkeypatch.setattr(train_module, "_evaluate", stopped_at_the_end)
    with caplog.at_level("WARNING", logger="worldmodel.train"):
        train(tiny(data, tmp_path / "run"), progress=False)
    assert "SIGINT: every step is saved (checkpoint.pt, step 8); finishing the end-of-training measurements" in \
        caplog.text and "then saving a checkpoint" not in caplog.text
    assert json.loads((tmp_path / "run" / "model.json").read_text())["step"] == 8


def test_a_stop_while_measuring_mid_run_says_the_step_is_saved_and_stops_after_it(data, tmp_path, monkeypatch,
                                                                                   caplog):
    """Ctrl-C during an --eval-every/--probe-every measurement: the step was saved before it, so the message no
    longer promises to finish the step and save; the run stops after the measurement, resumable at that step."""
    real = train_module._evaluate

    def stopped_at_step_4(model, data_, cfg, done, *args):
        if done == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, data_, cfg, done, *args)
    monkeypatch.setattr(train_module, "_evaluate", stopped_at_step_4)
    with caplog.at_level("WARNING", logger="worldmodel.train"), pytest.raises(KeyboardInterrupt):
        train(tiny(data, tmp_path / "run", probe_every=4), progress=False)
    assert "SIGINT: every step is saved (checkpoint.pt, step 4); finishing this measurement, then stopping" in \
        caplog.text and "then saving a checkpoint" not in caplog.text
    assert "stopped: checkpoint at step 4" in caplog.text


def test_a_run_blown_up_before_its_first_checkpoint_is_not_saved(data, tmp_path, monkeypatch):
    """No good checkpoint to compare with yet: running statistics far out of range, or a loss far above the
    run's first logged one, are refused all the same; the advice is a sane rate, not a quarter of an absurd one."""
    real, calls = train_module.world_model_losses, {"n": 0}

    def inflated(net, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                net.encoder.projector[1].running_var.mul_(1e8)  # the BatchNorm's statistics only
        return real(net, *args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", inflated)
    with pytest.raises(TrainingDiverged, match="step 4 is unsound: parameters or running statistics up to"):
        train(tiny(data, tmp_path / "a"), progress=False)
    assert not (tmp_path / "a" / "checkpoint.pt").exists()

    calls["n"] = 0

    def rising(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * (1000.0 if calls["n"] > 2 else 1.0)
        return out
    monkeypatch.setattr(train_module, "world_model_losses", rising)
    with pytest.raises(TrainingDiverged, match=r"loss rose from .* when first logged to "):
        train(tiny(data, tmp_path / "b"), progress=False)
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged, match=r"--lr 0\.001$") as info:
        train(tiny(data, tmp_path / "c", lr=1e6), progress=False)
    assert "250000" not in str(info.value)


def test_a_run_whose_checkpoint_went_missing_says_how_to_resume_from_the_one_before(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_loss(monkeypatch, after=9)  # checkpoints of steps 4 and 8, then a divergence
    with pytest.raises(TrainingDiverged):
        train(tiny(data, out, steps=12), progress=False)
    monkeypatch.undo()
    (out / "checkpoint.pt").unlink()
    said = r"rename .*checkpoint\.prev\.pt to checkpoint\.pt and pass --resume"
    with pytest.raises(ValueError, match=rf"at step 8 of 12; its checkpoint\.pt is gone .*{said}"):
        train(tiny(data, out, steps=12), progress=False)
    with pytest.raises(ValueError, match=rf"--resume: no checkpoint at .*{said}"):
        train(tiny(data, out, steps=12, resume=True), progress=False)
    finished = tmp_path / "finished"  # a finished run's checkpoint deleted to save space: nothing to resume
    train(tiny(data, finished), progress=False)
    (finished / "checkpoint.pt").unlink()
    assert train(tiny(data, finished, resume=True), progress=False)["already_done"]  # as with its checkpoint
    assert train(tiny(data, finished), progress=False)["already_done"]


def test_windows_too_long_for_validation_episodes_name_val_horizon(data, tmp_path):
    with pytest.raises(ValueError, match=r"validation windows predict --val-horizon 20 steps: lower it"):
        train(tiny(data, tmp_path / "run", val_horizon=20), progress=False)


def test_a_first_checkpoint_that_cannot_be_written_says_none_was(data, tmp_path, monkeypatch):
    import worldmodel.rundir as rundir

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(rundir, "atomic_torch_save", full)
    with pytest.raises(RunWriteError, match=r"step 4 .*checkpoint\.pt: No space left.*no checkpoint of this run was "
                                            r"written before"):
        train(tiny(data, tmp_path / "run"), progress=False)


def test_a_step_is_judged_once_though_saved_before_and_after_its_measurements(data, tmp_path, monkeypatch):
    """The last step's checkpoint is saved before its measurements and its model files after: one judgement
    of the step (over the losses logged since the last checkpoint), so a one-batch spike there neither
    passes once and fails the second time nor stops a run whose checkpoint it already holds."""
    real, calls = train_module.world_model_losses, {"n": 0}

    def spike_at_the_last_step(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * (1000.0 if calls["n"] == 8 else 1.0)
        return out
    monkeypatch.setattr(train_module, "world_model_losses", spike_at_the_last_step)
    train(tiny(data, tmp_path / "run", log_every=1), progress=False)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["step"] == 8


def test_model_files_that_cannot_be_written_say_the_checkpoint_holds_the_step(data, tmp_path, monkeypatch):
    def full(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(WorldModel, "save", full)
    with pytest.raises(RunWriteError, match=r"model files of step 4 .*model\.pt: No space left.*checkpoint\.pt "
                                            r"holds step 4: `wm train \.\.\. --resume` continues from it"):
        train(tiny(data, tmp_path / "run"), progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_a_run_stopped_before_its_first_checkpoint_starts_again(data, tmp_path, monkeypatch):
    """Nothing to keep (no checkpoint, no model): the advice after an early divergence (a lower --lr) works."""
    _poison_loss(monkeypatch, after=0)
    with pytest.raises(TrainingDiverged):
        train(tiny(data, tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert train(tiny(data, tmp_path / "run", lr=2.5e-4), progress=False)["loss/total"] > 0


def test_resume_starts_from_the_runs_own_settings(data, tmp_path, monkeypatch):
    """`wm train --out X --resume` continues a run started with other options (a preset, a moved dataset)
    without retyping them."""
    from wm import main

    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "8"]
    for path, v in TINY.items():
        args += ["--" + path.replace("_", "-"), str(v)]
    _poison_loss(monkeypatch, after=5)
    assert main(args) == 2  # diverged at step 6: checkpoint of step 4 kept
    monkeypatch.undo()
    other = write_synthetic(tmp_path / "other", n_episodes=6, steps=21)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--data", str(other)]) == 2  # other data
    moved = tmp_path / "moved-data"
    data.rename(moved)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--data", str(moved)]) == 0
    assert json.loads((tmp_path / "run" / "model.json").read_text())["step"] == 8


def test_a_resume_reads_its_checkpoint_once(data, tmp_path, monkeypatch):
    """Deciding what to do with the run reads its checkpoint; the resume restores from what was read, not
    from a second read of the file (the run's directory is locked in between)."""
    _poison_loss(monkeypatch, after=5)
    with pytest.raises(TrainingDiverged):
        train(tiny(data, tmp_path / "run"), progress=False)  # diverged at step 6: the checkpoint of step 4 kept
    monkeypatch.undo()
    assert (tmp_path / "run" / "train_config.json").is_file()
    real, reads = torch.load, []
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(Path(f).name) or real(f, *a, **k))
    assert train(tiny(data, tmp_path / "run", resume=True, lr=5e-4), progress=False)["loss/total"] > 0
    assert reads.count("checkpoint.pt") == 1
    assert real(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_is_bit_for_bit(data, tmp_path, monkeypatch, sig):
    """The step in flight finishes (BatchNorm statistics and optimiser step both), then the run saves and
    stops: resuming gives exactly the weights of a run that never stopped."""
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background job
    train(tiny(data, tmp_path / "straight"), progress=False)
    real, calls = train_module.world_model_losses, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 5 (0-based): steps 0..5 complete
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, tmp_path / "resumed"), progress=False)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 6
    monkeypatch.undo()
    train(tiny(data, tmp_path / "resumed", resume=True), progress=False)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


def test_a_lone_model_file_in_out_is_not_replaced_unasked(data, tmp_path):
    """A model.pt with no run files beside it (a colleague's model copied in) was replaced by a fresh run
    without a word; it is refused now, and --overwrite replaces it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"a model handed over")
    with pytest.raises(ValueError, match="model.pt is there without a readable model.json or checkpoint.pt"):
        train(tiny(data, run, steps=2), progress=False)
    assert (run / "model.pt").read_bytes() == b"a model handed over"
    train(tiny(data, run, steps=2, overwrite=True), progress=False)
    WorldModel.load(run / "model.pt")


def test_resume_with_other_settings_is_refused(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=4), progress=False)
    # the settings not typed come from train_config.json: the refusal names it with the checkpoint
    with pytest.raises(ValueError, match=r"settings differ from those .*checkpoint.pt holds .*batch_size.* reads the "
                                         r"settings not typed from .*train_config.json"):
        train(tiny(data, tmp_path / "run", steps=8, batch_size=4, resume=True), progress=False)


def test_resume_on_another_number_of_processes_is_refused(data, tmp_path, monkeypatch):
    """--batch-size is per process and each rank draws its own windows: a run resumed on another number of
    torchrun processes would compute another run (it was accepted silently). The number is recorded in the
    checkpoint and model.json, and another one on --resume is refused, saying how to resume."""
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch)  # the checkpoint of step 4 of 12, one process
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, out / "checkpoint.pt")  # as `torchrun --nproc_per_node 2` records it
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint\.pt was trained by 2 processes \(a global batch "
                                         r"of 16 windows\), this run has 1: .*--nproc_per_node 2"):
        train(tiny(data, out, steps=12, resume=True), progress=False)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    torch.save(state, out / "checkpoint.pt")
    train(tiny(data, out, steps=12, resume=True), progress=False)
    assert json.loads((out / "model.json").read_text())["world_size"] == 1


def test_a_diverged_run_resumes_with_another_grad_clip_on_record(data, tmp_path, monkeypatch):
    """--grad-clip, as --lr, may change on --resume to recover a run; the change is kept in its history."""
    _poison_loss(monkeypatch, after=5)
    with pytest.raises(TrainingDiverged):
        train(tiny(data, tmp_path / "run"), progress=False)
    monkeypatch.undo()
    clip = tiny(data, tmp_path / "run").grad_clip
    train(tiny(data, tmp_path / "run", grad_clip=clip / 4, resume=True), progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["step"] == 8 and meta["history"] == [{"step": 4, "changed": {"grad_clip": [clip, clip / 4]}}]


def _poison_loss(monkeypatch, after: int):
    real, calls = train_module.world_model_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] > after:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train_module, "world_model_losses", poisoned)


def test_non_finite_loss_stops_names_the_steps_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, after=5)  # steps 6, 7, ... (1-based) are non-finite
    with pytest.raises(TrainingDiverged, match=r"between steps 5 and 6.*checkpoint\.pt \(step 4\).*--resume --lr"):
        train(tiny(data, tmp_path / "run"), progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    train(tiny(data, tmp_path / "run", lr=2.5e-4, resume=True), progress=False)  # the advice works
    meta = json.loads((tmp_path / "run" / "model.json").read_text())  # and the change is on record
    assert meta["step"] == 8 and meta["history"] == [{"step": 4, "changed": {"lr": [1e-3, 2.5e-4]}}]


def test_divergence_before_the_first_checkpoint_names_none(data, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, after=0)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet") as info:
        train(tiny(data, tmp_path / "run"), progress=False)
    assert "checkpoint.pt" not in str(info.value) and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_slow_weights_favour_slow_transitions_and_leave_the_default_loss_alone():
    from worldmodel.objective import slow_weights, weighted_mse

    z = torch.zeros(2, 3, 4)  # (B, L, D)
    z[0, 1] = 1.0  # window 0 moves fast then stops; window 1 barely moves
    z[0, 2] = 1.0
    z[1, 1:] = 0.01
    w = slow_weights(z.requires_grad_(), 0.5)  # (B, L-1)
    assert w.shape == (2, 2) and not w.requires_grad and torch.isclose(w.mean(), torch.tensor(1.0))
    assert w[0, 0] < w[1, 0] and w[0, 0] < w[0, 1]  # the fast transition counts least
    assert torch.equal(slow_weights(z, 0.0), torch.ones(2, 2))
    pred, target = torch.rand(2, 2, 4), torch.rand(2, 2, 4)
    assert torch.equal(weighted_mse(pred, target, None), torch.nn.functional.mse_loss(pred, target))
    assert torch.isclose(weighted_mse(pred, target, torch.ones(2, 2)), torch.nn.functional.mse_loss(pred, target))


def test_a_padded_history_is_scored_only_where_an_episode_starts_at_rest(data, tmp_path):
    """``--padded-history rest``: the predictions from a left-padded history (the first history - 1 of a
    window) count only in windows that start an episode, where the arm is at rest; the others count alike."""
    from envs.dataset import EpisodeStore, WindowDataset, WindowSpec
    from worldmodel.objective import padded_history_weights

    w = padded_history_weights(torch.tensor([True, False]), transitions=4, history=3)  # (B, T)
    assert torch.isclose(w.mean(), torch.tensor(1.0)) and torch.equal(w[1, :2], torch.zeros(2))
    assert torch.all(w[0] == w[0, 0]) and torch.all(w[1, 2:] == w[0, 0])
    windows = WindowDataset(EpisodeStore(data), WindowSpec(2, 1, 2), "all", states=False)
    first = [windows[k]["starts_episode"].item() for k in range(len(windows))]
    assert first == [t0 == 0 for t0 in windows.index[:, 1]] and any(first) and not all(first)
    metrics = train(tiny(data, tmp_path / "rest", steps=2, padded_history="rest"), progress=False)
    assert metrics["loss/total"] > 0


def test_a_run_that_diverges_at_its_last_step_logs_no_final_hparams(data, tmp_path, monkeypatch):
    """TensorBoard's HParams tab lists finished runs only: a run stopped at its last step is not one."""
    logged = []
    monkeypatch.setattr(train_module, "_log_hparams", lambda *a: logged.append(a))
    train(tiny(data, tmp_path / "ok", ckpt_every=4), progress=False)
    assert len(logged) == 1  # a finished run is listed
    _poison_loss(monkeypatch, after=7)  # the 8th and last step is non-finite
    with pytest.raises(TrainingDiverged):
        train(tiny(data, tmp_path / "run", ckpt_every=4), progress=False)
    assert len(logged) == 1


def test_no_host_sync_between_logging_steps(data, tmp_path, monkeypatch):
    """Our code reads no tensor on the host (a GPU stall) except at logging, validation and checkpoint
    steps: the non-finite check is a flag on the device."""
    roots = tuple(str(Path(__file__).parents[1] / d) for d in ("worldmodel", "envs", "planners"))
    step = {"n": -1}
    syncs = []
    real = train_module.world_model_losses

    def counting_losses(*args, **kwargs):
        step["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", counting_losses)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(roots):
                syncs.append((step["n"], _name, caller))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    train(tiny(data, tmp_path / "run", steps=8, log_every=4, val_every=1000, ckpt_every=1000), progress=False)
    assert {s for s, _, _ in syncs} <= {3, 7}, syncs  # the steps that end at 4 and 8, where logging happens
    assert any(s == 3 for s, _, _ in syncs)  # the spy works


def test_backend_follows_the_device(monkeypatch):
    """--device cpu on a GPU machine runs on gloo; CUDA runs on NCCL."""
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: chosen.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    assert distributed.setup("cpu")[2] == torch.device("cpu")
    assert distributed.setup("auto")[2] == torch.device("cuda", 0)
    assert chosen == ["gloo", "nccl"]


def test_bad_settings_are_refused_before_any_data(tmp_path):
    for bad, match in (({"steps": 0}, "--steps 0"), ({"batch_size": 0}, "--batch-size 0"),
                       ({"batch_size": 100000}, r"--batch-size 100000 \(must be <= 8192\)"),
                       ({"num_workers": 1000}, r"--num-workers 1000 \(must be <= 256\)"),
                       ({"lr": -1.0}, "--lr -1"), ({"val_fraction": 1.0}, "--val-fraction"),
                       ({"encoder.vit_width": 256}, "vit-width"), ({"encoder.kind": "resnet"}, "kind")):
        with pytest.raises(ValueError, match=match):
            preset_config("demo", bad, data=str(tmp_path / "no-data"))


def test_out_must_be_a_writable_directory(data, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(tiny(data, tmp_path / "file"), progress=False)

    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(ValueError, match="not writable: Permission denied"):
        train(tiny(data, tmp_path / "ro"), progress=False)


def test_a_full_disk_keeps_the_last_checkpoint_and_no_temporary_file(data, tmp_path, monkeypatch):
    import common.files

    real, calls = common.files._write_all, {"n": 0}

    def write_all(fh, payload):
        if Path(fh.name).name.split(".")[1] == "pt":  # the weights files, written in one piece
            calls["n"] += 1
            if calls["n"] > 2:  # model.pt and checkpoint.pt of step 4 go through; step 8's do not
                fh.write(payload[: len(payload) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, payload)
    monkeypatch.setattr(common.files, "_write_all", write_all)
    with pytest.raises(RunWriteError, match="step 8.*No space left"):
        train(tiny(data, tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    WorldModel.load(tmp_path / "run" / "model.pt")


def test_corrupt_checkpoint_on_resume_is_a_clear_error(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=4), progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot be read as a training checkpoint") as info:
        train(tiny(data, tmp_path / "run", resume=True), progress=False)
    assert "weights_only=False" not in str(info.value)
    torch.save({"evil": object()}, ckpt)  # a pickle that would run code is refused the same way
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(tiny(data, tmp_path / "run", resume=True), progress=False)


def test_sigreg_prevents_collapse(tmp_path):
    """Frames of random noise: their next latent is unpredictable, so the prediction loss alone is
    minimised by shrinking every embedding to one point. SIGReg keeps the embedding spread out."""
    noise = write_synthetic(tmp_path / "noise", n_episodes=6, steps=20, noise=True)
    cfg = dict(steps=60, lr=3e-3, batch_size=16, val_every=1000, ckpt_every=1000)
    collapsed = train(tiny(noise, tmp_path / "no_sigreg", sigreg_weight=0.0, **cfg), progress=False)
    healthy = train(tiny(noise, tmp_path / "sigreg", sigreg_weight=0.25, **cfg), progress=False)
    per_step = train(tiny(noise, tmp_path / "per_step", sigreg_weight=0.25, sigreg_scope="step", **cfg),
                     progress=False)
    assert collapsed["embedding/std"] < 0.15 * healthy["embedding/std"], (collapsed, healthy)
    assert healthy["embedding/std"] > 0.5 and per_step["embedding/std"] > 0.5


def test_a_tiny_world_model_fits_a_tiny_dataset(data, tmp_path):
    """Grey-level frames that brighten step by step: after training, held-out rollouts beat predicting
    "no change" (relative error < 1), far from where training started."""
    kw = dict(lr=3e-3, val_every=1000, ckpt_every=1000, test_fraction=0.0)  # 5 training episodes of 6
    first = train(tiny(data, tmp_path / "short", steps=2, **kw), progress=False)
    fitted = train(tiny(data, tmp_path / "long", steps=150, **kw), progress=False)
    assert fitted["val"]["relative"][0] < 0.6, fitted["val"]
    assert fitted["val"]["relative"][0] < 0.01 * first["val"]["relative"][0], (first["val"], fitted["val"])
    assert fitted["val"]["first_frame_relative"][0] < 0.6, fitted["val"]  # from one frame, too


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 10, 100) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_presets_and_overrides():
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")
    full = preset_config("full", {"latent_dim": 32})
    assert full.model.latent_dim == 32 and full.model.predictor.hidden == 1024 and full.steps == 20000
    with pytest.raises(ValueError, match="unknown settings"):
        preset_config("demo", {"encoder.colour": "red"})


def test_a_preset_says_when_the_data_is_not_of_the_kind_it_was_chosen_on(data, tmp_path, caplog):
    from worldmodel.train import check_preset_data

    hold, demo = preset_config("hold", data="runs/d64"), preset_config("demo")
    assert hold.steps == 5000 and hold.model == demo.model  # the demo's model, trained longer
    lewm = preset_config("lewm-data", data="runs/mixed")
    with caplog.at_level("WARNING", logger="worldmodel.train"):
        check_preset_data(hold, 96, {"policy": "mixed"})
        check_preset_data(demo, 64, {"action_repeat": 1})
        check_preset_data(lewm, 64, {"action_repeat": 2, "policy": "random"})
        check_preset_data(lewm, 64, {"action_repeat": 2})  # a file that does not say its policy
        assert not caplog.records
        check_preset_data(hold, 64, {})
        check_preset_data(lewm, 64, {"action_repeat": 1, "policy": "mixed"})
    assert "--preset hold was chosen on other data than runs/d64: size 64 (chosen on 96)" in caplog.text
    assert ("--preset lewm-data was chosen on other data than runs/mixed: action_repeat 1 (chosen on 2), policy "
            "'mixed' (chosen on 'random'); `wm collect --policy random --action-repeat 2 --steps 200`") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="worldmodel.train"):  # every kind of difference, each preset
        check_preset_data(lewm, 96, {"action_repeat": 2, "policy": "random"})
        check_preset_data(hold, 96, {"action_repeat": 2, "policy": "random"})
    assert "runs/mixed: size 96 (chosen on 64);" in caplog.text
    assert "runs/d64: policy 'random' (chosen on 'mixed'), action_repeat 2 (chosen on 1);" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="worldmodel.train"):  # and `wm train --preset hold` says so too
        train(preset_config("hold", {**TINY, "steps": 2}, data=str(data), out=str(tmp_path / "hold")), progress=False)
    assert "--preset hold was chosen on other data than" in caplog.text and "size 32 (chosen on 96)" in caplog.text


def test_two_cpu_processes_stay_in_sync(data, tmp_path):
    """torchrun with gloo: DDP keeps the ranks' weights equal (checked at every checkpoint)."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wm",
            "train", "--data", str(data), "--out", str(out), "--steps", "4", "--device", "cpu", "--ckpt-every", "2"]
    for path, v in TINY.items():
        if path not in ("device", "ckpt_every"):
            args += ["--" + path.replace("_", "-"), str(v)]
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["step"] == 4 and meta["metrics"]["ddp_max_param_diff"] == 0.0
    assert meta["world_size"] == 2 and torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2
    assert proc.stdout.count("model:") == 1 and "{}" not in proc.stdout  # results from rank 0 alone


def test_the_losses_logged_under_torchrun_are_the_mean_over_ranks(data, tmp_path):
    """Each rank draws its own windows, so its losses differ: TensorBoard and model.json show their mean over the
    ranks (they showed rank 0's alone), and the embedding's std and effective rank those of every rank's
    windows together."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spy = tmp_path / "spy.py"  # `wm`, each rank writing down its losses and its embeddings
    spy.write_text(textwrap.dedent("""
        import os, sys
        import numpy as np
        import worldmodel.train as t
        from wm import main
        real = t.world_model_losses
        def spy(*args, **kwargs):
            losses = real(*args, **kwargs)
            with open(os.environ["SPY"] + os.environ["RANK"], "a") as f:
                f.write(f"{float(losses['loss'])} {float(losses['pred_loss'])}\\n")
            z = losses["z"].detach()
            np.save(os.environ["SPY"] + os.environ["RANK"] + ".npy", z.reshape(-1, z.shape[-1]).numpy())
            return losses
        t.world_model_losses = spy
        sys.exit(main(sys.argv[1:]))
        """))
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(spy),
            "train", "--data", str(data), "--out", str(out), "--steps", "2"]
    for path, v in TINY.items():
        args += ["--" + path.replace("_", "-"), str(v)]
    env = {**_wm_env(), "SPY": str(tmp_path / "rank")}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [[float(x) for x in (tmp_path / f"rank{r}").read_text().splitlines()[-1].split()] for r in (0, 1)]
    assert last[0] != last[1]  # the ranks' losses differ
    total, prediction = ((a + b) / 2 for a, b in zip(*last))
    events = EventAccumulator(str(out / "tb")).Reload()
    assert events.Scalars("loss/total")[-1].step == 2
    assert events.Scalars("loss/total")[-1].value == pytest.approx(total, rel=1e-5)
    assert json.loads((out / "model.json").read_text())["metrics"]["loss/prediction"] == pytest.approx(prediction,
                                                                                                      rel=1e-5)
    z = [np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)]
    assert not np.allclose(z[0], z[1])
    both = torch.from_numpy(np.concatenate(z))
    assert events.Scalars("embedding/std")[-1].value == pytest.approx(float(both.std(0).mean()), rel=1e-5)
    assert events.Scalars("embedding/effective_rank")[-1].value == pytest.approx(effective_rank(both), rel=1e-4)


def test_a_refusal_only_rank_0_decides_stops_every_rank_saying_why(data, tmp_path):
    """Rank 0 alone decides what to do with --out and checks the closed-loop episodes: its refusal is every
    rank's (the others said a dropped gloo connection, or were stopped as interrupted) and nothing is kept
    from the refused run."""
    out = tmp_path / "run"
    train(tiny(data, out, steps=2), progress=False)  # a finished run of 2 steps
    before = (out / "model.pt").read_bytes()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wm",
            "train", "--data", str(data), "--out", str(out), "--steps", "4"]
    for path, v in TINY.items():
        args += ["--" + path.replace("_", "-"), str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=_wm_env())
    assert proc.returncode != 0
    said = "already holds a run at step 2 of 2 with other settings"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]  # both ranks, the same reason
    assert "Connection closed by peer" not in proc.stderr and "wm train: interrupted" not in proc.stderr
    assert (out / "model.pt").read_bytes() == before


def test_another_ranks_error_is_raised_as_its_kind_or_as_a_runtime_error():
    error = distributed.same_error(CheckpointError, "run/checkpoint.pt: bad")
    assert type(error) is CheckpointError and str(error) == "run/checkpoint.pt: bad"
    error = distributed.same_error(UnicodeDecodeError, "x.json: not utf-8")  # takes five arguments
    assert type(error) is RuntimeError and str(error) == "x.json: not utf-8"


def test_rank_0_stopped_while_deciding_tells_the_others_so_none_waits(monkeypatch):
    """A Ctrl-C (or SIGTERM) on rank 0 inside what it alone decides is shared like an error: the other ranks
    raise it too instead of waiting in the broadcast until torchrun kills them."""
    shared = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed, "share", lambda value: shared.append(value) or value)

    def decide():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distributed.rank0_decides(decide)
    assert [s[:2] for s in shared] == [("error", KeyboardInterrupt)]


def test_a_workers_error_is_said_as_its_own_kind_and_message():
    """Torch raises a DataLoader worker's error again, of its kind, with the worker's traceback as its message:
    `wm train` says the error's own message, and keeps its kind (a subclass of DatasetError too)."""
    from envs.storage import EnvMismatchError

    said = ("Caught EnvMismatchError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            "  File \"x.py\", line 1\nenvs.storage.EnvMismatchError: d.h5: holds 'reacher-hard' episodes\n")
    error = train_module._from_worker(EnvMismatchError(said))
    assert type(error) is EnvMismatchError and str(error) == "d.h5: holds 'reacher-hard' episodes"
    plain = EnvMismatchError("d.h5: raised here")
    assert train_module._from_worker(plain) is plain


def _forget_setting(run: Path, name: str) -> None:
    """Make ``run`` look written by code that did not have the setting ``name`` yet."""
    for meta in (run / "model.json", run / "train_config.json"):
        d = json.loads(meta.read_text())
        (d.get("train_config", d)).pop(name)
        meta.write_text(json.dumps(d))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"].pop(name)
    torch.save(ckpt, run / "checkpoint.pt")


def test_runs_written_before_a_setting_existed_keep_working(data, tmp_path, monkeypatch):
    """A setting added since a run was written takes today's default: the finished run is still the same
    run (not "other settings"), an unfinished one resumes, and its history notes the new setting."""
    from wm import main

    train(tiny(data, tmp_path / "done"), progress=False)
    _forget_setting(tmp_path / "done", "rollout_weight")
    assert train(tiny(data, tmp_path / "done"), progress=False)["already_done"]

    _poison_loss(monkeypatch, after=5)
    with pytest.raises(TrainingDiverged):  # checkpoint of step 4 kept
        train(tiny(data, tmp_path / "run"), progress=False)
    monkeypatch.undo()
    _forget_setting(tmp_path / "run", "rollout_weight")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["step"] == 8 and {"step": 4, "new_settings": {"rollout_weight": 1.0}} in meta["history"]


def test_a_run_of_newer_code_is_a_clear_error(data, tmp_path, capsys):
    """A saved setting this code does not know (written by a newer version): the error names the file and
    the setting, not a traceback."""
    from wm import main

    train(tiny(data, tmp_path / "run"), progress=False)
    saved = tmp_path / "run" / "train_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "future_setting": 1}))
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train_config.json" in err and "future_setting" in err and "newer version" in err


# --- reliability: checkpoints that are sound, runs that stop cleanly, one run per directory ---------------
def _params(path):
    return torch.load(path, weights_only=True)["model"]


def _unfinished_run(data, out, monkeypatch, steps=12):
    """A run of ``steps`` stopped by a divergence at step 6: its checkpoint of step 4 is sound."""
    _poison_loss(monkeypatch, after=5)
    with pytest.raises(TrainingDiverged):
        train(tiny(data, out, steps=steps), progress=False)
    monkeypatch.undo()


def test_a_blown_up_model_never_replaces_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    """`--resume --lr 1e6`: the advice is a rate that works (a quarter of the rate the sound checkpoint was
    reached with), never a quarter of the absurd one. Parameters blown up while the loss stays finite (a
    scale the normalisation hides): the checkpoint is refused and the sound one kept."""
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch)
    sound = _params(out / "checkpoint.pt")
    with pytest.raises(TrainingDiverged, match=r"checkpoint\.pt \(step 4\).*--resume --lr 0\.00025") as info:
        train(tiny(data, out, steps=12, lr=1e6, resume=True), progress=False)
    assert "250000" not in str(info.value)
    real, calls = train_module.world_model_losses, {"n": 0}

    def blown_up(net, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                conv = net.encoder.convs[0]  # GroupNorm follows: the loss does not see the scale
                conv.weight.mul_(1e6), conv.bias.mul_(1e6)
        return real(net, *args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", blown_up)
    with pytest.raises(TrainingDiverged, match=r"model at step 8 is unsound: parameters or running statistics up to .*"
                                               r"not saved.*"
                                               r"checkpoint\.pt \(step 4\).*--resume --lr 0\.00025"):
        train(tiny(data, out, steps=12, resume=True), progress=False)
    monkeypatch.undo()
    kept = _params(out / "checkpoint.pt")
    assert all(torch.equal(sound[k], kept[k]) for k in sound)
    train(tiny(data, out, steps=12, lr=2.5e-4, resume=True), progress=False)  # the advice works
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 12
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["step"] == 8  # the one before, kept beside


def test_soundness_is_judged_against_the_last_good_checkpoint():
    from worldmodel.train import unsound

    good = {"param_norm": 10.0, "param_max": 2.0, "loss": 0.5}
    assert unsound({"param_norm": 12.0, "param_max": 2.5, "loss": 0.6}, good) is None
    assert "non-finite" in unsound({"param_norm": float("inf"), "param_max": float("inf")}, good)
    assert "parameters or running statistics up to 1.97e+15" in unsound({"param_norm": 1e16, "param_max": 1.97e15}, {})
    assert "grew 20x" in unsound({"param_norm": 200.0, "param_max": 50.0, "loss": 0.5}, good)
    assert "loss rose from 0.5" in unsound({"param_norm": 10.0, "param_max": 2.0, "loss": 80.0}, good)
    assert unsound({"param_norm": 10.0, "param_max": 2.0, "loss": 0.05}, {**good, "loss": 1e-6}) is None  # a floor


def _wm_train_args(data, out, **settings):
    args = [sys.executable, "-m", "wm", "train", "--data", str(data), "--out", str(out)]
    for name, value in {**TINY, **settings}.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def _wm_env():
    return dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")


def test_sigterm_to_the_process_group_with_dataloader_workers_saves(data, tmp_path):
    """`timeout`, `docker stop` and Slurm signal the whole group: the workers leave it to the main process,
    which finishes the step, saves and stops."""
    from conftest import tqdm_progress

    out, log = tmp_path / "run", tmp_path / "log"
    args = _wm_train_args(data, out, steps=2000, num_workers=2, ckpt_every=5000, log_every=1000, val_every=5000)
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=sink, env=_wm_env(), start_new_session=True)
        deadline = time.time() + 120
        while tqdm_progress(log) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "exited unexpectedly" not in text and "continue with --resume" in text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 5


FAILING_WORKER = """
import sys
import torch
import envs.dataset as dataset
from envs.storage import DatasetError
real = dataset.WindowDataset.__getitem__
def in_a_worker_it_fails(self, k):  # as a frame read lazily from a corrupt chunk, in a DataLoader worker
    if torch.utils.data.get_worker_info() is not None:
        raise DatasetError("shard_x.h5: episode ep_000003 cannot be read (truncated or corrupt?): bad chunk")
    return real(self, k)
dataset.WindowDataset.__getitem__ = in_a_worker_it_fails
from wm import main
sys.exit(main(sys.argv[1:]))
"""


def _train_with_a_failing_worker(data, out):
    args = [sys.executable, "-c", FAILING_WORKER] + _wm_train_args(data, out, steps=8, num_workers=2)[3:]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=_wm_env())


def test_an_error_in_a_dataloader_worker_ends_the_command_naming_the_file(data, tmp_path):
    """A dataset error raised in a --num-workers process ends `wm train` with its error (it hung at exit: the
    workers, which ignore stop signals, were left to multiprocessing's exit, which terminates and joins them),
    said as itself: torch re-raises a worker's error with the worker's traceback as its message (`wm train` said
    "Caught DatasetError in DataLoader worker process 1." and a traceback, the file and episode at its bottom)."""
    proc = _train_with_a_failing_worker(data, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = "wm train: error: shard_x.h5: episode ep_000003 cannot be read (truncated or corrupt?): bad chunk\n"
    assert said in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr


def test_one_run_at_a_time_in_a_run_directory(data, tmp_path, caplog):
    """A second `wm train` on the same --out is refused while the first runs; the lock a killed run left is
    taken over with a message."""
    from common.files import OutputLockedError

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom common.files import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=_wm_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by another run \(process {holder.pid}"):
            train(tiny(data, out), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".wm.lock"]  # nothing of the refused run
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its flock goes
        holder.wait()
    assert train(tiny(data, out, steps=2), progress=False)["loss/total"] > 0
    assert f"taking over the lock left by process {holder.pid}" in caplog.text
    assert not (out / ".wm.lock").exists()


def test_corrupt_bytes_or_non_finite_weights_in_a_checkpoint_are_refused(data, tmp_path):
    """torch checks no checksum: flipped bytes would resume from wrong weights; NaN weights would diverge."""
    out = tmp_path / "run"
    train(tiny(data, out, steps=4), progress=False)
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=True)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside a tensor's bytes: the file still loads
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: cannot be read .*checksum .* does not match"):
        train(tiny(data, out, steps=8, resume=True), progress=False)
    state["optimizer"]["state"][0]["exp_avg"][0] = float("nan")
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: optimizer\.state\.0\.exp_avg holds non-finite"):
        train(tiny(data, out, steps=8, resume=True), progress=False)


def test_a_resumable_run_without_its_model_json_says_resume(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch, steps=8)
    (out / "model.json").unlink()
    with pytest.raises(ValueError, match="a run at step 4 of 8; pass --resume to continue it") as info:
        train(tiny(data, out), progress=False)
    assert "finished" not in str(info.value)
    assert train(tiny(data, out, resume=True), progress=False)["loss/total"] > 0


def test_resume_needs_its_data_not_its_model_json(data, tmp_path, monkeypatch):
    """The checkpoint alone resumes (model.json damaged here), and it still refuses other data."""
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch, steps=8)
    (out / "model.json").write_text((out / "model.json").read_text()[:50])  # cut short
    other = write_synthetic(tmp_path / "other", n_episodes=6, steps=20, first=6)
    with pytest.raises(ValueError, match="other is not the dataset this run started on"):
        train(tiny(other, out, resume=True), progress=False)
    assert train(tiny(data, out, resume=True), progress=False)["loss/total"] > 0
    assert json.loads((out / "model.json").read_text())["step"] == 8  # written again, whole


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_resume_alone_needs_the_checkpoint_not_train_config_json(data, tmp_path, monkeypatch, caplog, damage):
    """`wm train --out X --resume` takes the run's settings from train_config.json; that file missing or damaged,
    from the checkpoint, saying so (it used the demo preset's: the default dataset was not found, or every
    setting differed; or it stopped at the JSON error)."""
    from wm import main

    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch, steps=8)
    saved = out / "train_config.json"
    saved.unlink() if damage == "missing" else saved.write_text(saved.read_text()[:40])
    reads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: reads.append(Path(path).name) or real(path, *a, **k))
    with caplog.at_level("WARNING"):
        assert main(["train", "--out", str(out), "--resume"]) == 0
    assert caplog.text.count("train_config.json is missing or damaged") == 1 and "from its checkpoint.pt" in caplog.text
    assert reads.count("checkpoint.pt") == 1  # its settings, data record, step and weights: one read
    meta = json.loads((out / "model.json").read_text())
    assert meta["step"] == 8 and meta["train_config"]["model"]["latent_dim"] == TINY["latent_dim"]
    assert not any("new_settings" in h for h in meta["history"])  # the settings as saved, none filled in


def test_resume_without_train_config_json_under_torchrun_says_so_once(data, tmp_path):
    """Each rank looks up the run's settings; rank 0 alone says they come from the checkpoint (every rank did)."""
    out = tmp_path / "run"
    train(tiny(data, out, steps=2), progress=False)
    (out / "train_config.json").unlink()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wm",
            "train", "--out", str(out), "--resume"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=_wm_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("train_config.json is missing or damaged") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("already holds this finished run") == 1


def test_a_finished_run_whose_model_files_were_lost_writes_them_again(data, tmp_path):
    """A finished run's model.json cut short, or model.pt gone: the same command (or --resume) writes them
    again from the checkpoint, the same weights and end-of-training measurements; without a checkpoint the
    error names what is missing."""
    out = tmp_path / "run"
    train(tiny(data, out), progress=False)
    weights, meta = WorldModel.load(out / "model.pt").state_dict(), json.loads((out / "model.json").read_text())
    other = tmp_path / "other"
    train(tiny(data, other, seed=1), progress=False)
    for damage, resume in ((lambda: (out / "model.json").write_text('{"step": 1'), False),
                           (lambda: (out / "model.pt").unlink(), True),
                           (lambda: (out / "model.pt").write_bytes((out / "model.pt").read_bytes()[:5000]), False),
                           (lambda: (out / "model.pt").write_bytes((other / "model.pt").read_bytes()), False)):
        damage()
        result = train(tiny(data, out, resume=resume), progress=False)
        assert "already_done" not in result and result["probe"] == meta["metrics"]["probe"]
        again = json.loads((out / "model.json").read_text())
        assert again["step"] == meta["step"] and again["metrics"]["val"] == meta["metrics"]["val"]
        rebuilt = WorldModel.load(out / "model.pt").state_dict()
        assert all(torch.equal(rebuilt[k], v) for k, v in weights.items())
    assert train(tiny(data, out), progress=False)["already_done"]  # whole again: nothing to do
    (out / "model.pt").unlink()
    (out / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt is missing or damaged and the finished run .* has no checkpoint"):
        train(tiny(data, out), progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("config", "steps=8", r"'config' must be the run's settings \(a dict\), got a str"),
    ("step", "ten", r"'step' must be a count of steps, got 'ten'"),
    ("step", -5, r"'step' must be a count of steps, got -5"),
    ("step", 1e6, r"'step' must be a count of steps, got 1000000.0"),
    ("step", 10**6, r"'step' is 1000000, beyond the run's 8 steps"),
    ("history", "none", r"'history' must be the run's history \(a list\)"),
])
def test_crafted_checkpoints_name_the_file_and_field(data, tmp_path, monkeypatch, field, value, message):
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch, steps=8)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state[field] = value
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint\.pt: {message}"):
        train(tiny(data, out, resume=True), progress=False)


def test_a_real_full_disk_while_checkpointing_is_a_clear_error(data, tmp_path):
    """Not a faked OSError: a file-size limit makes the real write fail (torch writing to such a file raises
    its own `enforce fail` RuntimeError); the error is ours, the checkpoint of step 4 intact."""
    out = tmp_path / "run"
    code = ("import resource, sys\nsys.path.insert(0, 'tests')\n"
            "from test_train import tiny\nimport worldmodel.rundir as rundir\nfrom worldmodel.train import train\n"
            "real = rundir.save\n"
            "def save(out, model, opt, cfg, step, *a, **k):\n"
            "    if step == 8:\n"
            "        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "    return real(out, model, opt, cfg, step, *a, **k)\n"
            "rundir.save = save\n"
            f"train(tiny({str(data)!r}, {str(out)!r}), progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=_wm_env())
    assert proc.returncode != 0 and "RunWriteError: could not write the checkpoint of step 8" in proc.stderr, \
        proc.stderr[-3000:]
    assert "File too large" in proc.stderr and "enforce fail" not in proc.stderr
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    WorldModel.load(out / "model.pt")


def test_temporary_files_of_killed_runs_are_removed(data, tmp_path, caplog):
    from test_files import dead_pid

    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    left = [out / f"checkpoint.pt.{pid}.tmp", out / f"model.json.{pid}.tmp"]
    for path in left:
        path.write_bytes(b"partial")
    (out / "notes.txt.123.tmp").write_text("not ours")
    train(tiny(data, out, steps=2), progress=False)
    assert not any(p.exists() for p in left) and (out / "notes.txt.123.tmp").exists()
    assert f"checkpoint.pt.{pid}.tmp: left by an interrupted run (process {pid})" in caplog.text


def test_a_malformed_data_record_on_resume_names_the_file_and_field(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _unfinished_run(data, out, monkeypatch, steps=8)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "data": "runs/demo/data"}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: 'data' must be the record of the training data"):
        train(tiny(data, out, resume=True), progress=False)
    del ckpt["data"]  # a checkpoint from before it kept the record: model.json's is read, and checked
    torch.save(ckpt, out / "checkpoint.pt")
    meta = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**meta, "data": "runs/demo/data"}))
    with pytest.raises(CheckpointError, match=r"model\.json: 'data' must be the record of the training data"):
        train(tiny(data, out, resume=True), progress=False)
