"""What every planner shares: the dynamics contract, batched scoring, seeding, warm starts.

The model is anything with
``rollout(z_hist (M, h, D), a_hist (M, h-1, A) | None, actions (M, H, A)) -> (M, H, D)``.
A planner solves B independent problems at once, each with N candidate action sequences, and scores
all B*N candidates with ONE ``rollout`` call per iteration: no Python loop over problems or candidates.

Randomness: the noise of one iteration is a single ``(N, H, A)`` draw from the planner's generator,
shared by all B problems (common random numbers). So a problem gets exactly the same noise whether it
is planned alone or inside a batch, and the plan does not depend on which other problems share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

from planners.costs import CostFn, get_cost


def option(default: Any, help: str) -> Any:
    """A config field with its default and the help string the command line shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class PlannerConfig:
    """Settings every planner has."""

    horizon: int = option(5, "planned action chunks H")
    samples: int = option(300, "candidate sequences N scored per iteration and problem")
    iterations: int = option(30, "refinement iterations (one batched rollout each)")
    cost: Any = option("final", "'final', 'sum', or a callable (z_pred (B,N,H,D), z_goal (B,D)) -> (B,N)")
    seed: int = option(0, "seed of the planner's generator; same seed, same plan")

    def __post_init__(self):
        if min(self.horizon, self.samples, self.iterations) < 1:
            raise ValueError(f"horizon, samples and iterations must be >= 1, got {self}")


@dataclass
class PlanResult:
    """The best action sequence found for each problem and its predicted cost."""

    actions: Tensor  # (B, H, A) in [-1, 1]
    cost: Tensor  # (B,)


class Context(NamedTuple):
    """One planning call's inputs, the history already repeated once per candidate."""

    z_hist: Tensor  # (B*N, h, D)
    a_hist: Tensor | None  # (B*N, h-1, A)
    z_goal: Tensor  # (B, D)


def shift_plan(actions: Tensor, n_executed: int, fill: str = "zero") -> Tensor:
    """Warm start: drop the ``n_executed`` chunks already executed and pad the tail.

    The tail lies beyond the old horizon, so the old plan knows nothing about it; ``"zero"`` (default)
    pads with the same uninformed mean a cold start uses, ``"last"`` repeats the last planned chunk.
    Zero also suits a goal pose held at rest: repeating a last (often braking) chunk overshoots it.
    """
    if fill not in ("zero", "last"):
        raise ValueError(f"fill must be 'zero' or 'last', got {fill!r}")
    H = actions.shape[-2]
    n = min(max(int(n_executed), 0), H)
    pad = actions[..., -1:, :] if fill == "last" else torch.zeros_like(actions[..., -1:, :])  # (..., 1, A)
    return torch.cat([actions[..., n:, :], pad.expand(*actions.shape[:-2], n, actions.shape[-1])], dim=-2)


def take(cand: Tensor, idx: Tensor) -> Tensor:
    """Pick candidates per problem: ``cand (B, N, H, A)``, ``idx (B, K)`` -> ``(B, K, H, A)``."""
    return cand.gather(1, idx[:, :, None, None].expand(-1, -1, *cand.shape[2:]))


def keep_best(best_a: Tensor, best_c: Tensor, cand: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """Running best over iterations, branch-free (no host sync): best (B, H, A), (B,); cand (B, N, H, A)."""
    c, i = cost.min(dim=1)  # (B,), (B,)
    better = c < best_c  # (B,)
    a = take(cand, i[:, None])[:, 0]  # (B, H, A)
    return torch.where(better[:, None, None], a, best_a), torch.where(better, c, best_c)


class Planner:
    """Base class: validates inputs, owns the generator, scores candidates; subclasses ``optimize``.

    ``action_dim`` (the chunk size A) is read from ``model.action_dim`` unless given.
    """

    config_class = PlannerConfig

    def __init__(self, model: Any, cfg: PlannerConfig | None = None, action_dim: int | None = None):
        self.model, self.cfg = model, cfg if cfg is not None else self.config_class()
        self.action_dim = action_dim if action_dim is not None else getattr(model, "action_dim", None)
        if self.action_dim is None:
            raise ValueError("pass action_dim or give the model an `action_dim` attribute")
        self.cost_fn: CostFn = get_cost(self.cfg.cost)
        self._seed, self._gen = self.cfg.seed, None

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed`` if given, else from the current seed)."""
        self._seed = self._seed if seed is None else int(seed)
        self._gen = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The planner's generator on ``device``, created (and seeded) on first use there.

        The stream continues across ``plan`` calls (an MPC loop gets fresh noise each replan); moving
        to another device, or ``reset``, restarts it from the seed.
        """
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self._seed)
        return self._gen

    @torch.no_grad()
    def plan(
        self, z_hist: Tensor, z_goal: Tensor, a_hist: Tensor | None = None, init: Tensor | None = None
    ) -> PlanResult:
        """Plan B problems: ``z_hist (B, h, D)``, ``z_goal (B, D)``, ``a_hist (B, h-1, A)`` (None when
        h == 1), ``init (B, H, A)`` a warm start (e.g. ``shift_plan`` of the previous plan) or None (zeros).
        """
        B, h, D = z_hist.shape
        H, A = self.cfg.horizon, self.action_dim
        if z_goal.shape != (B, D):
            raise ValueError(f"z_goal must be {(B, D)}, got {tuple(z_goal.shape)}")
        if (a_hist is None) != (h == 1) or (a_hist is not None and a_hist.shape != (B, h - 1, A)):
            want, got = "None" if h == 1 else (B, h - 1, A), None if a_hist is None else tuple(a_hist.shape)
            raise ValueError(f"a_hist must be {want} for a history of {h}, got {got}")
        if init is not None and init.shape != (B, H, A):
            raise ValueError(f"init must be {(B, H, A)}, got {tuple(init.shape)}")
        mean = z_hist.new_zeros(B, H, A) if init is None else init.to(z_hist).clamp(-1, 1)  # (B, H, A)
        self.generator(z_hist.device)
        return self.optimize(z_hist, a_hist, z_goal, mean)

    def optimize(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor) -> PlanResult:
        """The search itself, from the initial mean ``(B, H, A)``."""
        raise NotImplementedError

    def finish(
        self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor,
        mean: Tensor, best_a: Tensor, best_c: Tensor,
    ) -> PlanResult:
        """Score the final mean too (one rollout of B rows) and return the better of it and the best
        candidate seen. The mean averages noise away (it wins on smooth costs); the best candidate
        guards against a mean that falls between two good modes. Both costs are exact.
        """
        cost = self.cost_fn(self.model.rollout(z_hist, a_hist, mean)[:, None], z_goal)  # (B, 1)
        return PlanResult(*keep_best(best_a, best_c, mean[:, None], cost))

    def context(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor) -> Context:
        """Repeat each problem's history once per candidate, once per ``plan`` call."""
        n = self.cfg.samples
        a = None if a_hist is None else repeat(a_hist, "b h a -> (b n) h a", n=n)  # (B*N, h-1, A)
        return Context(repeat(z_hist, "b h d -> (b n) h d", n=n), a, z_goal)  # (B*N, h, D)

    def score(self, ctx: Context, cand: Tensor) -> Tensor:
        """Costs of candidates ``(B, N, H, A)`` -> ``(B, N)`` with one batched ``rollout`` call."""
        z = self.model.rollout(ctx.z_hist, ctx.a_hist, rearrange(cand, "b n h a -> (b n) h a"))  # (B*N, H, D)
        return self.cost_fn(rearrange(z, "(b n) h d -> b n h d", b=cand.shape[0]), ctx.z_goal)  # (B, N)

    def sample(self, mean: Tensor, std: Tensor, n: int) -> Tensor:
        """``n`` Gaussian candidates around ``mean (B, H, A)`` with ``std (B, H, A)``, clamped to [-1, 1].

        One ``(n, H, A)`` noise draw serves all B problems (see the module docstring).
        """
        eps = torch.randn((n, *mean.shape[1:]), generator=self._gen, device=mean.device, dtype=mean.dtype)
        return (mean[:, None] + std[:, None] * eps).clamp(-1, 1)  # (B, n, H, A)
