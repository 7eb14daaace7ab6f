"""Linear probes: how much of the true state a linear map recovers from the latent.

The LeJEPA theory says an isotropic-Gaussian embedding trained to predict keeps the state linearly
identifiable; R^2 of a ridge regression from latent to state, on held-out episodes, is the check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.text import counted
from worldmodel.latents import encode_episodes, every

log = logging.getLogger(__name__)

PROBE_TARGETS = ("cos_shoulder", "sin_shoulder", "cos_wrist", "sin_wrist", "finger_x", "finger_y")
JOINT_TARGETS = PROBE_TARGETS[:4]
PROBE_STATES = ("qpos", "finger")  # the true states the targets are computed from


def state_targets(qpos: np.ndarray, finger: np.ndarray) -> np.ndarray:
    """(N, 2) joint angles and (N, 2) fingertip xy -> (N, 6) probe targets (angles as cos/sin)."""
    return np.stack([np.cos(qpos[:, 0]), np.sin(qpos[:, 0]), np.cos(qpos[:, 1]), np.sin(qpos[:, 1]),
                     finger[:, 0], finger[:, 1]], 1)


def fit_ridge(x: Tensor, y: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Closed-form ridge on standardised inputs: returns (W (D, K), b (K,)) with y ~ x @ W + b."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    xs = (x - mu) / sd
    ym = y.mean(0)
    gram = xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype)
    w = torch.linalg.solve(gram, xs.T @ (y - ym)) / sd[:, None]  # undo the standardisation
    return w, ym - mu @ w


def r2_score(y: Tensor, y_hat: Tensor) -> Tensor:
    """Coefficient of determination per column: 1 - SS_res / SS_tot."""
    y, y_hat = y.double(), y_hat.double()
    ss_res = ((y - y_hat) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return 1 - ss_res / ss_tot


def probe_r2(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, ridge: float = 1e-3) -> dict:
    """Fit on train, R^2 per target on test, plus the mean over the joint targets."""
    w, b = fit_ridge(z_train, y_train, ridge)
    r2 = r2_score(y_test, z_test.double() @ w + b)
    out = {name: float(v) for name, v in zip(PROBE_TARGETS, r2)}
    out["joints_mean"] = float(np.mean([out[k] for k in JOINT_TARGETS]))
    return out


def encode_frames(model, store, episode_ids, stride: int = 5, batch_size: int = 512):
    """Latents (N, D) on the CPU and probe targets (N, 6) of every ``stride``-th frame of the given episodes."""
    encoded = encode_episodes(model, store, episode_ids, every(stride), batch_size)
    targets = [state_targets(store.states(i)["qpos"][t], store.states(i)["finger"][t])
               for i, t in _by_episode(encoded)]
    return encoded["z"].cpu(), torch.from_numpy(np.concatenate(targets))


def _by_episode(encoded: dict):
    """(episode, positions) of each episode of ``encode_episodes``' output, in order."""
    ends = np.cumsum(encoded["counts"])
    return [(int(encoded["episode"][end - 1]), encoded["t"][end - n:end]) for n, end in zip(encoded["counts"], ends)]


def run_probe(model, store, train_ids, test_ids, stride: int = 5) -> dict:
    """R^2 of the probe from ``model``'s latents, trained on ``train_ids``, scored on ``test_ids``."""
    z_tr, y_tr = encode_frames(model, store, train_ids, stride)
    z_te, y_te = encode_frames(model, store, test_ids, stride)
    return probe_r2(z_tr, y_tr, z_te, y_te)


def probe_checkpoint(checkpoint: str, data: str = "", device: str = "auto", out: str = "", split: str = "test",
                     overwrite: bool = False, mlp_steps: int = 1500) -> dict:
    """``wm probe``: what kind of map leads from the latent to the arm's state. Linear (ridge) and nonlinear
    (MLP) probes per state variable (joint cos/sin, fingertip, joint velocities from two consecutive
    latents), fit on the model's training episodes (on a dataset holding none of them: its other held-out
    half) and scored on ``split`` episodes, their gap (linear identifiability: the MLP adds nothing), how
    Gaussian the latents and the probe's residuals are beside Gaussian samples of the same shape, and the
    linear probe of the same architecture untrained (the floor). Writes ``probe.md`` and ``probe.json``, the
    pair of one run (``write_probe``; beside the checkpoint unless ``out``; finished ones are kept unless
    ``overwrite``)."""
    from common.files import output_dir, output_lock

    if mlp_steps < 1:  # an MLP never fit would report its random start as the nonlinear probe
        raise ValueError(f"--mlp-steps must be >= 1, got {mlp_steps}")
    with output_dir(out if out else Path(checkpoint).parent) as where:  # checked before any work
        with output_lock(where / "probe.json", inside=False):  # one probe at a time there (beside a training run)
            return _probe_checkpoint(checkpoint, data, device, where, split, overwrite, mlp_steps)


def _probe_checkpoint(checkpoint: str, data: str, device: str, where: Path, split: str, overwrite: bool,
                      mlp_steps: int) -> dict:
    from common.files import remove_stale_temporaries
    from common.provenance import provenance, signed
    from worldmodel.datasplit import load_with_data, probe_split

    if (where / "probe.json").exists() and not overwrite:
        raise ValueError(f"{where} already holds probe.json; pass --overwrite to replace it, or --out for another "
                         f"directory")
    remove_stale_temporaries(where, r"probe\.(md|json)")  # a killed probe's (we hold probe.json's lock)
    trained, meta, store, data = load_with_data(checkpoint, data, device)
    store.require_states(PROBE_STATES, "probes")
    fit, test, note = probe_split(store, meta, split)
    log.info(f"probing {checkpoint} (step {meta.get('step')}) on {data}: fit on {len(fit)} episodes, scored on "
             f"{len(test)}: {note}")
    if warning := few_scored_warning(len(test)):
        log.warning(warning)
    result = identifiability(trained, store, fit, test, mlp_steps=mlp_steps)
    torch.manual_seed(0)
    untrained = type(trained)(trained.cfg).to(trained.device)  # same architecture, random weights: the floor
    result["untrained_linear"] = run_probe(untrained, store, fit, test)
    made = provenance()
    markdown = signed(probe_markdown(result, checkpoint, meta.get("step"), data, len(fit), len(test), note), made)
    write_probe(where, markdown, {"checkpoint": str(checkpoint), "step": meta.get("step"), "data": str(data),
                                  "split": split, "split_note": note, "fit_episodes": len(fit),
                                  "scored_episodes": len(test), "mlp_steps": mlp_steps, **result, "provenance": made})
    return {**result, "markdown": markdown, "json": str(where / "probe.json"), "md": str(where / "probe.md")}


def write_probe(where: Path, markdown: str, record: dict) -> None:
    """``probe.md`` and ``probe.json`` of one probe into ``where``, never a mix of two (``write_together``):
    a full disk or a file-size limit leaves the earlier pair as it was, and a run killed between leaves
    probe.md alone: not finished, so the same command probes again."""
    from common.files import json_text, naming_write_errors, write_together

    with naming_write_errors():  # whichever of the two it was
        write_together({where / "probe.md": markdown, where / "probe.json": json_text(record)})


FEW_SCORED = 10  # fewer held-out episodes than this and an R^2 says more about them than about the latent


def few_scored_warning(scored: int) -> str:
    """A sentence when too few episodes are scored for an R^2 to mean much, else ""."""
    if scored >= FEW_SCORED:
        return ""
    return (f"scored on only {scored} episode(s): an R^2 divides by the variance of the state within them, which few "
            f"episodes understate (one arm's sweep), so the scores are low and unsteady; use more held-out episodes")


def probe_markdown(result: dict, checkpoint, step, data, fit: int, test: int, note: str) -> str:
    names = [*STATE_VARIABLES, "joints_mean"]
    floor = result["untrained_linear"]
    rows = {"linear (ridge)": result["linear"], "nonlinear (MLP)": result["nonlinear"],
            "gap (nonlinear - linear)": result["gap"],
            "untrained encoder, linear (floor)": {k: floor.get(k) for k in names}}
    md = ["| probe | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {label} | " + " | ".join("-" if r.get(n) is None else f"{r[n]:.3f}" for n in names) + " |"
           for label, r in rows.items()]
    g, warning = result["gaussianity"], few_scored_warning(test)
    ref = g["gaussian_reference"]
    return (f"R^2 of probes from the latent of `{checkpoint}` (step {step}) to the arm's state, on `{data}`: fit on "
            f"{counted(fit, 'episode')}, scored on {test} ({note}). Velocities are probed from two consecutive "
            f"latents.\n\n"
            + "\n".join(md) + f"\n\nHow Gaussian: the SIGReg statistic of the standardised test latents is "
            f"{g['latent_sigreg']:.2f} (Gaussian samples of the same shape, measured the same way: "
            f"{ref['latent_sigreg']:.2f}); the Epps-Pulley statistics of the linear probe's standardised residuals: "
            f"{', '.join(f'{v:.1f}' for v in g['residual_epps_pulley'])} (per variable, same order; Gaussian "
            f"samples of the same size: {ref['residual_epps_pulley_mean']:.2f} on average, 95% of them below "
            f"{ref['residual_epps_pulley_q95']:.2f}). Larger is less Gaussian.\n"
            + (f"\n**Warning**: {warning}.\n" if warning else ""))


# --- what kind of map: linear against nonlinear probes, per state variable, and how Gaussian ---------------
STATE_VARIABLES = (*PROBE_TARGETS, "vel_shoulder", "vel_wrist")  # velocities: from two consecutive latents


def probe_data(model, store, episode_ids, stride: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(z (N, D), y (N, 6), z pairs (N, 2D), joint velocities (N, 2)) of every ``stride``-th frame of the
    episodes: the latent of frame t for the pose targets, and [z_t, z_t+1] for the velocities at t."""
    pos = lambda steps: np.arange(0, steps, stride)  # noqa: E731  (frames t that have a next frame)
    now = encode_episodes(model, store, episode_ids, pos, batch_size=512)
    nxt = encode_episodes(model, store, episode_ids, lambda steps: pos(steps) + 1, batch_size=512)
    y, vel = [], []
    for i, t in _by_episode(now):
        s = store.states(i)
        y.append(state_targets(s["qpos"][t], s["finger"][t]))
        vel.append(s["qvel"][t])
    z, z_next = now["z"].cpu(), nxt["z"].cpu()
    return z, torch.from_numpy(np.concatenate(y)), torch.cat([z, z_next], 1), torch.from_numpy(np.concatenate(vel))


def fit_mlp(x: Tensor, y: Tensor, hidden: int = 256, steps: int = 1500, lr: float = 3e-3, batch: int = 512,
            seed: int = 0):
    """A small MLP (two hidden layers, GELU) from standardised x to standardised y, Adam on minibatches with
    a cosine decay (a converged probe, not a noisy one): the nonlinear probe. Returns a function x -> y."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    mx, sx, my, sy = x.mean(0), x.std(0).clamp_min(1e-8), y.mean(0), y.std(0).clamp_min(1e-8)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.GELU(), torch.nn.Linear(hidden, y.shape[1]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 / p.shape[-1]) ** 0.5 if p.ndim == 2 else 0 * p)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xs, ys = (x - mx) / sx, (y - my) / sy
    with torch.enable_grad():
        for k in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * k / steps))
            rows = torch.randint(len(xs), (min(batch, len(xs)),), generator=g)
            loss = torch.nn.functional.mse_loss(net(xs[rows]), ys[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lambda q: net((q.float() - mx) / sx).detach() * sy + my


def linear_and_nonlinear(z_tr, y_tr, z_te, y_te, names, mlp_steps: int = 1500, hidden: int = 256) -> dict:
    """R^2 per variable on test of a ridge (linear) and an MLP (nonlinear) probe fit on train, with the
    linear probe's test residuals."""
    w, b = fit_ridge(z_tr, y_tr)
    linear_pred = z_te.double() @ w + b
    mlp = fit_mlp(z_tr, y_tr, hidden=hidden, steps=mlp_steps)
    lin, non = r2_score(y_te, linear_pred), r2_score(y_te, mlp(z_te))
    return {"linear": dict(zip(names, map(float, lin))), "nonlinear": dict(zip(names, map(float, non))),
            "residuals": (y_te.double() - linear_pred).float()}


GAUSSIAN_ROWS = 256  # Gaussian residual columns measured for the reference (one draw of each is noisy)
GAUSSIAN_DRAWS = 8  # Gaussian latent samples the reference averages (one draw's statistic varies by +-0.1)


def gaussianity(z: Tensor, residuals: Tensor, directions: int = 256, seed: int = 0, reference: bool = True) -> dict:
    """How Gaussian the test latents are: the SIGReg statistic of the standardised latents (mean over random
    directions), and the Epps-Pulley statistic of each probe residual (standardised) against N(0, 1); larger
    is less Gaussian. Standardising lowers both below the 1 that unit Gaussian samples give, by an amount that
    depends on the shape (measured: about 0.5-0.57 for latents of 8 to 64 dimensions, one draw anywhere in
    0.4-0.65; about 0.3-0.4 on average for a residual, 95% below 0.9-1.2). So with ``reference`` the same is
    measured on Gaussian samples of the same shape (the latents' averaged over ``GAUSSIAN_DRAWS`` draws;
    ``GAUSSIAN_ROWS`` residual columns: their mean and 95th percentile), to compare with."""
    from worldmodel.sigreg import epps_pulley, sigreg_loss

    def standardised(x: Tensor) -> Tensor:
        return ((x - x.mean(0)) / x.std(0).clamp_min(1e-8)).float()

    def latent_statistic(x: Tensor) -> float:
        return float(sigreg_loss(standardised(x), directions, generator=torch.Generator().manual_seed(seed)))

    def residual_statistics(x: Tensor) -> Tensor:
        return epps_pulley(standardised(x).T)

    out = {"latent_sigreg": latent_statistic(z), "residual_epps_pulley": residual_statistics(residuals).tolist()}
    if reference:
        g = torch.Generator().manual_seed(seed)
        latents = [latent_statistic(torch.randn(z.shape, generator=g)) for _ in range(GAUSSIAN_DRAWS)]
        rows = residual_statistics(torch.randn(len(residuals), GAUSSIAN_ROWS, generator=g))
        out["gaussian_reference"] = {"latent_sigreg": float(np.mean(latents)),
                                     "residual_epps_pulley_mean": float(rows.mean()),
                                     "residual_epps_pulley_q95": float(rows.quantile(0.95))}
    return out


def identifiability(model, store, fit_ids, test_ids, stride: int = 5, mlp_steps: int = 1500) -> dict:
    """Linear and nonlinear R^2 per state variable (poses from one latent, joint velocities from two
    consecutive ones), their gap, and how Gaussian the latents and the linear probe's residuals are."""
    z_tr, y_tr, zz_tr, v_tr = probe_data(model, store, fit_ids, stride)
    z_te, y_te, zz_te, v_te = probe_data(model, store, test_ids, stride)
    poses = linear_and_nonlinear(z_tr, y_tr, z_te, y_te, PROBE_TARGETS, mlp_steps)
    vels = linear_and_nonlinear(zz_tr, v_tr, zz_te, v_te, STATE_VARIABLES[6:], mlp_steps)
    out = {kind: {**poses[kind], **vels[kind]} for kind in ("linear", "nonlinear")}
    for kind in ("linear", "nonlinear"):
        out[kind]["joints_mean"] = float(np.mean([out[kind][k] for k in JOINT_TARGETS]))
    out["gap"] = {k: out["nonlinear"][k] - out["linear"][k] for k in (*STATE_VARIABLES, "joints_mean")}
    out["gaussianity"] = gaussianity(z_te, torch.cat([poses["residuals"], vels["residuals"]], 1))
    return out
