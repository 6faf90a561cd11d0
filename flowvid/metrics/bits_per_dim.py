"""BitsPerDim: the mean bits per dimension of a validation set, per video and per frame."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class BitsPerDim(Metric):
    """Mean of per-sample bits/dim values, synced across processes (float64 sums and a count).

    ``update`` takes per-video values ``(B,)`` (``flow.bits_per_dim``) or, when built with
    ``num_frames``, per-frame values ``(B, T)`` (``flow.nll_per_frame / ln 2``): every frame has the
    same number of dimensions, so a video's value is the mean of its frames. Per-frame means show how
    much the context of earlier frames helps the later ones.

    ``compute()`` is the mean per video; ``scalars(prefix)`` adds one value per frame, ready for
    ``log_dict``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_frames: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        self.add_state("video_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        if num_frames is not None:
            self.add_state("frame_sum", torch.zeros(num_frames, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, bits_per_dim: torch.Tensor) -> None:
        values = bits_per_dim.detach().double()
        if not torch.isfinite(values).all():  # checked first: a refused update must leave every sum as it was
            raise ValueError("bits/dim values hold NaN or inf")
        if values.ndim == 2:
            if self.num_frames is None:
                raise ValueError(f"per-frame values {tuple(values.shape)} need BitsPerDim(num_frames={values.shape[1]})")
            if values.shape[1] != self.num_frames:
                raise ValueError(f"expected per-frame values (B, {self.num_frames}), got {tuple(values.shape)}")
            self.frame_sum = self.frame_sum + values.sum(dim=0)
            values = values.mean(dim=1)
        elif values.ndim != 1:
            raise ValueError(f"expected bits/dim per video (B,) or per frame (B, T), got {tuple(values.shape)}")
        elif self.num_frames is not None:
            raise ValueError(f"this BitsPerDim tracks {self.num_frames} frames: give per-frame values (B, {self.num_frames})")
        self.video_sum = self.video_sum + values.sum()
        self.count = self.count + values.shape[0]

    def compute(self) -> torch.Tensor:
        """Mean bits/dim per video (float64 scalar)."""
        if int(self.count) == 0:
            raise ValueError("BitsPerDim.compute() before any update()")
        return self.video_sum / self.count

    def compute_per_frame(self) -> torch.Tensor:
        """Mean bits/dim of each frame ``(T,)``, synced across processes like ``compute()``."""
        if self.num_frames is None:
            raise ValueError("per-frame bits/dim need BitsPerDim(num_frames=T)")
        with self.sync_context():
            count = int(self.count)
            if count == 0:
                raise ValueError("BitsPerDim.compute_per_frame() before any update()")
            return self.frame_sum / count

    def scalars(self, prefix: str = "val/bits_per_dim") -> dict[str, float]:
        """``{prefix: per video, prefix/frame_00: frame 0, ...}`` as floats."""
        values = {prefix: float(self.compute())}
        if self.num_frames is not None:
            values.update({f"{prefix}/frame_{t:02d}": float(v) for t, v in enumerate(self.compute_per_frame())})
        return values
