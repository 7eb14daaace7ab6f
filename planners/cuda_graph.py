"""A whole plan as one CUDA graph: every iteration captured once, then replayed once per ``plan`` call.

CUDA graphs per iteration (``compile=True`` on CUDA) still pay a fixed overhead once per iteration: about
0.65 ms on an H200 whatever the number of candidates, more than the arithmetic of a 300-sample CEM
iteration for one problem. The search is pure tensor code with static shapes, no host sync and no
generator state (its noise is counted from the keys and streams it is given), so it can be captured
whole: each call copies its inputs into the graph's own tensors, replays, and copies the plan out.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor


def capture_cuda_graph(fn: Callable, device: torch.device):
    """Run ``fn`` twice on a side stream (compilation, library handles, allocations), then capture it;
    returns ``(replay, outputs)``: each ``replay()`` rewrites ``outputs`` in place. ``fn`` is not run by
    the capture itself: replay once before reading ``outputs``."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph captures a CUDA graph: the planner's tensors must be on CUDA, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


class CapturedSearch:
    """``search(*inputs) -> PlanResult`` captured once per input shape and replayed; inputs are tensors or
    None. ``capture(fn, device) -> (replay, outputs)`` is ``capture_cuda_graph`` unless another is given."""

    def __init__(self, search: Callable, capture: Callable | None = None):
        self.search, self.capture = search, capture or capture_cuda_graph
        self.graphs: dict = {}  # input shapes -> (static inputs, replay, outputs)

    def __call__(self, *inputs: Tensor | None):
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            static = tuple(None if t is None else t.clone() for t in inputs)
            device = next(t.device for t in inputs if t is not None)
            self.graphs[key] = (static, *self.capture(lambda: self.search(*static), device))
        static, replay, outputs = self.graphs[key]
        for dst, src in zip(static, inputs):
            if dst is not None:
                dst.copy_(src)
        replay()
        # The graph's outputs are overwritten by its next replay: the caller gets copies.
        return dataclasses.replace(outputs, **{f.name: getattr(outputs, f.name).clone()
                                               for f in dataclasses.fields(outputs)})
