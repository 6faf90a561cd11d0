"""3-D rotary position embedding over (x, y, frame), applied to interleaved channel pairs.

A head of size ``head_dim`` has ``head_dim / 2`` rotation pairs. A quarter of them (at least one)
encode the frame index; the rest are split evenly between the two spatial axes. Spatial positions are
scaled by ``reference_side / sqrt(h * w)`` so that a model sees the same angular range at any
resolution or aspect ratio. Text tokens sit at position (0, 0, 0), i.e. they are not rotated: their
order is already encoded by the text encoder.
"""

from __future__ import annotations

import math

import torch


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs for (x, y, frame)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    frame_pairs = max(1, pairs // 4)
    spatial = pairs - frame_pairs
    return spatial - spatial // 2, spatial // 2, frame_pairs


def _frequencies(num_pairs: int, theta: float) -> torch.Tensor:
    return theta ** (-torch.arange(num_pairs, dtype=torch.float64) / max(num_pairs, 1))


def rope_angles(
    frame_size: tuple[int, int],
    num_frames: int,
    head_dim: int,
    theta: float = 10000.0,
    reference_side: float = 32.0,
) -> torch.Tensor:
    """Rotation angles ``(num_frames * h * w, head_dim / 2)`` in time-major raster order (fp32)."""
    h, w = frame_size
    x_pairs, y_pairs, t_pairs = rope_pair_split(head_dim)
    scale = reference_side / math.sqrt(h * w)
    t, y, x = torch.meshgrid(
        torch.arange(num_frames, dtype=torch.float64),
        torch.arange(h, dtype=torch.float64) * scale,
        torch.arange(w, dtype=torch.float64) * scale,
        indexing="ij",
    )
    angles = torch.cat(
        [
            x.reshape(-1, 1) * _frequencies(x_pairs, theta),
            y.reshape(-1, 1) * _frequencies(y_pairs, theta),
            t.reshape(-1, 1) * _frequencies(t_pairs, theta),
        ],
        dim=1,
    )
    return angles.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, H, N, D) by angles given as cos/sin (N, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
