"""``wm train``: the LeJEPA world-model training loop (prediction loss + SIGReg), no framework.

Every random draw of step ``k`` (the batch, the SIGReg directions) comes from a generator seeded by
``(seed, k, rank)``, so ``--resume`` continues a run exactly as if it had never stopped.
Run data-parallel with ``torchrun --nproc_per_node=N -m wm train ...`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from envs.dataset import EpisodeStore, WindowDataset, WindowSpec
from worldmodel.encoder import EncoderConfig
from worldmodel.model import (WorldModel, WorldModelConfig, atomic_torch_save, atomic_write_json,
                              resolve_device)
from worldmodel.predictor import PredictorConfig
from worldmodel.probe import run_probe
from worldmodel.sigreg import sigreg_loss


@dataclass
class TrainConfig:
    """``wm train``: train encoder and predictor with prediction loss + SIGReg."""

    data: str = field(default="runs/data/demo", metadata={"help": "dataset directory (or .h5 file)"})
    out: str = field(default="runs/demo", metadata={"help": "run directory: model.pt, checkpoint.pt, tb/"})
    preset: str = field(default="demo", metadata={"help": "demo (2-core CPU, ~10 min) or full (one GPU)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches and SIGReg directions"})
    # optimisation
    steps: int = field(default=2000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"help": "windows per step (per process under torchrun)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup, then cosine decay to 0"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    sigreg_weight: float = field(default=0.1, metadata={"help": "lambda: weight of SIGReg in the loss"})
    sigreg_directions: int = field(default=256, metadata={"help": "random 1-D projections per step"})
    # data windows
    history: int = field(default=3, metadata={"help": "latents the predictor sees"})
    n_pred: int = field(default=5, metadata={"help": "frames per window after the history (teacher-forced targets)"})
    rollout_steps: int = field(default=5, metadata={"help": "also train open-loop rollouts of this many steps (<= n_pred); "
                                                              "0: teacher forcing only"})
    rollout_weight: float = field(default=1.0, metadata={"help": "weight of the open-loop rollout loss"})
    frameskip: int = field(default=5, metadata={"help": "env steps between latents; actions chunked over them"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of episodes held out"})
    # model
    encoder: str = field(default="conv", metadata={"help": "conv or vit"})
    latent_dim: int = field(default=64, metadata={"help": "D, the latent size"})
    proj_hidden: int = field(default=512, metadata={"help": "projector hidden width"})
    conv_channels: int = field(default=32, metadata={"help": "conv: channels of the first stage"})
    vit_width: int = field(default=192, metadata={"help": "vit: token width"})
    vit_depth: int = field(default=6, metadata={"help": "vit: blocks"})
    patch_size: int = field(default=8, metadata={"help": "vit: patch size"})
    predictor: str = field(default="mlp", metadata={"help": "mlp or transformer"})
    pred_hidden: int = field(default=256, metadata={"help": "predictor width (256 keeps CEM 300x30 under 300 ms on 2 cores)"})
    pred_depth: int = field(default=3, metadata={"help": "predictor layers / blocks"})
    # bookkeeping
    log_every: int = field(default=25, metadata={"help": "steps between TensorBoard scalars"})
    val_every: int = field(default=500, metadata={"help": "steps between validation rollouts"})
    val_horizon: int = field(default=5, metadata={"help": "rollout steps scored in validation"})
    probe_every: int = field(default=1000, metadata={"help": "steps between linear probes (0: only at the end)"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})


PRESETS = {
    # 2-core CPU, about 8 minutes: the conv encoder and MLP predictor on 64px frames, windows of 3 + 5
    # frames with a 5-step open-loop rollout loss (90.7% reach25 against 84.7% for teacher forcing alone
    # on windows of 3 + 1 at batch 64, the same frames per step; README).
    "demo": {},
    # One GPU: a larger batch, longer schedule; bf16 autocast is on by itself on CUDA.
    "full": {"steps": 20000, "batch_size": 256, "lr": 5e-4, "warmup_steps": 500, "latent_dim": 128,
             "conv_channels": 64, "pred_hidden": 1024, "num_workers": 4, "val_every": 1000, "probe_every": 2000,
             "ckpt_every": 2000},
}


def preset_config(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**{**PRESETS[name], "preset": name, **overrides})


def model_config(cfg: TrainConfig, image_size: int, env: str) -> WorldModelConfig:
    enc = EncoderConfig(kind=cfg.encoder, image_size=image_size, latent_dim=cfg.latent_dim,
                        proj_hidden=cfg.proj_hidden, conv_channels=cfg.conv_channels, patch_size=cfg.patch_size,
                        vit_width=cfg.vit_width, vit_depth=cfg.vit_depth)
    pred = PredictorConfig(kind=cfg.predictor, latent_dim=cfg.latent_dim, action_dim=2 * cfg.frameskip,
                           history=cfg.history, hidden=cfg.pred_hidden, depth=cfg.pred_depth)
    return WorldModelConfig(encoder=enc, predictor=pred, frameskip=cfg.frameskip, env=env)


class TrainingDiverged(RuntimeError):
    pass


# --- pure pieces ----------------------------------------------------------------------------------
def step_generator(seed: int, step: int, rank: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to 0: a multiplier of the peak learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred latents (N, D): 1 = collapsed, D = isotropic."""
    s = torch.linalg.svdvals((z - z.mean(0)).float())
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def prediction_loss(z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """MSE of teacher-forced predictions pred[:, t] vs z[:, t+1] at every position. The first positions
    see a left-padded history, as the MPC policy does at the start of an episode."""
    return F.mse_loss(pred, z[:, 1:])


def world_model_losses(model, batch: dict, cfg: TrainConfig, generator: torch.Generator) -> dict:
    """The training objective on one batch of windows."""
    z, pred, roll = model(batch["pixels"], batch["actions"], cfg.rollout_steps)  # (B, L, D), (B, L-1, D), (B, R, D)
    pred_loss = prediction_loss(z.float(), pred.float())
    sig = sigreg_loss(rearrange(z, "b l d -> (b l) d"), cfg.sigreg_directions, generator=generator)
    loss = pred_loss + cfg.sigreg_weight * sig
    out = {"pred_loss": pred_loss, "sigreg": sig, "z": z.detach()}
    if roll is not None:
        h = cfg.history
        out["rollout_loss"] = F.mse_loss(roll.float(), z[:, h:h + cfg.rollout_steps].float())
        loss = loss + cfg.rollout_weight * out["rollout_loss"]
    return {"loss": loss, **out}


@torch.no_grad()
def validation_rollout(model: WorldModel, loader, history: int, device) -> dict:
    """Open-loop error at every rollout step 1..H on held-out windows, absolute and relative to
    predicting no change (the last context latent): below 1 means the model saw the motion coming."""
    model.eval()
    se, base, n = 0.0, 0.0, 0
    for batch in loader:
        frames, actions = batch["pixels"].to(device), batch["actions"].to(device)
        z = model.encode(frames).float()  # (B, L, D)
        pred = model.rollout(z[:, :history], actions[:, :history - 1], actions[:, history - 1:]).float()
        target = z[:, history:]
        se = se + ((pred - target) ** 2).mean(-1).sum(0)  # (H,)
        base = base + ((z[:, history - 1:history] - target) ** 2).mean(-1).sum(0)
        n += len(z)
    model.train()
    mse = (se / n).cpu()
    return {"mse": mse.tolist(), "relative": (mse / (base / n).cpu().clamp_min(1e-12)).tolist()}


# --- the loop ---------------------------------------------------------------------------------------
class StepBatches(torch.utils.data.Sampler):
    """Batch indices for steps ``start..steps-1``, each drawn from ``(seed, step, rank)`` alone."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start, self.steps, self.rank = n, batch_size, seed, start, steps, rank

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            g = step_generator(self.seed, step, self.rank)
            yield torch.randint(self.n, (self.batch_size,), generator=g).tolist()


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) a world model; returns the final metrics. Writes under ``cfg.out``."""
    rank, world = _init_distributed()
    device = resolve_device(cfg.device) if world == 1 else _rank_device(cfg.device)
    out = Path(cfg.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    if cfg.rollout_steps > cfg.n_pred:
        raise ValueError(f"rollout_steps ({cfg.rollout_steps}) must be <= n_pred ({cfg.n_pred}): the window holds the targets")
    store = EpisodeStore(cfg.data)
    spec = WindowSpec(cfg.history, cfg.n_pred, cfg.frameskip)
    train_ds = WindowDataset(store, spec, "train", cfg.val_fraction, cfg.seed)
    val_spec = WindowSpec(cfg.history, cfg.val_horizon, cfg.frameskip)
    val_ds = WindowDataset(store, val_spec, "val", cfg.val_fraction, cfg.seed)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, _spread(len(val_ds), 512)),
                                             batch_size=256)

    torch.manual_seed(cfg.seed)
    model = WorldModel(model_config(cfg, store.size, str(store.attrs["env"]))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:
        start = _load_training_state(ckpt_path, cfg, model, opt)
    elif is_main and ckpt_path.exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if is_main:
        atomic_write_json(out / "train_config.json", dataclasses.asdict(cfg))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    autocast = autocast_for(device)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatches(len(train_ds), cfg.batch_size, cfg.seed, start, cfg.steps, rank),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", persistent_workers=False)

    writer = _writer(out) if is_main else None
    if writer is not None and start == 0:
        _log_frames(writer, train_ds)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", disable=not (progress and is_main),
               unit="step")
    metrics: dict = {}
    done = start  # completed steps
    t_last, frames_seen = time.perf_counter(), 0
    try:
        for step, batch in enumerate(loader, start=start):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_at(step, cfg)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                losses = world_model_losses(net, batch, cfg, step_generator(cfg.seed, step, 0, device))
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss {loss.item()} at step {step} (pred {losses['pred_loss'].item()}, "
                    f"sigreg {losses['sigreg'].item()}); the last good checkpoint is {ckpt_path}. "
                    f"Lower --lr or raise --grad-clip, then --resume.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            done = step + 1
            frames_seen += batch["pixels"].shape[0] * batch["pixels"].shape[1] * world
            bar.update(1)
            if writer is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                fps = frames_seen / (now - t_last)
                t_last, frames_seen = now, 0
                z = losses["z"].flatten(0, 1).float()
                scalars = {"loss/total": loss.item(), "loss/prediction": losses["pred_loss"].item(),
                           "loss/sigreg": losses["sigreg"].item(), "embedding/std": z.std(0).mean().item(),
                           "embedding/effective_rank": effective_rank(z), "opt/lr": opt.param_groups[0]["lr"],
                           "opt/grad_norm": float(grad_norm), "speed/frames_per_s": fps}
                if "rollout_loss" in losses:
                    scalars["loss/rollout"] = losses["rollout_loss"].item()
                for k, v in scalars.items():
                    writer.add_scalar(k, v, done)
                bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", fps=f"{fps:.0f}")
                metrics.update(scalars)
            if is_main and (done % cfg.val_every == 0 or done == cfg.steps):
                val = validation_rollout(model, val_loader, cfg.history, device)
                for k, (mse, rel) in enumerate(zip(val["mse"], val["relative"]), start=1):
                    writer.add_scalar(f"val/rollout_mse_step{k}", mse, done)
                    writer.add_scalar(f"val/rollout_relative_step{k}", rel, done)
                metrics["val"] = val
            if is_main and ((cfg.probe_every and done % cfg.probe_every == 0) or done == cfg.steps):
                probe = run_probe(model, store, train_ds.episode_ids, val_ds.episode_ids, device=device)
                for k, v in probe.items():
                    writer.add_scalar(f"probe/r2_{k}", v, done)
                metrics["probe"] = probe
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                if world > 1:
                    metrics["ddp_max_param_diff"] = _check_in_sync(model)
                if is_main:
                    _save(out, model, opt, cfg, done, metrics)
        if world > 1:
            dist.barrier()  # no rank tears gloo/nccl down while another still communicates
    except KeyboardInterrupt:
        if is_main and done > start:
            _save(out, model, opt, cfg, done, metrics)
            print(f"\ninterrupted: checkpoint at step {done} in {out}; continue with --resume")
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if world > 1:
            dist.destroy_process_group()
    return metrics


def _spread(n: int, k: int) -> list[int]:
    """At most k indices spread evenly over range(n): a fixed validation subset."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).astype(int).tolist()))


def _save(out: Path, model: WorldModel, opt, cfg: TrainConfig, step: int, metrics: dict) -> None:
    """The user-facing model (model.pt + model.json) and the training state (checkpoint.pt)."""
    extra = {"step": step, "train_config": dataclasses.asdict(cfg),
             "metrics": {k: v for k, v in metrics.items()
                         if k in ("probe", "val", "loss/prediction", "ddp_max_param_diff")}}
    model.save(out / "model.pt", extra=extra)
    atomic_torch_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "config": dataclasses.asdict(cfg)}, out / "checkpoint.pt")


# Settings that may differ on resume without changing what the run computes.
_RESUME_FREE = {"resume", "device", "num_workers", "log_every", "val_every", "probe_every", "ckpt_every",
                "compile"}


def _load_training_state(path: Path, cfg: TrainConfig, model: WorldModel, opt) -> int:
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
            if k not in _RESUME_FREE and saved.get(k) != v}
    if diff:
        raise ValueError(f"--resume: settings differ from the checkpoint's (saved, now): {diff}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def _check_in_sync(model: torch.nn.Module) -> float:
    """Largest difference between this rank's parameters and rank 0's; an error if they drifted."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = torch.tensor([(flat - ref).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() > 1e-5:
        raise RuntimeError(f"data-parallel ranks drifted apart: max parameter difference {diff.item()}")
    return diff.item()


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _rank_device(device: str) -> torch.device:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _log_frames(writer, ds: WindowDataset, rows: int = 6) -> None:
    """An image grid of a few training windows (rows: windows, columns: time)."""
    pick = _spread(len(ds), rows)
    frames = torch.stack([ds[k]["pixels"] for k in pick])  # (R, L, H, W, 3)
    writer.add_image("data/windows", rearrange(frames, "r l h w c -> c (r h) (l w)"), 0)
