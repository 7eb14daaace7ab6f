"""Cross-entropy method: sample around a Gaussian, refit it to the best samples, repeat."""

from __future__ import annotations

import torch
from torch import Tensor

from planners.base import Context, Planner, PlanResult, keep_best, take


class CEMPlanner(Planner):
    """Batched CEM over B problems x N candidates (its settings: ``PlannerConfig`` and its ``cem``).

    Every iteration scores exactly N candidates per problem: the carried ones (the initial, e.g.
    warm-start, mean at the first iteration; then the top elites when ``cem.keep_elites``, else the
    current mean), the rest sequence (``rest``), and fresh samples. Returns the better of the best
    candidate seen and the final mean (``Planner.finish``), or the final mean (``cem.plan_from="mean"``).
    """

    kind = "cem"

    def __init__(self, model, cfg=None, action_dim=None):
        super().__init__(model, cfg, action_dim)
        own, n = self.cfg.cem, self.cfg.samples
        self.n_elites, self.n_kept, self.n_carry = own.n_elites(n), own.n_kept(n), own.n_carry(n)

    def initial_state(self, mean: Tensor) -> tuple[Tensor, ...]:
        std = torch.full_like(mean, self.cfg.cem.init_std)  # (B, H, A)
        carry = mean[:, None].expand(-1, self.n_carry, -1, -1).contiguous()  # (B, C, H, A)
        best_c = mean.new_full(mean.shape[:1], float("inf"))  # (B,)
        return mean, std, carry, mean, best_c

    def iteration(self, ctx: Context, stream: Tensor, mean: Tensor, std: Tensor, carry: Tensor, best_a: Tensor,
                  best_c: Tensor) -> tuple[Tensor, ...]:
        own, m = self.cfg.cem, self.cfg.cem.momentum
        fixed = self.fixed_candidates(mean)  # (B, F, H, A)
        n_fresh = self.cfg.samples - carry.shape[1] - fixed.shape[1]
        fresh = self.sample(ctx, stream, mean, std, n_fresh)  # (B, N-C-F, H, A)
        cand = torch.cat([carry, fixed, fresh], dim=1)  # (B, N, H, A)
        cost = self.score(ctx, cand)  # (B, N)
        best_a, best_c = keep_best(best_a, best_c, cand, cost)
        top = cost.topk(self.n_elites, dim=1, largest=False).indices  # (B, K), best first
        elites = take(cand, top)  # (B, K, H, A)
        mean = m * mean + (1 - m) * elites.mean(1)
        std = (m * std + (1 - m) * elites.std(1)).clamp_min(own.min_std)
        carry = elites[:, :self.n_kept] if self.n_kept else mean[:, None]
        return mean, std, carry, best_a, best_c

    def result(self, state):
        mean, _, _, best_a, best_c = state
        return mean, best_a, best_c

    def finish(self, z_hist, a_hist, z_goal, mean, best_a, best_c) -> PlanResult:
        if self.cfg.cem.plan_from == "mean":
            cost = self.plan_cost(self.model.rollout(z_hist, a_hist, mean)[:, None], z_goal, mean[:, None])[:, 0]
            return PlanResult(mean, cost)
        return super().finish(z_hist, a_hist, z_goal, mean, best_a, best_c)
