"""Cross-entropy method: sample around a Gaussian, refit it to the best samples, repeat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from planners.base import Context, Planner, PlannerConfig, PlanResult, keep_best, take
from worldmodel.config import option


@dataclass
class CEMOptions:
    """What only CEM has (the rest is ``PlannerConfig``)."""

    elites: int | None = option(None, "best candidates the Gaussian is refit to (default: a tenth of the samples, "
                                      "at least 2)")
    init_std: float = option(1.0, "initial std of the Gaussian (actions lie in [-1, 1])")
    min_std: float = option(0.05, "floor of the std, so the search never freezes")
    momentum: float = option(0.1, "weight of the old mean/std in each refit (0: jump to the elites' fit)")
    keep_elites: bool = option(True, "carry the top elites into the next iteration's candidates (else the "
                                     "current mean is candidate 0, as in LeWM)")
    keep_fraction: float = option(0.3, "share of elites carried (at least 1); carrying all slows convergence")
    plan_from: str = option("best", "the plan returned: the better of the best candidate seen and the final "
                                    "mean (best), or the final mean (mean, as LeWM)", choices=("best", "mean"))


@dataclass
class CEMConfig(PlannerConfig, CEMOptions):
    """CEM settings (defaults: 100 samples x 10 iterations, horizon 5, the top 10 refit; LeWM: 300 x 30, top 30)."""

    def __post_init__(self):
        PlannerConfig.__post_init__(self)
        if self.samples < self.n_carry + int(self.rest) + 1:
            raise ValueError(f"samples ({self.samples}) must leave room for a fresh sample beside the carried ones")
        if not 2 <= self.n_elites <= self.samples:
            raise ValueError(f"need 2 <= elites <= samples, got elites={self.n_elites}, samples={self.samples}")
        if self.plan_from not in ("best", "mean"):
            raise ValueError(f"plan_from must be best or mean, got {self.plan_from!r}")
        if self.init_std <= 0 or self.min_std < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need init_std > 0, min_std >= 0 and 0 <= momentum < 1, got {self}")

    @property
    def n_elites(self) -> int:
        """``elites``, or a tenth of the samples (at least 2): 30 of the default 300."""
        return self.elites if self.elites is not None else max(2, round(self.samples / 10))

    @property
    def n_kept(self) -> int:
        """How many elites are carried into the next iteration (fewer than ``samples``)."""
        if not self.keep_elites:
            return 0
        return min(max(1, round(self.keep_fraction * self.n_elites)), self.samples - 1)

    @property
    def n_carry(self) -> int:
        """Candidates carried into each iteration: the kept elites, or the current mean alone. The first
        iteration carries the initial (warm-start) mean in every slot, so every iteration has one shape."""
        return max(1, self.n_kept)


class CEMPlanner(Planner):
    """Batched CEM over B problems x N candidates.

    Every iteration scores exactly N candidates per problem: the carried ones (the initial, e.g.
    warm-start, mean at the first iteration; then the top elites when ``keep_elites``, else the
    current mean), the rest sequence (``rest``), and fresh samples. Returns the better of the best candidate seen and the final mean
    (``Planner.finish``).
    """

    cfg: CEMConfig
    config_class = CEMConfig

    def initial_state(self, mean: Tensor) -> tuple[Tensor, ...]:
        std = torch.full_like(mean, self.cfg.init_std)  # (B, H, A)
        carry = mean[:, None].expand(-1, self.cfg.n_carry, -1, -1).contiguous()  # (B, C, H, A)
        best_c = mean.new_full(mean.shape[:1], float("inf"))  # (B,)
        return mean, std, carry, mean, best_c

    def iteration(self, ctx: Context, stream: Tensor, mean: Tensor, std: Tensor, carry: Tensor, best_a: Tensor,
                  best_c: Tensor) -> tuple[Tensor, ...]:
        cfg, m = self.cfg, self.cfg.momentum
        fixed = self.fixed_candidates(mean)  # (B, F, H, A)
        fresh = self.sample(ctx, stream, mean, std, cfg.samples - carry.shape[1] - fixed.shape[1])  # (B, N-C-F, H, A)
        cand = torch.cat([carry, fixed, fresh], dim=1)  # (B, N, H, A)
        cost = self.score(ctx, cand)  # (B, N)
        best_a, best_c = keep_best(best_a, best_c, cand, cost)
        top = cost.topk(cfg.n_elites, dim=1, largest=False).indices  # (B, K), best first
        elites = take(cand, top)  # (B, K, H, A)
        mean = m * mean + (1 - m) * elites.mean(1)
        std = (m * std + (1 - m) * elites.std(1)).clamp_min(cfg.min_std)
        carry = elites[:, :cfg.n_kept] if cfg.n_kept else mean[:, None]
        return mean, std, carry, best_a, best_c

    def result(self, state):
        mean, _, _, best_a, best_c = state
        return mean, best_a, best_c

    def finish(self, z_hist, a_hist, z_goal, mean, best_a, best_c) -> PlanResult:
        if self.cfg.plan_from == "mean":
            cost = self.cost_fn(self.model.rollout(z_hist, a_hist, mean)[:, None], z_goal)[:, 0]  # (B,)
            return PlanResult(mean, cost)
        return super().finish(z_hist, a_hist, z_goal, mean, best_a, best_c)
