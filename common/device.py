"""Devices: choosing one, waiting for it, and the precision the training step runs in."""

from __future__ import annotations

from contextlib import nullcontext

import torch


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
