"""A weight-free FVD extractor for smoke tests and CPU demos: coarse colour layout and its motion.

Each frame is averaged down to a 4x4 grid of RGB values (48 numbers); a video is described by that
grid averaged over time and by its mean absolute change between consecutive frames (96-d). It reacts
to colour, layout and motion and costs nothing, which makes the metric and callback plumbing
testable anywhere. It knows nothing about objects or realism: logged as ``fvd_debug/``, a sanity
signal only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowvid.metrics.extractor import FVDExtractor, check_video
from flowvid.registry import FVD_EXTRACTORS

GRID = 4


@FVD_EXTRACTORS.register("pixel-stats")
class PixelStatsExtractor(FVDExtractor):
    """Time-averaged 4x4 RGB grid (48-d) plus its mean absolute frame-to-frame change (48-d), in [0, 1]."""

    feature_dim = 2 * 3 * GRID * GRID
    family = "fvd_debug"

    def features(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video)
        batch, frames, height, width, _ = video.shape
        pixels = video.reshape(batch * frames, height, width, 3).permute(0, 3, 1, 2).float() / 255
        grid = F.adaptive_avg_pool2d(pixels, GRID).reshape(batch, frames, -1)
        appearance = grid.mean(dim=1)
        motion = (grid[:, 1:] - grid[:, :-1]).abs().mean(dim=1) if frames > 1 else torch.zeros_like(appearance)
        return torch.cat([appearance, motion], dim=1)
