"""The exact codec: pixels in [-1, 1], folded into channels by spatial (and optional temporal) patches."""

from __future__ import annotations

from typing import Any

import torch

from flowvid.checks import is_count
from flowvid.codecs.base import LatentCodec
from flowvid.registry import CODECS


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return video.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level and clamping what lies outside."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@CODECS.register("pixel")
class PixelCodec(LatentCodec):
    """Latents are the pixels themselves, patchified: ``c = 3 * patch_size**2 * temporal_patch``.

    A latent vector holds one ``temporal_patch x patch_size x patch_size`` block of RGB values, ordered
    (frame, row, column, colour). ``decode(encode(video))`` gives back ``video`` exactly.
    """

    def __init__(self, patch_size: int = 1, temporal_patch: int = 1):
        super().__init__()
        if not all(is_count(size) and size >= 1 for size in (patch_size, temporal_patch)):
            raise ValueError(f"patch sizes must be integers >= 1, got patch_size={patch_size!r}, "
                             f"temporal_patch={temporal_patch!r}")
        self.patch_size = patch_size
        self.temporal_patch = temporal_patch
        self.spatial_factor = patch_size
        self.temporal_factor = temporal_patch
        self.latent_channels = 3 * patch_size**2 * temporal_patch

    def config(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "temporal_patch": self.temporal_patch}

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.check_video(video)
        batch, frames, height, width, _ = video.shape
        p, tp = self.patch_size, self.temporal_patch
        x = to_unit_range(video).reshape(batch, frames // tp, tp, height // p, p, width // p, p, 3)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # B, t, h, w | tp, p, p, 3
        return x.reshape(batch, frames // tp, height // p, width // p, self.latent_channels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        batch, t, h, w, _ = latents.shape
        p, tp = self.patch_size, self.temporal_patch
        x = latents.reshape(batch, t, h, w, tp, p, p, 3).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return to_uint8(x.reshape(batch, t * tp, h * p, w * p, 3))
