"""3-D rotary position embedding over (x, y, frame), applied to interleaved channel pairs.

A head of size ``head_dim`` has ``head_dim / 2`` rotation pairs. A quarter of them (at least one)
encode the frame index; the rest are split evenly between the two spatial axes. Spatial positions are
scaled by ``reference_side / sqrt(h * w)`` so that a model sees the same angular range at any
resolution or aspect ratio. A ``head_dim`` below 6 has no pair left for some axis (4: frame and x,
2: the frame alone); such tiny heads serve tests, not models. Text tokens sit at position (0, 0, 0),
i.e. they are not rotated: their order is already encoded by the text encoder.

A pair ``(a, b)`` rotated by angle ``t`` is the complex product ``(a + ib) * e^{it}``, so the rotation
is one complex multiplication per pair (forward and backward), computed in fp32.
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


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation by angles given as cos/sin, built once for both queries and keys: unit complex
    numbers in eager code (3x faster on a CPU than the real-valued rotation), and under torch.compile the
    (cos, sin) pairs stacked in a last dimension, which the compiler fuses (inductor generates no code
    for complex tensors and leaves them to slow fallbacks)."""
    if torch.compiler.is_compiling():
        return torch.stack([cos.float(), sin.float()], dim=-1)
    return torch.complex(cos.float(), sin.float())


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dimension of ``x`` by a ``rope_rotation``.

    ``rotation`` broadcasts against ``x`` with its last dimension halved. The product is taken in fp32
    and returned as a new contiguous tensor of ``x``'s dtype.
    """
    if not rotation.is_complex():
        return rotate_pairs_real(x, *rotation.unbind(-1))
    values = x.float()
    if values.stride(-1) != 1 or values.storage_offset() % 2 or any(s % 2 for s in values.stride()[:-1]):
        values = values.clone(memory_format=torch.contiguous_format)  # complex views need aligned pairs
    pairs = torch.view_as_complex(values.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def rotate_pairs_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate_pairs`` in real arithmetic, ``(a cos - b sin, a sin + b cos)``."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.float(), sin.float()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` by angles given as cos/sin broadcasting against it with its last
    dimension halved (for ``x`` (B, H, N, D): (N, D/2)). In fp32, returned in ``x``'s dtype."""
    return rotate_pairs(x, rope_rotation(cos, sin))
