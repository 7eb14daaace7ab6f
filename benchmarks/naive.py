"""References for what batching buys: CEM with the batching taken out, one level at a time.

Both are ``CEMPlanner`` itself (same config, same algorithm, same noise streams, so the same plans), with
only the batching removed; a CEM option added to the planner is honoured here without a change:

- ``ProblemLoopCEMPlanner``: one problem at a time, its candidates scored in one batched rollout
  (the fair reference: what a planner that batches candidates but not problems does).
- ``NaiveCEMPlanner``: one problem at a time and one candidate per rollout call, each cost read on the
  host (how a straightforward loop would plan). Do not use either to plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from planners.base import Context, PlanResult
from planners.cem import CEMPlanner


class ProblemLoopCEMPlanner(CEMPlanner):
    """Plans the B problems of a call one after another (batch 1 each)."""

    def optimize(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor, keys: Tensor,
                 streams: Tensor) -> PlanResult:
        plans = [super(ProblemLoopCEMPlanner, self).optimize(
            z_hist[b:b + 1], None if a_hist is None else a_hist[b:b + 1], z_goal[b:b + 1], mean[b:b + 1],
            keys[b:b + 1], streams) for b in range(len(z_hist))]
        return PlanResult(torch.cat([p.actions for p in plans]), torch.cat([p.cost for p in plans]))


class NaiveCEMPlanner(ProblemLoopCEMPlanner):
    """Also scores each candidate with its own rollout call and reads its cost on the host."""

    def score(self, ctx: Context, cand: Tensor) -> Tensor:
        z_hist = ctx.z_hist[:1]  # (1, h, D): the problem's history (one problem at a time)
        a_hist = None if ctx.a_hist is None else ctx.a_hist[:1]
        costs = [self.cost_fn(self.model.rollout(z_hist, a_hist, cand[:, k])[:, None], ctx.z_goal).item()
                 for k in range(cand.shape[1])]
        return torch.tensor(costs, dtype=cand.dtype, device=cand.device)[None]  # (1, N)
