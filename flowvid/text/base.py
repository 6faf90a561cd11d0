"""The TextEncoder contract: captions -> token states and a padding mask for the deep block."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Sequence

import torch
from torch import nn


class TextEmbedding(NamedTuple):
    """Token states ``(B, L, D)`` and a boolean mask ``(B, L)`` that is True on real tokens."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, int) and index in (0, 1):
            return tuple.__getitem__(self, index)
        return TextEmbedding(self.tokens[index], self.mask[index])

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        return TextEmbedding(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


class TextEncoder(nn.Module, ABC):
    """Encodes a batch of captions. The empty string means "unconditional".

    ``width`` is D, the size of each token state; ``max_length`` is L. Padding positions carry zeros
    in ``tokens`` and False in ``mask``. Over-long captions are truncated and counted in
    ``truncated_count``.
    """

    width: int
    max_length: int

    def __init__(self) -> None:
        super().__init__()
        self.truncated_count = 0

    @abstractmethod
    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        ...

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        return self(list(captions))

    def identity(self) -> dict[str, str]:
        from flowvid.registry import TEXT_ENCODERS

        return {"name": TEXT_ENCODERS.name_of(type(self)) or type(self).__name__, "width": str(self.width)}
