"""Planning costs: how far predicted latents are from the goal latent.

A cost is any callable ``(z_pred (B, N, H, D), z_goal (B, D)) -> (B, N)``: B problems, N candidate
action sequences each, H predicted steps. Planners look costs up by name, or take the callable itself.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

CostFn = Callable[[Tensor, Tensor], Tensor]


def final_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared L2 distance of the last predicted latent to the goal: only arriving counts."""
    return (z_pred[:, :, -1] - z_goal[:, None]).square().sum(-1)  # (B, N)


def sum_cost(z_pred: Tensor, z_goal: Tensor) -> Tensor:
    """Squared L2 distance summed over all H steps: rewards getting close early, too."""
    return (z_pred - z_goal[:, None, None]).square().sum((-1, -2))  # (B, N)


COSTS: dict[str, CostFn] = {"final": final_cost, "sum": sum_cost}


def get_cost(cost: str | CostFn) -> CostFn:
    """A cost by name (see ``COSTS``), or the given callable unchanged, so users can plug in their own."""
    if callable(cost):
        return cost
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose one of {sorted(COSTS)} or pass a callable")
    return COSTS[cost]
