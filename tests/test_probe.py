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
