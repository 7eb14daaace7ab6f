"""The training objective and what measures it: losses, schedule, seeding, validation metrics.

Pure functions of a model and a batch, so the training loop, the benchmark and the tests share them.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from worldmodel.sigreg import sigreg_loss

SIGREG_SCOPES = ("frames", "step")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of every random draw of training step ``step`` on ``rank``: resuming repeats it exactly."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(step_seed(seed, step, rank))


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0) -> list[int]:
    """The windows of step ``step``: drawn on the host with numpy (no tensor, so no device sync)."""
    return np.random.default_rng(step_seed(seed, step, rank)).integers(n, size=batch_size).tolist()


def lr_at(step: int, warmup_steps: int, steps: int) -> float:
    """Linear warmup to 1, then cosine to 0: a multiplier of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred latents (N, D): 1 = collapsed, D = isotropic."""
    s = torch.linalg.svdvals((z - z.mean(0)).float())
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def sigreg_term(z: torch.Tensor, scope: str, directions: int, generator: torch.Generator,
                target: str = "gaussian") -> torch.Tensor:
    """SIGReg of the latents of a batch of windows z (B, L, D), towards ``target``.

    ``frames``: all B*L latents tested as one sample (consecutive frames of a window are correlated);
    ``step``: each time step's B latents tested on their own, then averaged (LeWorldModel's choice).
    """
    if scope == "frames":
        return sigreg_loss(rearrange(z, "b l d -> (b l) d"), directions, generator=generator, target=target)
    if scope == "step":
        return sigreg_loss(rearrange(z, "b l d -> l b d"), directions, generator=generator, target=target)
    raise ValueError(f"sigreg scope must be one of {SIGREG_SCOPES}, got {scope!r}")


def world_model_losses(model, batch: dict, cfg, generator: torch.Generator) -> dict:
    """The training objective on one batch of windows: teacher-forced prediction + SIGReg (+ an
    open-loop rollout of ``cfg.rollout_steps`` from the first ``history`` latents, as the planner uses it;
    and, with ``cfg.first_frame_rollout_weight``, one from the first latent alone).

    Teacher-forced predictions are scored at every window position; the first ones see a left-padded
    history, as the MPC policy does at the start of an episode.
    """
    first = bool(cfg.rollout_steps and cfg.first_frame_rollout_weight)
    # (B, L, D), (B, L-1, D), and (B, R, D) or, with the first-frame rollout, (2B, R, D)
    z, pred, roll = model(batch["pixels"], batch["actions"], cfg.rollout_steps, first)
    z = z.float()
    w = slow_weights(z, cfg.slow_weight) if cfg.slow_weight else None  # (B, L-1): one per transition
    if cfg.padded_history == "rest":  # a padded history is scored only where the arm really was at rest
        w = padded_history_weights(batch["starts_episode"], pred.shape[1], cfg.model.history) * (1 if w is None else w)
    pred_loss = weighted_mse(pred.float(), z[:, 1:], w)
    sig = sigreg_term(z, cfg.sigreg_scope, cfg.sigreg_directions, generator, cfg.sigreg_target)
    loss = pred_loss + cfg.sigreg_weight * sig
    out = {"pred_loss": pred_loss, "sigreg": sig, "z": z.detach()}
    if roll is not None:
        h, r = cfg.model.history, cfg.rollout_steps
        w_roll = None if w is None else w[:, h - 1:h - 1 + r]  # the transitions into the rollout's targets
        if first:  # rows B.. roll out from the first frame alone: targets 1..R
            roll, roll_first = roll.float().chunk(2)  # (B, R, D) each
            w_first = None if w is None else w[:, :r]
            out["first_frame_rollout_loss"] = weighted_mse(roll_first, z[:, 1:1 + r], w_first)
            loss = loss + cfg.first_frame_rollout_weight * out["first_frame_rollout_loss"]
        out["rollout_loss"] = weighted_mse(roll.float(), z[:, h:h + r], w_roll)
        loss = loss + cfg.rollout_weight * out["rollout_loss"]
    return {"loss": loss, **out}


def padded_history_weights(starts_episode: torch.Tensor, transitions: int, history: int) -> torch.Tensor:
    """Weights (B, T) of the teacher-forced predictions of windows, ``starts_episode (B,)``: the first
    ``history - 1`` predictions see a left-padded history, which stands for an arm at rest; they count only
    in windows that start an episode (at rest there), normalised to mean 1 over the batch."""
    w = torch.ones(len(starts_episode), transitions, device=starts_episode.device)
    w[:, :history - 1] = starts_episode.float()[:, None]
    return w / w.mean()


def slow_weights(z: torch.Tensor, power: float) -> torch.Tensor:
    """Weights (B, L-1) of the transitions of windows of latents ``z (B, L, D)``: (latent change)^-power,
    normalised to mean 1 over the batch, so slow motion (what holding a goal needs) counts more; 1% of the
    batch's mean change is added first, so a frame with no change at all does not take the whole weight.
    Computed without gradient: an importance weight of each target, not something the encoder can move."""
    with torch.no_grad():
        motion = (z[:, 1:] - z[:, :-1]).square().mean(-1)  # (B, L-1)
        w = (motion + 0.01 * motion.mean()).pow(-power)
        return w / w.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of ``(B, T, D)`` predictions, each of the T steps weighted by ``w (B, T)`` if given."""
    if w is None:
        return F.mse_loss(pred, target)
    return ((pred - target).square().mean(-1) * w).mean()


@torch.no_grad()
def validation_metrics(model, loader, history: int, device) -> dict:
    """On held-out windows of ``history`` + H frames, through the model's own forward pass (as training
    computes it): the teacher-forced prediction loss, and the open-loop error at every rollout step 1..H,
    absolute and relative to predicting no change (the last context latent): below 1 means the model saw
    the motion coming. ``first_frame_*``: the same for the rollout from the window's first frame alone
    (what a planner conditioned on one frame, as LeWM's, relies on)."""
    model.eval()
    se, base, se1, base1, tf, n = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for batch in loader:
        frames, actions = batch["pixels"].to(device), batch["actions"].to(device)
        H = frames.shape[1] - history
        z, pred, roll = model(frames, actions, rollout_steps=H, from_first_frame=True)  # (B, L, D), ..., (2B, H, D)
        z = z.float()
        roll, roll1 = roll.float().chunk(2)  # (B, H, D): from the history; from the first frame alone
        target, target1 = z[:, history:], z[:, 1:1 + H]
        se = se + ((roll - target) ** 2).mean(-1).sum(0)  # (H,)
        base = base + ((z[:, history - 1:history] - target) ** 2).mean(-1).sum(0)
        se1 = se1 + ((roll1 - target1) ** 2).mean(-1).sum(0)
        base1 = base1 + ((z[:, :1] - target1) ** 2).mean(-1).sum(0)
        tf = tf + ((pred.float() - z[:, 1:]) ** 2).mean((1, 2)).sum()
        n += len(z)
    model.train()
    mse, mse1 = (se / n).cpu(), (se1 / n).cpu()
    return {"prediction_loss": float(tf / n), "mse": mse.tolist(),
            "relative": (mse / (base / n).cpu().clamp_min(1e-12)).tolist(),
            "first_frame_mse": mse1.tolist(),
            "first_frame_relative": (mse1 / (base1 / n).cpu().clamp_min(1e-12)).tolist()}
