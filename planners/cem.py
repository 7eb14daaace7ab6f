"""Cross-entropy method: sample around a Gaussian, refit it to the best samples, repeat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from planners.base import Planner, PlannerConfig, PlanResult, keep_best, option, take


@dataclass
class CEMConfig(PlannerConfig):
    """CEM settings (defaults: the LeWM setting, 300 samples x 30 iterations, horizon 5)."""

    elites: int | None = option(None, "best candidates the Gaussian is refit to (None: a tenth of samples, at least 2)")
    init_std: float = option(1.0, "initial std of the Gaussian (actions lie in [-1, 1])")
    min_std: float = option(0.05, "floor of the std, so the search never freezes")
    momentum: float = option(0.1, "weight of the old mean/std in each refit (0: jump to the elites' fit)")
    keep_elites: bool = option(True, "carry the top elites into the next iteration's candidates")
    keep_fraction: float = option(0.3, "share of elites carried (at least 1); carrying all slows convergence")

    def __post_init__(self):
        super().__post_init__()
        if self.elites is None:
            self.elites = max(2, round(self.samples / 10))  # 30 of the default 300
        if not 2 <= self.elites <= self.samples:
            raise ValueError(f"need 2 <= elites <= samples, got elites={self.elites}, samples={self.samples}")

    @property
    def n_kept(self) -> int:
        """How many elites are carried into the next iteration (fewer than ``samples``)."""
        if not self.keep_elites:
            return 0
        return min(max(1, round(self.keep_fraction * self.elites)), self.samples - 1)


class CEMPlanner(Planner):
    """Batched CEM over B problems x N candidates.

    Every iteration scores exactly N candidates per problem: the carried ones (the initial, e.g.
    warm-start, mean at the first iteration; then the top elites when ``keep_elites``) plus fresh
    samples. Returns the better of the best candidate seen and the final mean (``Planner.finish``).
    """

    cfg: CEMConfig
    config_class = CEMConfig

    def optimize(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor) -> PlanResult:
        cfg, m = self.cfg, self.cfg.momentum
        ctx = self.context(z_hist, a_hist, z_goal)
        std = torch.full_like(mean, cfg.init_std)  # (B, H, A)
        best_a, best_c = mean, z_goal.new_full(z_goal.shape[:1], float("inf"))  # (B, H, A), (B,)
        carry = mean[:, None]  # (B, 1, H, A)
        for _ in range(cfg.iterations):
            fresh = self.sample(mean, std, cfg.samples - carry.shape[1])  # (B, N - kept, H, A)
            cand = torch.cat([carry, fresh], dim=1)  # (B, N, H, A)
            cost = self.score(ctx, cand)  # (B, N)
            best_a, best_c = keep_best(best_a, best_c, cand, cost)
            top = cost.topk(cfg.elites, dim=1, largest=False).indices  # (B, K), best first
            elites = take(cand, top)  # (B, K, H, A)
            mean = m * mean + (1 - m) * elites.mean(1)
            std = (m * std + (1 - m) * elites.std(1)).clamp_min(cfg.min_std)
            carry = elites[:, : cfg.n_kept]
        return self.finish(z_hist, a_hist, z_goal, mean, best_a, best_c)
