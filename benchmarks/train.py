"""``wm bench train``: training throughput of each encoder and frame size with the demo preset's
predictor.

One step = encode a batch of windows, predict, SIGReg, backward, AdamW. The demo's encoder at 64 px (the
first row) is the baseline the others are compared with, measured in the same run (steps/s and frames/s
are printed on a GPU only).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks.timing import absolute_shown, markdown_table
from common.device import autocast_for, resolve_device, synchronize
from worldmodel.model import WorldModel
from worldmodel.objective import step_generator, world_model_losses
from worldmodel.train import preset_config

ENCODERS = {"conv, 16 channels (the demo's)": {}, "conv, 8 channels": {"encoder.conv_channels": 8},
            "conv, 32 channels": {"encoder.conv_channels": 32},
            "conv, 16 channels, 96 px frames": {"image_size": 96},
            "conv, 16 channels, 128 px frames": {"image_size": 128},
            "vit (width 192, depth 6, patch 8)": {"encoder.kind": "vit"}}


def steps_per_s(cfg, device: torch.device, batch_size: int, steps: int) -> float:
    size = cfg.model.image_size or 64  # the frames' size (64 px unless the encoder's row says otherwise)
    model = WorldModel(dataclasses.replace(cfg.model, image_size=size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    frames_per_window = cfg.model.history + cfg.n_pred
    frames = torch.randint(0, 256, (batch_size, frames_per_window, size, size, 3), dtype=torch.uint8, generator=g)
    actions = torch.rand(batch_size, frames_per_window - 1, cfg.model.action_dim, generator=g) * 2 - 1
    batch = {"pixels": frames.to(device), "actions": actions.to(device)}
    def step(k: int) -> None:
        with autocast_for(device):
            loss = world_model_losses(model, batch, cfg, step_generator(0, k, 0, device))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm up
    synchronize(device)
    start = time.perf_counter()
    for k in range(steps):
        step(k + 1)
    synchronize(device)
    return steps / (time.perf_counter() - start)


def run(device: str = "auto", steps: int = 10, encoders: dict | None = None) -> str:
    dev = resolve_device(device)
    base = preset_config("demo")
    batch_size = base.batch_size
    frames_per_step = batch_size * (base.model.history + base.n_pred)
    lines = [f"Device {dev}, torch threads {torch.get_num_threads()}; the demo preset: batch {batch_size} windows of "
             f"{base.model.history + base.n_pred} frames (64x64 unless a row says otherwise), "
             f"{base.rollout_steps}-step rollout loss.", ""]
    rows, first = [], None
    for label, overrides in (encoders or ENCODERS).items():
        rate = steps_per_s(preset_config("demo", overrides), dev, batch_size, steps)
        first = first or rate
        rows.append([label, f"{rate:.2f}", f"{rate * frames_per_step:.0f}", f"{rate / first:.2f}x"])
    lines += markdown_table([("encoder", False), ("steps/s", True), ("frames/s", True),
                             ("steps/s vs the first row", False)], rows, absolute_shown(dev))
    return "\n".join(lines)
