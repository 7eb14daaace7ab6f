"""``WorldModel``: the encoder and the predictor as one object, saved and loaded safely.

A checkpoint is two files side by side: ``NAME.pt`` (a plain state dict, loaded with
``weights_only=True``, never unpickled) and ``NAME.json`` (the config and a format version).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from worldmodel.encoder import EncoderConfig, build_encoder
from worldmodel.predictor import PredictorConfig, build_predictor

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this code, with the reason."""


@dataclass
class WorldModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    frameskip: int = field(default=5, metadata={"help": "env steps between two latents; one action chunk spans them"})
    env: str = field(default="reacher-easy", metadata={"help": "environment the model was trained on"})

    @property
    def history(self) -> int:
        return self.predictor.history

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"encoder", "predictor"}
        if unknown:
            raise CheckpointError(f"unknown world-model config keys {sorted(unknown)}")
        return cls(encoder=_sub(EncoderConfig, d.pop("encoder", {})),
                   predictor=_sub(PredictorConfig, d.pop("predictor", {})), **d)


def _sub(cls, d: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} keys {sorted(unknown)}")
    return cls(**d)


class WorldModel(nn.Module):
    """frames -> latents (encoder), (latent history, action chunks) -> future latents (predictor)."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.predictor.latent_dim != cfg.encoder.latent_dim:
            raise ValueError("predictor.latent_dim must equal encoder.latent_dim")
        if cfg.predictor.action_dim != 2 * cfg.frameskip:
            raise ValueError(f"predictor.action_dim must be 2 * frameskip = {2 * cfg.frameskip}")
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        self.predictor = build_predictor(cfg.predictor)

    @property
    def action_dim(self) -> int:
        """A: one action chunk, the ``frameskip`` 2-D actions between two latents."""
        return 2 * self.cfg.frameskip

    @property
    def history(self) -> int:
        return self.cfg.history

    @property
    def frameskip(self) -> int:
        return self.cfg.frameskip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, frames: Tensor) -> Tensor:
        """uint8 frames (..., H, W, 3), as the env and the dataset give them -> latents (..., D)."""
        size = self.cfg.image_size
        if frames.shape[-3:] != (size, size, 3):
            raise ValueError(f"frames must be (..., {size}, {size}, 3) for this model, got {tuple(frames.shape)}")
        return self.encoder(rearrange(frames, "... h w c -> ... c h w"))

    def forward(self, frames: Tensor, actions: Tensor, rollout_steps: int = 0):
        """Training pass on windows: frames (B, L, H, W, 3), actions (B, L-1, A) -> latents (B, L, D),
        teacher-forced predictions (B, L-1, D) of latents 1..L-1, and (with ``rollout_steps`` R > 0)
        open-loop predictions (B, R, D) of latents h..h+R-1 from the first h latents, as planning uses them."""
        z = self.encode(frames)
        pred = self.predictor(z[:, :-1], actions)
        if rollout_steps == 0:
            return z, pred, None
        h = self.history
        return z, pred, self.predictor.rollout(z[:, :h], actions[:, :h - 1], actions[:, h - 1:h - 1 + rollout_steps])

    def rollout(self, z_hist: Tensor, a_hist: Tensor | None, actions: Tensor) -> Tensor:
        """(B, h, D), (B, h-1, A) | None, (B, H, A) -> (B, H, D): see ``Predictor.rollout``."""
        return self.predictor.rollout(z_hist, a_hist, actions)

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write ``path`` (weights) and ``path.json`` (config) atomically."""
        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "config": self.cfg.to_dict(), **(extra or {})}
        atomic_write_json(path.with_suffix(".json"), meta)
        atomic_torch_save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "WorldModel":
        """Load a checkpoint written by ``save``; a clear ``CheckpointError`` if it does not fit."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: its config {meta_path.name} is missing beside it")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {version}, this code reads {FORMAT_VERSION}")
        model = cls(WorldModelConfig.from_dict(meta["config"]))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read as a weights file: {exc}") from exc
        mine = model.state_dict()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        wrong = [k for k in mine.keys() & state.keys() if mine[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{path}: weights do not match its config (another config or code version?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
        model.load_state_dict(state)
        return model.to(device).eval()


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
