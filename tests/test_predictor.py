import pytest
import torch

from worldmodel.predictor import MLPPredictor, PredictorConfig, TransformerPredictor, build_predictor

D, A, H = 8, 4, 3
KINDS = ["mlp", "transformer"]


def tiny(kind: str, history: int = H, randomise: bool = True, **overrides) -> torch.nn.Module:
    """A tiny predictor; ``randomise`` undoes the zero init (identity dynamics hides dependence bugs)."""
    cfg = dict(kind=kind, hidden=32, depth=2, heads=2)
    model = build_predictor(PredictorConfig(**{**cfg, **overrides}), D, A, history)
    if randomise:
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return model


def sequence(b: int = 3, t: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D, generator=g), torch.randn(b, t, A, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes(kind):
    model = tiny(kind)
    assert isinstance(model, {"mlp": MLPPredictor, "transformer": TransformerPredictor}[kind])
    for t in (1, 2, H, 7):
        z, a = sequence(t=t)
        assert model(z, a).shape == (3, t, D)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_predicts_no_change(kind):
    z, a = sequence()
    torch.testing.assert_close(tiny(kind, randomise=False)(z, a), z)


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    model = tiny(kind)
    z, a = sequence()
    out = model(z, a)
    for t in range(z.shape[1] - 1):
        z2, a2 = z.clone(), a.clone()
        z2[:, t + 1 :] += 1.0
        a2[:, t + 1 :] += 1.0
        out2 = model(z2, a2)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1])
        assert not torch.allclose(out2[:, t + 1], out[:, t + 1])


@pytest.mark.parametrize("kind", KINDS)
def test_history_window(kind):
    model = tiny(kind)
    z, a = sequence(t=8)
    out = model(z, a)
    for t in range(H, 8):
        z2, a2 = z.clone(), a.clone()
        z2[:, : t - H + 1] += 1.0  # older than the window ending at t
        a2[:, : t - H + 1] += 1.0
        torch.testing.assert_close(model(z2, a2)[:, t], out[:, t])
        z3 = z.clone()
        z3[:, t - H + 1] += 1.0  # the oldest position inside the window does matter
        assert not torch.allclose(model(z3, a)[:, t], out[:, t])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("h", [1, 2, H])
def test_rollout_shape_and_first_step(kind, h):
    model = tiny(kind)
    z, a = sequence(t=h + 4)
    z_hist, a_hist, actions = z[:, :h], a[:, : h - 1] if h > 1 else None, a[:, h - 1 : h + 4]
    pred = model.rollout(z_hist, a_hist, actions)
    assert pred.shape == (3, 5, D)
    # H = 1 is one forward pass on the same context
    torch.testing.assert_close(model.rollout(z_hist, a_hist, actions[:, :1])[:, 0], model(z_hist, a[:, :h])[:, -1])
    torch.testing.assert_close(pred[:, 0], model(z_hist, a[:, :h])[:, -1])


@pytest.mark.parametrize("kind", KINDS)
def test_rollout_feeds_predictions_back(kind):
    """Rollout equals forward on a sequence whose latents after the history are the predictions."""
    model = tiny(kind)
    z, a = sequence(t=H + 3)
    pred = model.rollout(z[:, :H], a[:, : H - 1], a[:, H - 1 : H + 2])  # (B, 3, D)
    z_seq = torch.cat([z[:, :H], pred[:, :-1]], dim=1)  # (B, H + 2, D)
    torch.testing.assert_close(model(z_seq, a[:, : H + 2])[:, H - 1 :], pred)


@pytest.mark.parametrize("kind", KINDS)
def test_learns_linear_dynamics(kind):
    """z_{t+1} = R z_t + B a_t with a rotation R: a tiny predictor fits it in 150 steps."""
    torch.manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(D, D))
    b = 0.3 * torch.randn(A, D)
    a = torch.rand(32, 6, A) * 2 - 1
    z = [torch.randn(32, D)]
    for t in range(5):
        z.append(z[-1] @ rot.T + a[:, t] @ b)
    z = torch.stack(z, dim=1)  # (32, 6, D)
    model = tiny(kind, randomise=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    baseline = (z[:, 1:] - z[:, :-1]).square().mean()  # predicting "no change"
    for _ in range(150):
        loss = (model(z[:, :-1], a[:, :-1]) - z[:, 1:]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.02 * baseline


def test_unknown_kind():
    with pytest.raises(ValueError):
        build_predictor(PredictorConfig(kind="rnn"), D, A, H)
