"""A deliberately naive CEM: one problem, one candidate, one rollout at a time.

Same algorithm and ``CEMConfig`` as ``CEMPlanner``; it exists only as the baseline of the benchmark
that shows what batching buys. Do not use it to plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from planners.base import Planner, PlanResult
from planners.cem import CEMConfig


class NaiveCEMPlanner(Planner):
    """Python loops over problems, iterations and candidates; one ``rollout`` call per candidate."""

    cfg: CEMConfig
    config_class = CEMConfig

    def optimize(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor, keys: Tensor,
                 streams: Tensor) -> PlanResult:
        self._gen = torch.Generator(mean.device).manual_seed(self._seed)
        plans = [self.solve_one(z_hist[b], None if a_hist is None else a_hist[b], z_goal[b], mean[b])
                 for b in range(len(z_hist))]
        return PlanResult(torch.stack([a for a, _ in plans]), torch.tensor([c for _, c in plans]).to(mean))

    def cost_of(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, actions: Tensor) -> float:
        """Cost of one sequence ``(H, A)`` for one problem."""
        a_hist = None if a_hist is None else a_hist[None]  # (1, h-1, A)
        z = self.model.rollout(z_hist[None], a_hist, actions[None])  # (1, H, D)
        return self.cost_fn(z[None], z_goal[None]).item()

    def solve_one(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor):
        """CEM for one problem: ``z_hist (h, D)``, ``mean (H, A)`` -> (best actions (H, A), its cost)."""
        cfg, m = self.cfg, self.cfg.momentum
        std = torch.full_like(mean, cfg.init_std)  # (H, A)
        best_a, best_c = mean, float("inf")
        carry = [mean] * cfg.n_carry
        for _ in range(cfg.iterations):
            cands = list(carry) + [torch.zeros_like(mean)] * int(cfg.rest)
            while len(cands) < cfg.samples:
                eps = torch.randn(mean.shape, generator=self._gen, device=mean.device, dtype=mean.dtype)
                cands.append((mean + std * eps).clamp(-1, 1))
            costs = [self.cost_of(z_hist, a_hist, z_goal, a) for a in cands]
            order = sorted(range(len(cands)), key=lambda i: costs[i])[: cfg.n_elites]
            if costs[order[0]] < best_c:
                best_a, best_c = cands[order[0]], costs[order[0]]
            elites = torch.stack([cands[i] for i in order])  # (K, H, A)
            mean = m * mean + (1 - m) * elites.mean(0)
            std = (m * std + (1 - m) * elites.std(0)).clamp_min(cfg.min_std)
            carry = list(elites[: cfg.n_kept]) if cfg.n_kept else [mean]
        mean_c = self.cost_of(z_hist, a_hist, z_goal, mean)
        return (mean, mean_c) if mean_c < best_c else (best_a, best_c)
