"""The pre-norm transformer layer shared by flow blocks and the denoiser."""

from __future__ import annotations

import torch
from torch import nn

from flowvid.nn.attention import Attention, BandedMask
from flowvid.nn.kv_cache import KVCache
from flowvid.nn.mlp import MLP


class TransformerLayer(nn.Module):
    """``x += Attn(LN(x)); x += MLP(LN(x))``."""

    def __init__(self, width: int, head_dim: int, mlp: nn.Module | None = None, qk_norm: bool = False,
                 mlp_ratio: float = 4.0):
        """``mlp`` replaces the default ``MLP(width, mlp_ratio)``, which is made here, after the attention,
        so that a seed gives the same initial weights as ever."""
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = Attention(width, head_dim, qk_norm=qk_norm)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = mlp if mlp is not None else MLP(width, mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BandedMask | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.norm_mlp(x))
