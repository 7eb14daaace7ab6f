"""Gradient refinement of a plan: Adam steps on its actions, through the differentiable predictor.

A sampling search (CEM, MPPI) finds the right basin with few samples, but the fine corrections that
hold a reached goal take many samples to hit by chance. A few gradient steps on the best plan settle
them at the cost of a handful of one-row rollouts per problem. Pure tensor code: no host sync.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

BETAS = (0.9, 0.999)  # Adam's moment decay rates


def descend(cost_of: Callable[[Tensor], Tensor], actions: Tensor, cost: Tensor, steps: int,
            lr: float) -> tuple[Tensor, Tensor]:
    """``steps`` Adam steps (step size ``lr``) on ``actions (B, H, A)`` down ``cost_of`` (``(B, H, A) ->
    (B,)``, each problem's cost its own), clamped to [-1, 1] after each step. Returns the best actions
    seen per problem and their costs, ``cost (B,)`` being that of ``actions``: a plan never gets worse.
    Runs with gradients on whatever the caller's mode (``plan`` runs under ``no_grad``)."""
    b1, b2 = BETAS
    best_a, best_c = actions, cost
    with torch.inference_mode(False), torch.enable_grad():
        a = actions.detach().clone()
        m, v = torch.zeros_like(a), torch.zeros_like(a)  # Adam's first and second moments
        for t in range(1, steps + 1):
            a.requires_grad_(True)
            c = cost_of(a)  # (B,)
            (g,) = torch.autograd.grad(c.sum(), a)  # problems are independent: each gets its own gradient
            a, c = a.detach(), c.detach()
            best_a, best_c = keep_lower(best_a, best_c, a, c)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.square()
            a = (a - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)).clamp(-1, 1)
        if steps:
            with torch.no_grad():
                best_a, best_c = keep_lower(best_a, best_c, a, cost_of(a))  # the last step's result
    return best_a, best_c


def keep_lower(best_a: Tensor, best_c: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Per problem, ``a (B, H, A)`` where its cost ``c (B,)`` is lower than ``best_c``, else ``best_a``. A NaN
    cost replaces only the search's starting infinity (nothing finite seen yet: NaN latents, say), and then
    stays: a problem with bad inputs reports NaN, while a stray NaN never displaces a finite best."""
    lower = (c < best_c) | (c.isnan() & (best_c == float("inf")))  # (B,)
    return torch.where(lower[:, None, None], a, best_a), torch.where(lower, c, best_c)
