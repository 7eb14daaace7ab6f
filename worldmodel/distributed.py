"""Data parallelism under ``torchrun``: the process group, each rank's device, and a drift check.

The backend follows the device the run resolved to (NCCL for CUDA, gloo for CPU), not merely whether
CUDA exists: ``torchrun ... --device cpu`` on a GPU machine runs on gloo. Every collective uses a
tensor on the rank's own device (NCCL refuses CPU tensors).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from common.device import resolve_device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when the run is on CUDA, else the CPU."""
    chosen = resolve_device(device)
    if chosen.type != "cuda":
        return chosen
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def setup(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under torchrun."""
    world = world_size()
    if world == 1:
        return 0, 1, resolve_device(device)
    chosen = rank_device(device)
    if not dist.is_initialized():
        # rank 0 alone validates, probes and evaluates while the others wait in a collective: a generous timeout
        dist.init_process_group(backend_for(chosen), timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), world, chosen


def share(value):
    """Rank 0's ``value`` (any picklable object) on every rank; the value itself outside torchrun."""
    if world_size() > 1 and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def rank0_decides(decide):
    """``decide()`` run on rank 0 alone (``decide()`` itself outside torchrun), its value on every rank. An error
    it raises is raised on every rank, of the same kind with the same message: every rank stops and says why,
    none waits on rank 0 in a collective (it said a dropped connection, or was stopped as interrupted)."""
    if world_size() == 1 or not dist.is_initialized():
        return decide()
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = ("value", decide())
        except BaseException as exc:  # a stop too: the other ranks must not wait on rank 0
            share(("error", type(exc), str(exc)))
            raise
    kind, *what = share(outcome)
    if kind == "error":
        raise same_error(*what)
    return what[0]


def same_error(cls: type, message: str) -> Exception:
    """An error of kind ``cls`` saying ``message`` (another rank's), or a RuntimeError saying it where that kind
    is not made from a message alone (UnicodeDecodeError, say)."""
    try:
        return cls(message)
    except Exception:
        return RuntimeError(message)


def any_rank(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a bool tensor on this rank's device) is set on any rank; every rank gets the
    same answer, so all of them stop together. One host sync: call it at logging steps only."""
    if world_size() > 1 and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a float tensor on this rank's device) averaged over the ranks, the same on every rank; itself
    outside torchrun. Every rank must call it: at logging steps only (it waits for every rank's step)."""
    if world_size() > 1 and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
        values /= dist.get_world_size()
    return values


def rows_of_all_ranks(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (N, ...) of every rank stacked in rank order (R*N, ...), the same on every rank; itself outside
    torchrun. Every rank must call it with the same shape: at logging steps only."""
    if world_size() > 1 and dist.is_initialized():
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        rows = torch.cat(parts)
    return rows


def check_in_sync(model: torch.nn.Module, tolerance: float = 1e-5) -> float:
    """Largest difference between this rank's parameters and rank 0's; an error if they drifted."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])  # on the rank's device
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    worst = float(diff)
    if worst > tolerance:
        raise RuntimeError(f"data-parallel ranks drifted apart: max parameter difference {worst}")
    return worst


def finish(world: int) -> None:
    """After the last step on every rank: no rank tears gloo/nccl down while another still communicates."""
    if world > 1 and dist.is_initialized():
        dist.barrier()


def teardown(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
