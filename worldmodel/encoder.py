"""Frame encoders: RGB frames (..., 3, H, W) -> latents (..., D).

Two backbones, a conv net (fast on CPU) and a small ViT (the LeJEPA choice), share the input
normalisation and the BatchNorm projector. The projector ends with a Linear, not a LayerNorm: a final
LayerNorm alone would fix the embedding's scale per sample and keep SIGReg from shaping it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import pack, rearrange, unpack
from torch import Tensor

from common.config import check_at_least, check_at_most, option
from worldmodel.layers import Attention, feed_forward


@dataclass
class EncoderConfig:
    """The backbone; the image size and latent size are the world model's (``WorldModelConfig``)."""

    kind: str = option("conv", "backbone: conv (fast on CPU) or vit (the LeJEPA choice)", choices=("conv", "vit"))
    proj_hidden: int = option(512, "hidden width of the projector MLP")
    conv_channels: int = option(16, "conv: channels of the first stage, doubled per stage")
    conv_stages: int = option(4, "conv: stride-2 stages (64px -> 4x4 with 4 stages)")
    conv_grid: int = option(4, "conv: final feature map pooled to grid x grid, then flattened")
    patch_size: int = option(8, "vit: patch size (8 for 64px, 16 for 224px); must divide the image size")
    vit_width: int = option(192, "vit: token width (a multiple of vit-heads)")
    vit_depth: int = option(6, "vit: transformer blocks")
    vit_heads: int = option(3, "vit: attention heads")
    vit_pool: str = option("cls", "vit: image feature from the cls token or the mean of patches", choices=("cls", "mean"))

    def __post_init__(self):
        check_at_least(self, 1, ("proj_hidden", "conv_channels", "conv_stages", "conv_grid", "patch_size", "vit_width",
                                 "vit_depth", "vit_heads"), "encoder.")
        check_at_most(self, 16384, ("proj_hidden", "vit_width"), "encoder.")
        check_at_most(self, 1024, ("conv_channels",), "encoder.")
        check_at_most(self, 8, ("conv_stages",), "encoder.")
        check_at_most(self, 512, ("conv_grid", "patch_size"), "encoder.")
        check_at_most(self, 128, ("vit_depth", "vit_heads"), "encoder.")
        if self.vit_width % self.vit_heads:
            raise ValueError(f"--encoder.vit-width ({self.vit_width}) must be a multiple of --encoder.vit-heads "
                             f"({self.vit_heads})")


# --- shared building blocks (the predictor's transformer uses them too) ------------------------------
def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> GELU -> Linear: the LeJEPA projector (no final normalisation)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


# --- encoders ------------------------------------------------------------------------------------------
class FrameEncoder(nn.Module):
    """Base: frames -> [-1, 1] floats -> backbone features (N, F) -> projector -> latents (N, D).

    Frames are uint8 in [0, 255] or floats already in [0, 1], channels first, with any leading dims:
    (B, 3, H, W) -> (B, D), (B, T, 3, H, W) -> (B, T, D). The projector's BatchNorm normalises over all
    frames of the call in train mode; call eval() before encoding for planning. Latents are float32
    under bf16 autocast too: near the goal the latent changes that decide success are as small as bf16's
    rounding step at |z| ~ 1.
    """

    def __init__(self, feature_dim: int, cfg: EncoderConfig, image_size: int, latent_dim: int):
        super().__init__()
        self.cfg, self.image_size, self.latent_dim = cfg, image_size, latent_dim
        self.projector = projector(feature_dim, cfg.proj_hidden, latent_dim)

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, frames: Tensor) -> Tensor:
        x, packed_shape = pack([frames], "* c h w")  # (N, 3, H, W)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - 0.5) / 0.5
        z = self.projector(self.features(x)).float()  # (N, D); float32 even under bf16 autocast
        return unpack(z, packed_shape, "* d")[0]


class ConvEncoder(FrameEncoder):
    """Stride-2 3x3 conv stages (GroupNorm, SiLU), pooled to a small grid and flattened.

    Flattening the grid keeps where things are in the image (the arm's pose is a matter of position),
    which global average pooling would blur; adaptive pooling to the grid accepts any input size.
    About 10 MFLOPs per 64x64 frame with the defaults.
    """

    def __init__(self, cfg: EncoderConfig, image_size: int, latent_dim: int):
        channels = [3] + [cfg.conv_channels * 2**i for i in range(cfg.conv_stages)]
        super().__init__(channels[-1] * cfg.conv_grid**2, cfg, image_size, latent_dim)
        layers = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, c_out), c_out), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(cfg.conv_grid)

    def features(self, x: Tensor) -> Tensor:
        x = self.pool(self.convs(x))  # (N, C, grid, grid)
        return rearrange(x, "n c h w -> n (c h w)")


class ViTBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), feed_forward(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(FrameEncoder):
    """Small ViT: patch embedding, learned positional embedding, optional CLS token, pre-norm blocks."""

    def __init__(self, cfg: EncoderConfig, image_size: int, latent_dim: int):
        if image_size % cfg.patch_size:
            raise ValueError(f"the image size ({image_size}) must be a multiple of --encoder.patch-size ({cfg.patch_size})")
        super().__init__(cfg.vit_width, cfg, image_size, latent_dim)
        width, num_patches = cfg.vit_width, (image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if cfg.vit_pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, num_patches + (self.cls is not None), width))
        self.blocks = nn.Sequential(*[ViTBlock(width, cfg.vit_heads) for _ in range(cfg.vit_depth)])
        self.norm = nn.LayerNorm(width)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def features(self, x: Tensor) -> Tensor:
        if not x.shape[-1] == x.shape[-2] == self.image_size:
            raise ValueError(f"expected {self.image_size}px frames, got {tuple(x.shape[-2:])}")
        x = rearrange(self.patch_embed(x), "n c h w -> n (h w) c")  # (N, P, W)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + P, W)
        x = self.norm(self.blocks(x + self.pos))
        return x[:, 0] if self.cls is not None else x.mean(dim=1)  # (N, W)


def build_encoder(cfg: EncoderConfig, image_size: int, latent_dim: int) -> FrameEncoder:
    encoders = {"conv": ConvEncoder, "vit": ViTEncoder}
    if cfg.kind not in encoders:
        raise ValueError(f"unknown encoder kind {cfg.kind!r}; choose from {sorted(encoders)}")
    return encoders[cfg.kind](cfg, image_size, latent_dim)
