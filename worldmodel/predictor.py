"""Action-conditioned latent dynamics: from the last ``history`` latents and action chunks to the next latent.

Convention (the planners rely on it): latents z (B, T, D) and action chunks a (B, T, A), where a[:, t]
is the chunk applied after frame t. ``predictor(z, a)`` returns (B, T, D) whose position t predicts
z[:, t+1] from the window z[:, t-history+1 : t+1], a[:, t-history+1 : t+1] and nothing else.

Every output is computed from its own window, in training as in rollout, so the model sees exactly
the same kind of context in both. The latent stream (inputs, residual adds, outputs) stays float32
under bf16 autocast; only the network's matmuls run in bf16. Windows that would start before position 0 are left-padded by
repeating the first latent and with zero actions (as if the arm had been resting there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import pack, rearrange, repeat, unpack
from torch import Tensor

from common.config import check_at_least, check_at_most, option
from worldmodel.layers import Attention, feed_forward


@dataclass
class PredictorConfig:
    """The dynamics network; latent size, action chunk and history are the world model's."""

    kind: str = option("mlp", "mlp (fast) or transformer (causal, AdaLN-zero actions; a GPU option)",
                       choices=("mlp", "transformer"))
    hidden: int = option(256, "MLP hidden width / transformer token width (256 keeps CEM 300x30 fast on a CPU)")
    depth: int = option(3, "MLP hidden layers / transformer blocks")
    heads: int = option(4, "transformer: attention heads (hidden must be a multiple)")

    def __post_init__(self):
        check_at_least(self, 1, ("hidden", "depth", "heads"), "predictor.")
        check_at_most(self, 16384, ("hidden",), "predictor.")
        check_at_most(self, 128, ("depth", "heads"), "predictor.")
        if self.kind == "transformer" and self.hidden % self.heads:
            raise ValueError(f"--predictor.hidden ({self.hidden}) must be a multiple of --predictor.heads ({self.heads})")


def left_pad(z: Tensor, a: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Pad (B, L, D) latents and (B, L, A) actions on the left to ``length`` steps (no-op if L >= length)."""
    missing = length - z.shape[1]
    if missing <= 0:
        return z, a
    z = torch.cat([repeat(z[:, :1], "b 1 d -> b m d", m=missing), z], dim=1)
    a = torch.cat([a.new_zeros(a.shape[0], missing, a.shape[2]), a], dim=1)
    return z, a


class Predictor(nn.Module):
    """Base: builds the windows; subclasses map windows (N, h, D), (N, h, A) to next latents (N, D)."""

    def __init__(self, cfg: PredictorConfig, latent_dim: int, action_dim: int, history: int):
        super().__init__()
        self.cfg, self.latent_dim, self.action_dim, self.history = cfg, latent_dim, action_dim, history

    def predict_window(self, z: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, z: Tensor, a: Tensor) -> Tensor:
        """z (B, T, D), a (B, T, A) -> (B, T, D); position t predicts z[:, t+1]."""
        h = self.history
        z, a = left_pad(z, a, z.shape[1] + h - 1)  # (B, T + h - 1, .)
        zw = rearrange(z.unfold(1, h, 1), "b t d h -> b t h d")  # (B, T, h, D): window ending at each t
        aw = rearrange(a.unfold(1, h, 1), "b t a h -> b t h a")  # (B, T, h, A)
        zw, shape = pack([zw], "* h d")  # (B*T, h, D)
        aw, _ = pack([aw], "* h a")
        return unpack(self.predict_window(zw, aw), shape, "* d")[0]  # (B, T, D)

    def step(self, z: Tensor, a: Tensor) -> Tensor:
        """The next latent after the last position of a short context: z (B, L, D), a (B, L, A) -> (B, D)."""
        z, a = left_pad(z[:, -self.history :], a[:, -self.history :], self.history)
        return self.predict_window(z, a)

    def rollout(self, z_hist: Tensor, a_hist: Tensor | None, actions: Tensor) -> Tensor:
        """Predict H latents autoregressively, feeding predictions back.

        z_hist (B, h, D): the last h <= history encoded frames; a_hist (B, h-1, A): the chunks applied
        between them (None when h == 1); actions (B, H, A): the chunks to apply from the last frame on.
        Returns (B, H, D), where [:, k] is the latent after actions[:, k].
        """
        if a_hist is None:
            assert z_hist.shape[1] == 1, "a_hist may be None only with a single history frame"
            a_hist = actions[:, :0]
        assert a_hist.shape[1] == z_hist.shape[1] - 1, "need one action chunk between consecutive frames"
        z_ctx, a_ctx = z_hist, a_hist  # a_ctx always holds the chunks between the frames of z_ctx
        preds = []
        for k in range(actions.shape[1]):
            a_all = torch.cat([a_ctx, actions[:, k : k + 1]], dim=1)  # (B, L, A), aligned with z_ctx
            z_next = self.step(z_ctx, a_all)  # (B, D)
            preds.append(z_next)
            z_ctx = torch.cat([z_ctx, z_next[:, None]], dim=1)[:, -self.history :]
            a_ctx = a_all[:, a_all.shape[1] - (z_ctx.shape[1] - 1) :]
        return torch.stack(preds, dim=1)  # (B, H, D)


class MLPPredictor(Predictor):
    """MLP on the flattened window; predicts the change of the last latent (z_t + delta)."""

    def __init__(self, cfg: PredictorConfig, latent_dim: int, action_dim: int, history: int):
        super().__init__(cfg, latent_dim, action_dim, history)
        width = history * (latent_dim + action_dim)
        layers = []
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.GELU()]
            width = cfg.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, latent_dim))
        nn.init.zeros_(self.mlp[-1].weight)  # start as "nothing moves"
        nn.init.zeros_(self.mlp[-1].bias)

    def predict_window(self, z: Tensor, a: Tensor) -> Tensor:
        x = torch.cat([rearrange(z, "n h d -> n (h d)"), rearrange(a, "n h a -> n (h a)")], dim=-1)
        return z[:, -1].float() + self.mlp(x).float()  # (N, D): the residual add in float32, also under autocast


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """Causal transformer block whose norms are modulated, and residuals gated, by the action (DiT's AdaLN-zero)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = feed_forward(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)  # zero gates: every block starts as the identity
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (N, h, W)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), is_causal=True)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TransformerPredictor(Predictor):
    """Small causal transformer over the window's latent tokens, each conditioned on its action chunk.

    Attention is causal within the window (is_causal); the window itself bounds the context to
    ``history`` steps at any depth, which a banded mask over the whole sequence would not (each layer
    would reach ``history - 1`` steps further back). Positions are learned per window slot, so the same
    weights serve any sequence length in training and any horizon in rollout (no max length).
    Predicts z_t + delta from the last slot.
    """

    def __init__(self, cfg: PredictorConfig, latent_dim: int, action_dim: int, history: int):
        super().__init__(cfg, latent_dim, action_dim, history)
        w = cfg.hidden
        self.embed_z = nn.Linear(latent_dim, w)
        self.embed_a = nn.Sequential(nn.Linear(action_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.pos = nn.Parameter(torch.zeros(1, history, w))
        self.blocks = nn.ModuleList([AdaLNBlock(w, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(w, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, latent_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for layer in (self.ada_out[-1], self.out):  # start as "nothing moves"
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def predict_window(self, z: Tensor, a: Tensor) -> Tensor:
        x = self.embed_z(z) + self.pos  # (N, h, W)
        c = self.embed_a(a)  # (N, h, W)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada_out(c[:, -1]).chunk(2, dim=-1)  # (N, W) each
        delta = self.out(modulate(self.norm(x[:, -1]), shift, scale))  # (N, D)
        return z[:, -1].float() + delta.float()  # the residual add in float32, also under autocast


def build_predictor(cfg: PredictorConfig, latent_dim: int, action_dim: int, history: int) -> Predictor:
    predictors = {"mlp": MLPPredictor, "transformer": TransformerPredictor}
    if cfg.kind not in predictors:
        raise ValueError(f"unknown predictor kind {cfg.kind!r}; choose from {sorted(predictors)}")
    return predictors[cfg.kind](cfg, latent_dim, action_dim, history)
