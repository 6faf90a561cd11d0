"""Feed-forward layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear -> GELU -> Linear, ``ratio`` times wider in the middle."""

    def __init__(self, width: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(width * ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (SiLU gate); ``ratio`` is the parameter-matched hidden ratio."""

    def __init__(self, width: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(width * ratio * 2 / 3)
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)
