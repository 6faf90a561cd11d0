"""The Sampler contract: invert a flow, like a diffusers scheduler stands apart from its model."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from flowvid.text.base import TextEmbedding


class Sampler(ABC):
    """Turns noise ``z`` (B, T, h, w, c) into latents ``x`` with ``flow(x) == z``."""

    @abstractmethod
    def sample(
        self,
        flow,
        z: torch.Tensor,
        text: TextEmbedding | None = None,
        guidance: float = 0.0,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ...
