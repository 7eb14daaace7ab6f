"""``wm bench train``: training throughput of each encoder and frame size with the demo preset's
predictor.

One step = encode a batch of windows, predict, SIGReg, backward, AdamW. The demo's encoder at 64 px (the
first row) is the baseline the others are compared with, measured in the same run: the encoders take turns
(``benchmarks.timing.round_robin``), each ratio the median (min-max) over rounds (steps/s and frames/s are
printed on a GPU only). On a CPU one more row times the first encoder under bf16 autocast, which training
leaves off there (CUDA training runs it by itself): whether the CPU's bf16 units would pay.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import torch

from benchmarks.timing import absolute_shown, markdown_table, paired_ratio, round_robin
from common.device import autocast_for, resolve_device, synchronize
from common.text import counted
from worldmodel.model import WorldModel
from worldmodel.objective import step_generator, world_model_losses
from worldmodel.train import preset_config

ENCODERS = {"conv, 16 channels (the demo's)": {}, "conv, 8 channels": {"encoder.conv_channels": 8},
            "conv, 32 channels": {"encoder.conv_channels": 32},
            "conv, 16 channels, 32 px frames, 3 stages": {"image_size": 32, "encoder.conv_stages": 3},
            "conv, 16 channels, 96 px frames": {"image_size": 96},
            "conv, 16 channels, 128 px frames": {"image_size": 128},
            "vit (width 192, depth 6, patch 8)": {"encoder.kind": "vit"}}


def steps_per_s(cfg, device: torch.device, batch_size: int, steps: int) -> float:
    """Training steps per second of ``cfg``'s model on random windows: one run of ``steps`` after a warm-up."""
    return step_timer(cfg, device, batch_size, steps)()


def step_timer(cfg, device: torch.device, batch_size: int, steps: int, bf16: bool = False):
    """A function returning the steps/s of ``steps`` training steps of ``cfg``'s model per call (the model
    built and warmed up once, here): in training's precision, or under bf16 autocast on any device."""
    size = cfg.model.image_size or 64  # the frames' size (64 px unless the encoder's row says otherwise)
    model = WorldModel(dataclasses.replace(cfg.model, image_size=size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    frames_per_window = cfg.model.history + cfg.n_pred
    frames = torch.randint(0, 256, (batch_size, frames_per_window, size, size, 3), dtype=torch.uint8, generator=g)
    actions = torch.rand(batch_size, frames_per_window - 1, cfg.model.action_dim, generator=g) * 2 - 1
    batch = {"pixels": frames.to(device), "actions": actions.to(device)}
    def step(k: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else autocast_for(device):
            loss = world_model_losses(model, batch, cfg, step_generator(0, k, 0, device))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm up
    index = itertools.count(1)  # each step its own noise draw, as in training

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(next(index))
        synchronize(device)
        return steps / (time.perf_counter() - start)
    return run


def run(device: str = "auto", steps: int = 10, encoders: dict | None = None, repeats: int = 3) -> str:
    """The table of the module docstring: ``repeats`` rounds of ``steps`` steps of every encoder."""
    dev = resolve_device(device)
    base = preset_config("demo")
    batch_size = base.batch_size
    frames_per_step = batch_size * (base.model.history + base.n_pred)
    lines = [f"Device {dev}, torch threads {torch.get_num_threads()}; the demo preset: batch {batch_size} windows of "
             f"{base.model.history + base.n_pred} frames (64x64 unless a row says otherwise), "
             f"{base.rollout_steps}-step rollout loss; {counted(repeats, 'round')} of {counted(steps, 'step')} of "
             f"every encoder.", ""]
    rows = [(label, overrides, False) for label, overrides in (encoders or ENCODERS).items()]
    if dev.type == "cpu":  # training's own precision there is float32
        rows.append((f"{rows[0][0]}, bf16 autocast", rows[0][1], True))
    runs = {label: step_timer(preset_config("demo", overrides), dev, batch_size, steps, bf16)
            for label, overrides, bf16 in rows}
    rates = round_robin(runs, dict.fromkeys(runs, repeats))
    first = next(iter(rates.values()))
    rows = [[label, f"{np.median(r):.2f}", f"{np.median(r) * frames_per_step:.0f}", paired_ratio(r, first)]
            for label, r in rates.items()]
    lines += markdown_table([("encoder", False), ("steps/s", True), ("frames/s", True),
                             ("steps/s vs the first row", False)], rows, absolute_shown(dev))
    return "\n".join(lines)
