import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_synthetic
import worldmodel.train as train_module
from worldmodel import distributed
from worldmodel.model import CheckpointError, WorldModel
from worldmodel.objective import lr_at
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
    record = json.loads((tmp_path / "run" / "model.json").read_text())["data"]
    fit, val, test = set(record["train"]), set(record["val"]), set(record["test"])
    assert len(fit) + len(val) + len(test) == 6 and len(fit | val | test) == 6 and val and test
    assert record["path"] == str(data) and record["fingerprint"]


def test_tensorboard_has_validation_loss_hparams_and_closed_loop(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    def closed_loop(model, store, train_ids, val_ids, episodes):
        calls.append((len(val_ids), episodes))
        return {"reach25_latched": 0.5, "reach25_held": 0.25}

    metrics = train(tiny(data, tmp_path / "run", eval_episodes=3), progress=False, closed_loop=closed_loop)
    assert calls == [(1, 3)] and metrics["closed_loop"]["reach25_held"] == 0.25
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"val/prediction_loss", "loss/total", "closed_loop/reach25_latched"} <= set(tags)
    assert (tmp_path / "run" / "tb" / "hparams").is_dir()
    assert json.loads((tmp_path / "run" / "model.json").read_text())["metrics"]["closed_loop"]["reach25_latched"] == 0.5


def test_rollout_loss_is_trained_and_logged(data, tmp_path):
    metrics = train(tiny(data, tmp_path / "run", steps=4, n_pred=2, rollout_steps=2), progress=False)
    assert metrics["loss/rollout"] > 0
    with pytest.raises(ValueError, match="rollout-steps"):
        tiny(data, tmp_path / "bad", steps=2, n_pred=1, rollout_steps=2)


def test_a_finished_run_is_kept_and_another_is_refused(data, tmp_path, capsys):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    again = train(tiny(data, tmp_path / "run", steps=2), progress=False)  # the same run: nothing to do
    assert again["already_done"] and "already holds this finished run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a run at step 2 of 2 with other settings.*batch_size.*"
                                         "it is finished, --overwrite"):
        train(tiny(data, tmp_path / "run", steps=2, batch_size=4), progress=False)
    assert train(tiny(data, tmp_path / "run", steps=2, batch_size=4, overwrite=True), progress=False)["loss/total"] > 0


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


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_is_bit_for_bit(data, tmp_path, monkeypatch, sig):
    """The step in flight finishes (BatchNorm statistics and optimiser step both), then the run saves and
    stops: resuming gives exactly the weights of a run that never stopped."""
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
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_resume_with_other_settings_is_refused(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=4), progress=False)
    with pytest.raises(ValueError, match="settings differ.*batch_size"):
        train(tiny(data, tmp_path / "run", steps=8, batch_size=4, resume=True), progress=False)


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
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # model.pt and checkpoint.pt of step 4 go through; step 8's do not
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
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
