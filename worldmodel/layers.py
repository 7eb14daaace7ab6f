"""Transformer building blocks shared by the ViT encoder and the transformer predictor."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


class Attention(nn.Module):
    """Multi-head self-attention on (B, L, C) tokens through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, is_causal: bool = False) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h c) -> three b h l c", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, heads, L, C/heads)
        return self.proj(rearrange(y, "b h l c -> b l (h c)"))


def feed_forward(dim: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))
