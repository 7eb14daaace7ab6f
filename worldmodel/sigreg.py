"""SIGReg: push embeddings towards an isotropic Gaussian by testing random 1-D projections.

Each projection is compared with N(0, 1) by the Epps-Pulley statistic, which only needs the empirical
characteristic function (ECF): the mean of cos(t x) and sin(t x) over the samples at a few knots t.
Those means are plain averages, so under data parallelism they are summed across ranks and the
statistic is exactly the one of the global batch (the LeJEPA recipe).

Scale: the statistic is N times the integral of |ECF(t) - phi(t)|^2 phi(t) over the whole real line,
t in [-t_max, t_max], folded onto [0, t_max] because the integrand is even. This is the scale of the
LeJEPA reference implementation (its trapezoid weights are 2 dt inside, dt at the ends), so a SIGReg
weight from the LeJEPA or LeWorldModel papers (LeWM uses 0.09) means the same here.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor


# The 1-D distributions SIGReg can pull each projection towards, all of zero mean and unit variance, by
# their (real, since symmetric) characteristic functions. The LeJEPA theory singles out the Gaussian: only
# an isotropic Gaussian embedding keeps the state linearly identifiable; the others exist to test that claim.
TARGETS = {
    "gaussian": lambda t: torch.exp(-0.5 * t * t),
    "uniform": lambda t: torch.where(t > 0, torch.sin(math.sqrt(3) * t) / (math.sqrt(3) * t.clamp_min(1e-12)), 1.0),
    "laplace": lambda t: 1 / (1 + 0.5 * t * t),
}


@lru_cache(maxsize=16)
def _knots(knots: int, t_max: float, device: torch.device, target: str = "gaussian") -> tuple[Tensor, Tensor, Tensor]:
    """Knots t (K,) on [0, t_max], trapezoid weights (K,) of the symmetric integral over [-t_max, t_max]
    (each t > 0 stands for +t and -t) times the N(0, 1) weight exp(-t^2/2), and the target's characteristic
    function (K,). Built once per device (constants, never written to), not at every training step."""
    if target not in TARGETS:
        raise ValueError(f"SIGReg target must be one of {sorted(TARGETS)}, got {target!r}")
    t = torch.linspace(0.0, t_max, knots, device=device, dtype=torch.float32)
    w = torch.full_like(t, 2 * t_max / (knots - 1))
    w[0] = w[-1] = t_max / (knots - 1)
    return t, w * torch.exp(-0.5 * t * t), TARGETS[target](t)


def _ecf_sums(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over samples of cos(t x) and sin(t x): x (..., N), t (K,) -> two (..., K)."""
    tx = x.unsqueeze(-1) * t  # (..., N, K)
    return tx.cos().sum(-2), tx.sin().sum(-2)


def _statistic(cos_mean: Tensor, sin_mean: Tensor, n: Tensor | int, w: Tensor, phi: Tensor) -> Tensor:
    """N * weighted trapezoid integral of |ECF - phi|^2, from the ECF real/imag parts (..., K) -> (...)."""
    err = (cos_mean - phi) ** 2 + sin_mean**2  # (..., K); phi is real, so sin_mean is the whole imag part
    return n * (err * w).sum(-1)


def epps_pulley(x: Tensor, knots: int = 17, t_max: float = 3.0, target: str = "gaussian") -> Tensor:
    """Epps-Pulley statistic of each row of 1-D samples against ``target`` (N(0, 1) by default):
    x (..., N) -> (...).

    About 1 in expectation for rows drawn from the target whatever N (the N factor cancels the 1/N noise
    of the ECF), and grows like N for rows that are not. Always computed in float32.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        t, w, phi = _knots(knots, t_max, x.device, target)
        n = x.shape[-1]
        cos_sum, sin_sum = _ecf_sums(x, t)
        return _statistic(cos_sum / n, sin_sum / n, n, w, phi)


def random_directions(dim: int, num: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``num`` uniformly random unit vectors in R^dim as columns: (dim, num).

    Drawn on the generator's own device (a CPU generator works for CUDA embeddings) and then moved.
    """
    draw_device = generator.device if generator is not None else device
    u = torch.randn(dim, num, generator=generator, device=draw_device, dtype=torch.float32)
    return (u / u.norm(dim=0, keepdim=True)).to(device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over data-parallel ranks, differentiable: the backward pass sums the incoming gradients
    over ranks too (the gradient of a sum of every rank's input is every rank's gradient, summed)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over ranks (identity outside torch.distributed), with gradients summed back."""
    return _AllReduceSum.apply(x) if _distributed() else x


def _global_sums(cos_sum: Tensor, sin_sum: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor | int]:
    """Sum the ECF sums and the sample count over data-parallel ranks (identity outside DDP).

    Each rank's samples then get world_size times their share of the gradient of the (identical)
    global loss; DDP's gradient averaging divides that back, so parameter gradients equal the
    single-process ones. The count is built on the device (no host-to-device copy in the step).
    """
    if not _distributed():
        return cos_sum, sin_sum, n
    shape = cos_sum.shape
    count = torch.full((1,), float(n), device=cos_sum.device)
    packed = torch.cat([cos_sum.flatten(), sin_sum.flatten(), count])  # one collective for everything
    cos_sum, sin_sum, count = all_reduce_sum(packed).split([cos_sum.numel(), sin_sum.numel(), 1])
    return cos_sum.view(shape), sin_sum.view(shape), count.detach()


def sigreg_loss(
    z: Tensor,
    num_directions: int = 256,
    generator: torch.Generator | None = None,
    knots: int = 17,
    t_max: float = 3.0,
    target: str = "gaussian",
) -> Tensor:
    """SIGReg of embeddings z (N, D) -> scalar: the mean Epps-Pulley statistic over random unit
    projections. With leading dims, z (G, N, D) tests each of the G groups of N samples on its own
    (the same directions for all) and averages: LeWorldModel's SIGReg per time step is
    ``sigreg_loss(rearrange(z, "b t d -> t b d"))``.

    Directions are redrawn on every call (from ``generator`` if given). Under torch.distributed the
    statistic is the one of the global batch (ECF means summed over ranks, N = global batch size);
    the directions must then be identical on every rank, so pass a generator seeded the same way on
    every rank (a CPU generator is fine) and call this the same number of times on every rank.
    Always computed in float32, also under autocast.
    """
    if generator is None and _distributed():
        raise ValueError("under torch.distributed, pass a generator seeded identically on every rank")
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        dirs = random_directions(z.shape[-1], num_directions, z.device, generator)  # (D, M)
        proj = rearrange(z @ dirs, "... n m -> ... m n")  # (..., M, N)
        t, w, phi = _knots(knots, t_max, z.device, target)
        cos_sum, sin_sum = _ecf_sums(proj, t)  # (..., M, K) each
        cos_sum, sin_sum, n = _global_sums(cos_sum, sin_sum, z.shape[-2])
        return _statistic(cos_sum / n, sin_sum / n, n, w, phi).mean()
