"""MPPI: move the mean to the exponentially cost-weighted average of perturbed sequences."""

from __future__ import annotations

import torch
from einops import einsum
from torch import Tensor

from planners.base import Context, Planner, keep_best


class MPPIPlanner(Planner):
    """Batched MPPI over B problems x N candidates (its settings: ``PlannerConfig`` and its ``mppi``).

    Candidate 0 is always the current mean (the nominal plan), then the rest sequence (``rest``), then
    perturbations of the mean.
    Returns the better of the best candidate seen and the final mean (``Planner.finish``).
    """

    kind = "mppi"

    def initial_state(self, mean: Tensor) -> tuple[Tensor, ...]:
        std = torch.full_like(mean, self.cfg.mppi.noise_std)  # (B, H, A)
        return mean, std, mean, mean.new_full(mean.shape[:1], float("inf"))

    def iteration(self, ctx: Context, stream: Tensor, mean: Tensor, std: Tensor, best_a: Tensor,
                  best_c: Tensor) -> tuple[Tensor, ...]:
        cfg, own, m = self.cfg, self.cfg.mppi, self.cfg.mppi.momentum
        fixed = self.fixed_candidates(mean)  # (B, F, H, A)
        fresh = self.sample(ctx, stream, mean, std, cfg.samples - 1 - fixed.shape[1])
        cand = torch.cat([mean[:, None], fixed, fresh], dim=1)  # (B, N, H, A)
        cost = self.score(ctx, cand)  # (B, N)
        best_a, best_c = keep_best(best_a, best_c, cand, cost)
        w = self.weights(cost)  # (B, N)
        new_mean = einsum(w, cand, "b n, b n h a -> b h a")
        if own.adapt_std:
            var = einsum(w, (cand - new_mean[:, None]).square(), "b n, b n h a -> b h a")
            std = (m * std + (1 - m) * var.sqrt()).clamp_min(own.min_std)
        mean = m * mean + (1 - m) * new_mean
        return mean, std, best_a, best_c

    def result(self, state):
        mean, _, best_a, best_c = state
        return mean, best_a, best_c

    def weights(self, cost: Tensor) -> Tensor:
        """``softmax(-(cost - min) / temperature)`` per problem: ``(B, N)`` -> ``(B, N)``.

        Subtracting the min keeps the largest weight at exp(0) = 1 before normalising (no underflow to
        all zeros). With ``normalize`` gaps are divided by the median gap (robust to outlier costs), so
        the same temperature works whatever the scale of the latent distances.
        """
        cost = cost.masked_fill(cost.isnan(), float("inf"))  # a candidate whose cost is NaN weighs nothing
        gap = cost - cost.min(dim=1, keepdim=True).values  # (B, N), >= 0
        if self.cfg.mppi.normalize:
            gap = gap / (gap.median(dim=1, keepdim=True).values + 1e-12)
        return torch.softmax(-gap / self.cfg.mppi.temperature, dim=1)
