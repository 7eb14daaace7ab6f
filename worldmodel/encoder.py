"""Frame encoders: RGB frames (..., 3, H, W) -> latents (..., D).

Two backbones, a conv net (fast on CPU) and a small ViT (the LeJEPA choice), share the input
normalisation and the BatchNorm projector. The projector ends with a Linear, not a LayerNorm: a final
LayerNorm alone would fix the embedding's scale per sample and keep SIGReg from shaping it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from einops import pack, rearrange, unpack
from torch import Tensor

from worldmodel.layers import Attention, feed_forward


@dataclass
class EncoderConfig:
    kind: str = field(default="conv", metadata={"help": "backbone: 'conv' (fast on CPU) or 'vit'"})
    image_size: int = field(default=64, metadata={"help": "input frames are image_size x image_size (32..224)"})
    latent_dim: int = field(default=64, metadata={"help": "D, the size of the latent the projector outputs"})
    proj_hidden: int = field(default=512, metadata={"help": "hidden width of the projector MLP"})
    conv_channels: int = field(default=32, metadata={"help": "conv: channels of the first stage, doubled per stage"})
    conv_stages: int = field(default=4, metadata={"help": "conv: stride-2 stages (64px -> 4x4 with 4 stages)"})
    conv_grid: int = field(default=4, metadata={"help": "conv: final feature map pooled to grid x grid, then flattened"})
    patch_size: int = field(default=8, metadata={"help": "vit: patch size (8 for 64px, 16 for 224px)"})
    vit_width: int = field(default=192, metadata={"help": "vit: token width"})
    vit_depth: int = field(default=6, metadata={"help": "vit: transformer blocks"})
    vit_heads: int = field(default=3, metadata={"help": "vit: attention heads (vit_width must divide evenly)"})
    vit_pool: str = field(default="cls", metadata={"help": "vit: image feature from the 'cls' token or the 'mean' of patches"})


# --- shared building blocks (the predictor's transformer uses them too) ------------------------------
def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> GELU -> Linear: the LeJEPA projector (no final normalisation)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


# --- encoders ------------------------------------------------------------------------------------------
class FrameEncoder(nn.Module):
    """Base: frames -> [-1, 1] floats -> backbone features (N, F) -> projector -> latents (N, D).

    Frames are uint8 in [0, 255] or floats already in [0, 1], channels first, with any leading dims:
    (B, 3, H, W) -> (B, D), (B, T, 3, H, W) -> (B, T, D). The projector's BatchNorm normalises over all
    frames of the call in train mode; call eval() before encoding for planning.
    """

    def __init__(self, feature_dim: int, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.projector = projector(feature_dim, cfg.proj_hidden, cfg.latent_dim)

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, frames: Tensor) -> Tensor:
        x, packed_shape = pack([frames], "* c h w")  # (N, 3, H, W)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - 0.5) / 0.5
        z = self.projector(self.features(x))  # (N, D)
        return unpack(z, packed_shape, "* d")[0]


class ConvEncoder(FrameEncoder):
    """Stride-2 3x3 conv stages (GroupNorm, SiLU), pooled to a small grid and flattened.

    Flattening the grid keeps where things are in the image (the arm's pose is a matter of position),
    which global average pooling would blur; adaptive pooling to the grid accepts any input size.
    About 30 MFLOPs per 64x64 frame with the defaults.
    """

    def __init__(self, cfg: EncoderConfig):
        channels = [3] + [cfg.conv_channels * 2**i for i in range(cfg.conv_stages)]
        super().__init__(channels[-1] * cfg.conv_grid**2, cfg)
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

    def __init__(self, cfg: EncoderConfig):
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        assert cfg.vit_pool in ("cls", "mean"), f"unknown vit_pool {cfg.vit_pool!r}"
        super().__init__(cfg.vit_width, cfg)
        width, num_patches = cfg.vit_width, (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if cfg.vit_pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, num_patches + (self.cls is not None), width))
        self.blocks = nn.Sequential(*[ViTBlock(width, cfg.vit_heads) for _ in range(cfg.vit_depth)])
        self.norm = nn.LayerNorm(width)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def features(self, x: Tensor) -> Tensor:
        assert x.shape[-1] == x.shape[-2] == self.cfg.image_size, f"expected {self.cfg.image_size}px frames"
        x = rearrange(self.patch_embed(x), "n c h w -> n (h w) c")  # (N, P, W)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + P, W)
        x = self.norm(self.blocks(x + self.pos))
        return x[:, 0] if self.cls is not None else x.mean(dim=1)  # (N, W)


def build_encoder(cfg: EncoderConfig) -> FrameEncoder:
    encoders = {"conv": ConvEncoder, "vit": ViTEncoder}
    if cfg.kind not in encoders:
        raise ValueError(f"unknown encoder kind {cfg.kind!r}; choose from {sorted(encoders)}")
    return encoders[cfg.kind](cfg)
