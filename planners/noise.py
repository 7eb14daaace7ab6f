"""Counter-based Gaussian noise: each planning problem draws from its own stream, keyed by a number.

A problem's noise depends only on (its key, the stream, the element's index), never on the other
problems of the batch or on how many there are: a problem planned alone or inside a batch gets the
same noise, and episodes of one evaluation get independent noise. The draw is a pure function of
integer tensors (a 32-bit integer hash, then the inverse normal CDF), so it holds no generator state,
needs no host synchronisation and can be captured in a CUDA graph.

The hash is a Weyl sequence (index times 2^32 / golden ratio) pushed through two xor-shift-multiply
rounds (the structure of the "lowbias32" hash), in int32 arithmetic: products wrap modulo 2^32 (two's
complement, on every device torch supports) and right shifts are made logical by masking. int32 runs
about ten times faster than int64 on a CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _i32(c: int) -> int:
    """The int32 with the same 32 bits as the unsigned constant ``c``."""
    return c - (1 << 32) if c >= 1 << 31 else c


GOLDEN = _i32(0x9E3779B9)  # 2^32 / golden ratio
_M1, _M2 = _i32(0x7FEB352D), _i32(0x846CA68B)
_SALT = _i32(0x5BD1E995)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int32 bits."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash of int32 tensors: every output bit depends on every input bit."""
    x = x ^ _shr(x, 16)
    x = x * _M1
    x = x ^ _shr(x, 15)
    x = x * _M2
    return x ^ _shr(x, 16)


def problem_keys(seed: int, ids, device=None) -> Tensor:
    """Keys (B,) int32 of problems ``ids`` under ``seed``: the same (seed, id) always gives the same key."""
    keys = [_i32(int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])) for i in ids]
    return torch.tensor(keys, dtype=torch.int32, device=device)


def as_keys(keys, batch: int, device) -> Tensor:
    """Noise keys (B,) int32 on ``device`` from a tensor, an array or a list of integers. An array or list
    must hold integers that fit in int32 (a tensor is taken as it is: reading its values would wait for the
    device). A ``ValueError`` names what is wrong."""
    if not isinstance(keys, Tensor):
        host = np.asarray(keys)
        if host.size and (host.dtype.kind not in "iu" or host.min() < -2**31 or host.max() >= 2**31):
            raise ValueError(f"keys must be integers in [-2^31, 2^31) (int32 noise keys), got {host.tolist()[:5]}")
        keys = torch.as_tensor(host.astype(np.int32))
    if keys.shape != (batch,):
        raise ValueError(f"keys must be ({batch},), one per problem, got {tuple(keys.shape)}")
    return keys.to(device, torch.int32)


def stream_key(keys: Tensor, stream: Tensor | int) -> Tensor:
    """Per-problem base (B,) int32 of one stream (e.g. one iteration of one plan call)."""
    if isinstance(stream, Tensor):
        stream = stream.to(device=keys.device, dtype=torch.int32)
    else:
        stream = torch.tensor(_i32(int(stream) & 0xFFFFFFFF), dtype=torch.int32, device=keys.device)
    return mix32(keys.to(torch.int32) ^ mix32(mix32(stream) ^ _SALT))


def standard_normal(keys: Tensor, stream: Tensor | int, shape: tuple[int, ...], dtype=torch.float32) -> Tensor:
    """Standard normal noise (B, *shape): row b depends only on (keys[b], stream)."""
    n = math.prod(shape)
    base = stream_key(keys, stream)[:, None]  # (B, 1)
    index = torch.arange(n, device=keys.device, dtype=torch.int32)  # (n,)
    bits = mix32(base + index * GOLDEN)  # (B, n) uniform 32-bit patterns
    u = (_shr(bits, 9).to(dtype) + 0.5) * 2.0**-23  # (B, n) in (0, 1); 23.5 bits, exact in float32
    return (torch.erfinv(2 * u - 1) * math.sqrt(2)).reshape(len(keys), *shape)
