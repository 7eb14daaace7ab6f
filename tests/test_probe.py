import numpy as np
import torch

from worldmodel.probe import fit_ridge, probe_r2, r2_score, state_targets


def test_ridge_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) * torch.linspace(0.1, 10, 8)
    w_true = torch.randn(8, 3, generator=g)
    y = x @ w_true + 2.0
    w, b = fit_ridge(x, y, ridge=1e-9)
    assert torch.allclose(w.float(), w_true, atol=1e-3) and torch.allclose(b.float(), torch.full((3,), 2.0), atol=1e-3)


def test_r2_perfect_constant_and_noise():
    y = torch.randn(200, 2)
    assert torch.allclose(r2_score(y, y), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(r2_score(y, y.mean(0).expand_as(y)), torch.zeros(2, dtype=torch.float64), atol=1e-9)


def test_probe_high_for_informative_latents_low_for_noise():
    rng = np.random.default_rng(0)
    q = rng.uniform(-np.pi, np.pi, (600, 2))
    y = torch.from_numpy(state_targets(q, rng.normal(size=(600, 2))))
    informative = torch.cat([y[:, :4] @ torch.randn(4, 16, dtype=torch.float64), torch.randn(600, 4).double()], 1)
    noise = torch.randn(600, 20).double()
    good = probe_r2(informative[:400], y[:400], informative[400:], y[400:])
    bad = probe_r2(noise[:400], y[:400], noise[400:], y[400:])
    assert good["joints_mean"] > 0.99 and bad["joints_mean"] < 0.1


def test_wm_probe_checks_its_output_and_its_lock_before_any_work(tmp_path, monkeypatch):
    import pytest

    import worldmodel.datasplit
    from worldmodel.probe import probe_checkpoint

    monkeypatch.setattr(worldmodel.datasplit, "load_with_data", lambda *a: pytest.fail("worked before checking"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file is a file, not a directory"):
        probe_checkpoint(str(tmp_path / "m.pt"), out=str(tmp_path / "file"))
    from common.files import OutputLockedError, output_lock

    (tmp_path / "p").mkdir()
    with output_lock(tmp_path / "p" / "probe.json", inside=False):  # another probe writing there
        with pytest.raises(OutputLockedError, match="is in use by another run"):
            probe_checkpoint(str(tmp_path / "m.pt"), out=str(tmp_path / "p"))
    assert not (tmp_path / "p" / "probe.json").exists()
    with pytest.raises(ValueError, match="--mlp-steps must be >= 1, got 0"):  # an unfit MLP is no probe
        probe_checkpoint(str(tmp_path / "m.pt"), out=str(tmp_path / "q"), mlp_steps=0)
    assert not (tmp_path / "q").exists()


def _states(n: int, seed: int):
    """Random joint angles (n, 2) and their probe targets (cos/sin of both, a made-up fingertip)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 3.0
    finger = torch.stack([q[:, 0].cos() + 0.5 * q.sum(1).cos(), q[:, 0].sin() + 0.5 * q.sum(1).sin()], 1)
    return q, torch.from_numpy(state_targets(q.numpy(), finger.numpy()))


def test_a_linear_latent_scores_one_both_ways_and_a_nonlinear_one_only_nonlinearly():
    """The probe metrics of the identifiability check on synthetic latents: a latent that is a linear map of
    the state (cos/sin of the joints) is recovered by both probes; a latent that is a linear map of the raw
    angles (a nonlinear map of the state: cos is even in the angle) by the MLP far better than by the ridge."""
    from worldmodel.probe import PROBE_TARGETS, linear_and_nonlinear

    (q_tr, y_tr), (q_te, y_te) = _states(1500, 0), _states(500, 1)
    mix = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)).double()
    kw = dict(mlp_steps=400, hidden=64)
    linear = linear_and_nonlinear(y_tr @ mix, y_tr, y_te @ mix, y_te, PROBE_TARGETS, **kw)
    assert min(linear["linear"].values()) > 0.999 and min(linear["nonlinear"].values()) > 0.95
    angles = lambda q: q @ mix[:2]  # noqa: E731  (16 linear mixtures of the two raw angles)
    curved = linear_and_nonlinear(angles(q_tr), y_tr, angles(q_te), y_te, PROBE_TARGETS, **kw)
    lin, non = (sum(curved[k].values()) / 6 for k in ("linear", "nonlinear"))
    assert non > 0.9 and non - lin > 0.3, (lin, non)


def test_few_scored_episodes_are_warned_of():
    from worldmodel.probe import FEW_SCORED, few_scored_warning

    assert few_scored_warning(1).startswith("scored on only 1 episode(s)") and few_scored_warning(FEW_SCORED) == ""


def test_the_gaussianity_statistics_come_with_their_value_for_gaussian_samples():
    """Standardising lowers the statistics below the 1 of unit Gaussian samples (SIGReg about 0.55, each
    residual's Epps-Pulley about 0.3): the report gives what Gaussian samples of the same shape score."""
    from worldmodel.probe import gaussianity, probe_markdown

    g = torch.Generator().manual_seed(0)
    for n in (20, 2000):
        stats = gaussianity(torch.randn(n, 64, generator=g), torch.randn(n, 8, generator=g))
        ref = stats["gaussian_reference"]
        assert 0.4 < stats["latent_sigreg"] < 0.75 and 0.4 < ref["latent_sigreg"] < 0.75, stats
        assert 0.2 < ref["residual_epps_pulley_mean"] < 0.45 and 0.6 < ref["residual_epps_pulley_q95"] < 1.3, ref
    skewed = gaussianity(torch.randn(500, 16, generator=g).exp(), torch.randn(500, 2, generator=g) ** 3)
    assert skewed["latent_sigreg"] > 5 * skewed["gaussian_reference"]["latent_sigreg"]
    scores = dict.fromkeys(("linear", "nonlinear", "gap", "untrained_linear"), {})
    md = probe_markdown({**scores, "gaussianity": skewed}, "m.pt", 1, "d", 4, 12, "note")
    ref = skewed["gaussian_reference"]
    assert (f"(Gaussian samples of the same shape, measured the same way: {ref['latent_sigreg']:.2f})" in md
            and f"{ref['residual_epps_pulley_mean']:.2f} on average" in md and "about 1" not in md)


def test_a_dataset_the_model_never_saw_is_probed_whole_and_named_when_too_small(tmp_path):
    """On a dataset holding none of the model's training episodes the probe is scored on its ``split`` half
    (the episodes ``wm eval`` reports on) and fit on all the others; a dataset too small for both is named."""
    import pytest

    from conftest import write_synthetic
    from envs.dataset import EpisodeStore
    from worldmodel.datasplit import probe_split, split_episodes

    meta = {"data": {"path": "runs/demo/data", "fingerprint": "another", "train": ["elsewhere"], "val": [],
                     "test": []}}
    store = EpisodeStore(str(write_synthetic(tmp_path / "new", n_episodes=12, steps=4)))
    for split in ("test", "val"):
        fit, score, note = probe_split(store, meta, split)
        assert score == split_episodes(store, meta, split)[0] and sorted(fit + score) == list(range(12))
        assert note.endswith(f"so the probe is fit on its other {len(fit)}") and fit and score
    tiny = str(write_synthetic(tmp_path / "tiny", n_episodes=1, steps=4))
    with pytest.raises(ValueError, match=rf"^{tiny}: too few episodes for a probe: \d to fit it on and \d to score"):
        probe_split(EpisodeStore(tiny), meta, "test")


def test_wm_probe_records_its_settings_and_replaces_its_pair_whole_or_not_at_all(tmp_path, monkeypatch):
    """probe.json records the probe's settings; a re-probe that cannot write (a full disk, a file-size limit)
    keeps the earlier probe.md and probe.json both; one killed between them leaves no probe.json (not
    finished), so the same command probes again."""
    import errno
    import json
    import os
    import re
    from pathlib import Path

    import pytest

    import common.files
    from conftest import save_as_trained_on, write_synthetic
    from test_model import tiny_config
    from worldmodel.model import WorldModel
    from worldmodel.probe import probe_checkpoint

    data = write_synthetic(tmp_path / "data", n_episodes=8, steps=12)
    model = str(save_as_trained_on(WorldModel(tiny_config()), tmp_path / "m.pt", data))
    probe_checkpoint(model, device="cpu", mlp_steps=2)
    pair = lambda: {name: (tmp_path / name).read_text() for name in ("probe.md", "probe.json")}  # noqa: E731
    first, files = pair(), sorted(p.name for p in tmp_path.iterdir())
    record = json.loads(first["probe.json"])
    assert record["mlp_steps"] == 2 and record["split"] == "test" and record["split_note"].endswith("trained on")

    write_all = common.files._write_all

    def too_large(fh, data):  # a file-size limit hit while writing probe.json (staged: probe.<pid>.tmp.json)
        if Path(fh.name).name.startswith("probe.") and fh.name.endswith(".json"):
            raise OSError(errno.EFBIG, "File too large", fh.name)
        return write_all(fh, data)

    with monkeypatch.context() as m:
        m.setattr(common.files, "_write_all", too_large)
        with pytest.raises(OSError, match="File too large") as failed:
            probe_checkpoint(model, device="cpu", mlp_steps=3, overwrite=True)
    assert pair() == first and sorted(p.name for p in tmp_path.iterdir()) == files  # no temporary left either
    assert re.search(r"could not write .*probe\.json \(File too large\); nothing was left behind", str(failed.value))
    replace = os.replace
    with monkeypatch.context() as m:  # killed after probe.md took its place
        m.setattr(os, "replace",
                  lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt) if b.name == "probe.json" else replace(a, b))
        with pytest.raises(KeyboardInterrupt):
            probe_checkpoint(model, device="cpu", mlp_steps=3, overwrite=True)
    assert not (tmp_path / "probe.json").exists() and (tmp_path / "probe.md").read_text() != first["probe.md"]
    probe_checkpoint(model, device="cpu", mlp_steps=3)  # not finished: probed again without --overwrite
    assert json.loads((tmp_path / "probe.json").read_text())["mlp_steps"] == 3
