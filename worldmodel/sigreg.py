"""SIGReg: push embeddings towards an isotropic Gaussian by testing random 1-D projections.

Each projection is compared with N(0, 1) by the Epps-Pulley statistic, which only needs the empirical
characteristic function (ECF): the mean of cos(t x) and sin(t x) over the samples at a few knots t.
Those means are plain averages, so under data parallelism they are summed across ranks and the
statistic is exactly the one of the global batch (the LeJEPA recipe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _knots(knots: int, t_max: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Knots t (K,), trapezoid weights (K,) and the N(0, 1) characteristic function exp(-t^2/2) (K,)."""
    t = torch.linspace(0.0, t_max, knots, device=device, dtype=torch.float32)
    w = torch.full_like(t, t_max / (knots - 1))
    w[0] = w[-1] = w[0] / 2
    return t, w, torch.exp(-0.5 * t * t)


def _ecf_sums(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over samples of cos(t x) and sin(t x): x (..., N), t (K,) -> two (..., K)."""
    tx = x.unsqueeze(-1) * t  # (..., N, K)
    return tx.cos().sum(-2), tx.sin().sum(-2)


def _statistic(cos_mean: Tensor, sin_mean: Tensor, n: Tensor | int, w: Tensor, phi: Tensor) -> Tensor:
    """N * trapezoid integral of |ECF - phi|^2 * phi, from the ECF real/imag parts (..., K) -> (...)."""
    err = (cos_mean - phi) ** 2 + sin_mean**2  # (..., K); phi is real, so sin_mean is the whole imag part
    return n * (err * phi * w).sum(-1)


def epps_pulley(x: Tensor, knots: int = 17, t_max: float = 3.0) -> Tensor:
    """Epps-Pulley statistic of each row of 1-D samples against N(0, 1): x (..., N) -> (...).

    About 0.5 in expectation for Gaussian rows whatever N (the N factor cancels the 1/N noise of the
    ECF), and grows like N for rows that are not Gaussian. Always computed in float32.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        t, w, phi = _knots(knots, t_max, x.device)
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
    return dist.is_available() and dist.is_initialized()


def _global_sums(cos_sum: Tensor, sin_sum: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the ECF sums and the sample count over data-parallel ranks (identity outside DDP).

    The all-reduce is differentiable and its backward sums the incoming gradients over ranks, so each
    rank's samples get world_size times their share of the gradient of the (identical) global loss;
    DDP's gradient averaging divides that back, so parameter gradients equal the single-process ones.
    """
    count = torch.tensor([float(n)], device=cos_sum.device)
    if not _distributed():
        return cos_sum, sin_sum, count
    from torch.distributed.nn.functional import all_reduce  # deprecated in torch 2.13 but still the portable one

    shape = cos_sum.shape
    packed = torch.cat([cos_sum.flatten(), sin_sum.flatten(), count])  # one collective for everything
    packed = all_reduce(packed, op=dist.ReduceOp.SUM)
    cos_sum, sin_sum, count = packed.split([cos_sum.numel(), sin_sum.numel(), 1])
    return cos_sum.view(shape), sin_sum.view(shape), count.detach()


def sigreg_loss(
    z: Tensor,
    num_directions: int = 256,
    generator: torch.Generator | None = None,
    knots: int = 17,
    t_max: float = 3.0,
) -> Tensor:
    """SIGReg of embeddings z (N, D): mean Epps-Pulley statistic over random unit projections -> scalar.

    Directions are redrawn on every call (from ``generator`` if given). Under torch.distributed the
    statistic is the one of the global batch (ECF means summed over ranks, N = global batch size);
    the directions must then be identical on every rank, so pass a generator seeded the same way on
    every rank (a CPU generator is fine) and call this the same number of times on every rank.
    """
    if generator is None and _distributed() and dist.get_world_size() > 1:
        raise ValueError("under torch.distributed, pass a generator seeded identically on every rank")
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        dirs = random_directions(z.shape[1], num_directions, z.device, generator)  # (D, M)
        proj = (z @ dirs).T  # (M, N)
        t, w, phi = _knots(knots, t_max, z.device)
        cos_sum, sin_sum = _ecf_sums(proj, t)  # (M, K) each
        cos_sum, sin_sum, n = _global_sums(cos_sum, sin_sum, z.shape[0])
        return _statistic(cos_sum / n, sin_sum / n, n, w, phi).mean()
