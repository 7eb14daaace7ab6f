import os
import subprocess
import sys

import pytest
import torch

from conftest import write_synthetic
from worldmodel.model import WorldModel
from worldmodel.train import TrainingDiverged, lr_at, preset_config, train

TINY = dict(latent_dim=16, proj_hidden=32, conv_channels=8, pred_hidden=32, pred_depth=2, batch_size=8,
            history=2, n_pred=1, rollout_steps=0, frameskip=2, val_horizon=2, warmup_steps=2, log_every=2, val_every=4,
            probe_every=0, ckpt_every=4, sigreg_directions=32, device="cpu")


@pytest.fixture
def data(tmp_path):
    return write_synthetic(tmp_path / "data", n_episodes=6, steps=20)


def tiny(data, out, **kw):
    return preset_config("demo", data=str(data), out=str(out), **{**TINY, "steps": 8, **kw})


def test_train_writes_model_checkpoint_and_logs(data, tmp_path):
    metrics = train(tiny(data, tmp_path / "run"), progress=False)
    for name in ("model.pt", "model.json", "checkpoint.pt", "train_config.json"):
        assert (tmp_path / "run" / name).exists()
    assert list((tmp_path / "run" / "tb").iterdir())
    assert len(metrics["val"]["mse"]) == 2 and "joints_mean" in metrics["probe"]
    WorldModel.load(tmp_path / "run" / "model.pt")


def test_rollout_loss_is_trained_and_logged(data, tmp_path):
    metrics = train(tiny(data, tmp_path / "run", steps=4, n_pred=2, rollout_steps=2), progress=False)
    assert metrics["loss/rollout"] > 0
    with pytest.raises(ValueError, match="rollout_steps"):
        train(tiny(data, tmp_path / "bad", steps=2, n_pred=1, rollout_steps=2), progress=False)


def test_refuses_to_overwrite_a_run(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny(data, tmp_path / "run", steps=2), progress=False)


def _interrupt_at(monkeypatch, step_to_fail: int):
    import worldmodel.train as t
    real, calls = t.world_model_losses, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step_to_fail + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(t, "world_model_losses", flaky)


def test_resume_continues_bit_for_bit(data, tmp_path, monkeypatch):
    train(tiny(data, tmp_path / "straight"), progress=False)
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, tmp_path / "resumed"), progress=False)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    train(tiny(data, tmp_path / "resumed", resume=True), progress=False)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=4), progress=False)
    with pytest.raises(ValueError, match="settings differ"):
        train(tiny(data, tmp_path / "run", steps=4, lr=0.5, resume=True), progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    import worldmodel.train as t
    real = t.sigreg_loss
    calls = {"n": 0}

    def poisoned(z, *a, **k):
        calls["n"] += 1
        return real(z, *a, **k) * (float("nan") if calls["n"] > 5 else 1.0)
    monkeypatch.setattr(t, "sigreg_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss .* step 5"):
        train(tiny(data, tmp_path / "run"), progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_sigreg_prevents_collapse(tmp_path):
    """Frames of random noise: their next latent is unpredictable, so the prediction loss alone is
    minimised by shrinking every embedding to one point. SIGReg keeps the embedding spread out."""
    noise = write_synthetic(tmp_path / "noise", n_episodes=6, steps=20, noise=True)
    cfg = dict(steps=60, lr=3e-3, batch_size=16, val_every=1000, ckpt_every=1000)
    collapsed = train(tiny(noise, tmp_path / "no_sigreg", sigreg_weight=0.0, **cfg), progress=False)
    healthy = train(tiny(noise, tmp_path / "sigreg", sigreg_weight=0.5, **cfg), progress=False)
    assert collapsed["embedding/std"] < 0.15 * healthy["embedding/std"], (collapsed, healthy)
    assert healthy["embedding/std"] > 0.5


def test_a_tiny_world_model_fits_a_tiny_dataset(data, tmp_path):
    """Grey-level frames that brighten step by step: after training, held-out rollouts beat predicting
    "no change" (relative error < 1), far from where training started."""
    first = train(tiny(data, tmp_path / "short", steps=2, lr=3e-3, val_every=1000, ckpt_every=1000), progress=False)
    fitted = train(tiny(data, tmp_path / "long", steps=150, lr=3e-3, val_every=1000, ckpt_every=1000),
                   progress=False)
    assert fitted["val"]["relative"][0] < 0.6, fitted["val"]
    assert fitted["val"]["relative"][0] < 0.01 * first["val"]["relative"][0], (first["val"], fitted["val"])


def test_lr_schedule_warms_up_then_decays():
    cfg = preset_config("demo", steps=100, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")


def test_two_cpu_processes_stay_in_sync(data, tmp_path):
    """torchrun with gloo: DDP keeps the ranks' weights equal (checked at every checkpoint)."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wm",
            "train", "--data", str(data), "--out", str(out), "--steps", "4", "--device", "cpu"]
    for k, v in {**TINY, "ckpt_every": 2}.items():
        if k != "device":
            args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = (out / "model.json").read_text()
    assert '"step": 4' in meta
    assert '"ddp_max_param_diff": 0.0' in meta
