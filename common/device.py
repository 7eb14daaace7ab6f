"""Devices: choosing one, waiting for it, and the precision the training step runs in."""

from __future__ import annotations

import functools
import logging
import os
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA on a machine without it is a clear error."""
    if isinstance(device, torch.device):
        chosen = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from exc
    if chosen.type not in ("cpu", "cuda"):  # meta, mps, ...: nothing here runs on them
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu or auto")
    return chosen


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (matmuls and convolutions; latents, residuals, losses and SIGReg stay
    float32, see the encoder and predictor); full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles), the units bf16 autocast needs to be
    fast on a CPU; None where this torch cannot tell."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


@functools.cache
def warn_bf16_without_units() -> None:
    """Say once per process that ``--bf16`` plans on a CPU without bf16 instructions, where it is several times
    slower than float32, not faster."""
    if cpu_has_bf16_units() is False:
        log.warning("--bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): planning runs several times "
                    "slower than in float32 here, not faster (README: Planning, bf16)")


THREADS_HELP = ("torch CPU threads (0: automatic, the cores this process may use, one per process under torchrun; "
                "on a machine other jobs share, 1 is often several times faster)")


def available_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory that can be had without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: ``threads``, or when 0 the cores this process may use shared among the
    processes torchrun started on this machine (one each on a small one), unless OMP_NUM_THREADS says
    otherwise. Returns the number set."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads == 0:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            threads = available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads
