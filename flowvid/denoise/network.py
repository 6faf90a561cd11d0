"""The causal denoiser: a small transformer that removes the training noise from sampled latents.

The flow models noisy latents ``x~ = x + sigma * eps``, so its samples are noisy too. The denoiser
``D`` predicts the scaled score ``sigma * grad NLL(x~)`` (about ``eps``) and one step

    x^ = x~ - sigma * D(x~)

is Tweedie's estimate of the clean latents. Attention is bidirectional inside a frame. Across frames,
the first layer of frame n sees frames ``[n - window, n + lookahead]`` and every later layer
``[n - window, n]``: the look-ahead is taken once, so the output for frame n depends on no frame
after ``n + lookahead`` however deep the network is (a per-layer look-ahead would compound to
``depth * lookahead`` frames). A long video can therefore be denoised while it is being generated,
``lookahead`` frames behind the sampler.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from flowvid.checks import check_positive, is_count
from flowvid.nn.attention import frame_window_mask
from flowvid.nn.rope import rope_angles
from flowvid.nn.transformer import TransformerLayer
from flowvid.text.base import TextEmbedding


def denoiser_attention_mask(
    num_frames: int,
    tokens_per_frame: int,
    window: int,
    lookahead: int,
    text_valid: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """"May attend" mask (B or 1, 1, L + N, L + N) over ``[text ; video tokens]``.

    Video queries see the valid text and the frames of their window; text queries see the valid text
    and themselves (so a fully padded caption never leaves a row without keys).
    """
    video = frame_window_mask(num_frames, tokens_per_frame, window, lookahead, device=device)[0, 0]
    if text_valid is None:
        return video[None, None]
    batch, prefix = text_valid.shape
    total = prefix + video.shape[0]
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    allowed[:, :, :prefix] = text_valid[:, None, :].bool()
    allowed[:, prefix:, prefix:] = video
    allowed[:, :prefix, :prefix] |= torch.eye(prefix, dtype=torch.bool, device=device)
    return allowed[:, None]


#: The smallest value each size may take. A denoiser without layers would see no other token: a model
#: without a denoiser leaves it out (``denoiser: null``).
MINIMUM_SIZES = {"channels": 1, "width": 1, "depth": 1, "head_dim": 2, "window": 0, "lookahead": 0, "text_width": 1}


def _check_sizes(frame_size: tuple[int, int], text_width: int | None, **sizes: int) -> None:
    """Refuse sizes that build no working denoiser, before building it: a negative depth built no layer,
    a zero width a network that returns its input, a zero text width an unconditional one, and others
    failed far away, in the first forward pass."""
    if text_width is not None:
        sizes["text_width"] = text_width
    for name, value in sizes.items():
        if not is_count(value) or value < MINIMUM_SIZES[name]:
            raise ValueError(f"CausalDenoiser {name} must be an int >= {MINIMUM_SIZES[name]}, got {value!r}")
    if not (isinstance(frame_size, (tuple, list)) and len(frame_size) == 2
            and all(is_count(side) and side >= 1 for side in frame_size)):
        raise ValueError(f"CausalDenoiser frame_size must be a pair (h, w) of ints >= 1, got {frame_size!r}")
    if sizes["head_dim"] % 2:
        raise ValueError(f"CausalDenoiser head_dim must be even (RoPE rotates channel pairs), got {sizes['head_dim']}")
    if sizes["width"] % sizes["head_dim"]:
        raise ValueError(f"CausalDenoiser width must be a multiple of head_dim, got width={sizes['width']}, "
                         f"head_dim={sizes['head_dim']}")


class CausalDenoiser(nn.Module):
    """Predicts ``sigma * grad_x NLL(x)`` of noisy latents; frame n sees no frame after ``n + lookahead``.

    Args:
        channels: c, latent channels.
        frame_size: (h, w), latent tokens per frame side.
        width, depth, head_dim: transformer size.
        window: how many past frames each frame attends to in every layer.
        lookahead: how many future frames the output of a frame depends on.
        text_width: width of the text token states; None for an unconditional denoiser (which then
            ignores any text it is given).
        noise_std: sigma of the noise it removes; ``FlowModule`` sets it to its own ``noise_std``.
    """

    def __init__(
        self,
        channels: int,
        frame_size: tuple[int, int],
        width: int = 128,
        depth: int = 2,
        head_dim: int = 32,
        window: int = 2,
        lookahead: int = 1,
        text_width: int | None = None,
        noise_std: float | None = None,
    ):
        super().__init__()
        _check_sizes(channels=channels, frame_size=frame_size, width=width, depth=depth, head_dim=head_dim,
                     window=window, lookahead=lookahead, text_width=text_width)
        if noise_std is not None:  # 0 would denoise nothing, a negative sigma step the wrong way
            check_positive("CausalDenoiser noise_std", noise_std)
        self.channels = channels
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.head_dim = head_dim
        self.window = window
        self.lookahead = lookahead
        self.text_width = text_width
        self.noise_std = noise_std
        self.proj_in = nn.Linear(channels, width)
        self.proj_text = nn.Linear(text_width, width) if text_width else None
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, channels)
        # Zero output: an untrained denoiser leaves its input unchanged.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_size[0] * self.frame_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        h, w = self.frame_size
        if x.dim() != 5 or tuple(x.shape[2:]) != (h, w, self.channels):
            raise ValueError(f"expected latents of shape (B, T, {h}, {w}, {self.channels}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, text: TextEmbedding | None = None, first_frame: int = 0) -> torch.Tensor:
        """The predicted scaled score ``sigma * grad NLL(x)``, fp32, shaped like ``x``; ``x`` may be frames
        ``first_frame, first_frame + 1, ...`` of a longer video (their rotary positions are absolute:
        the unrotated text makes attention depend on them)."""
        self.check_input(x)
        batch, frames = x.shape[:2]
        tokens = x.reshape(batch, frames * self.tokens_per_frame, self.channels)
        hidden = self.proj_in(tokens.to(self.proj_in.weight.dtype))
        angles = rope_angles(self.frame_size, first_frame + frames, self.head_dim)
        angles = angles[first_frame * self.tokens_per_frame:].to(x.device)
        cos, sin = angles.cos(), angles.sin()
        text_valid = None
        if text is not None and self.proj_text is not None:
            states = self.proj_text(text.tokens.to(self.proj_text.weight.dtype))
            text_valid = text.mask
            hidden = torch.cat([states, hidden], dim=1)
            # Text tokens are not rotated: their order is already in the text encoder's states.
            prefix = states.shape[1]
            cos = torch.cat([torch.ones(prefix, cos.shape[1], device=x.device), cos])
            sin = torch.cat([torch.zeros(prefix, sin.shape[1], device=x.device), sin])
        first_mask, causal_mask = (
            denoiser_attention_mask(frames, self.tokens_per_frame, self.window, future, text_valid, device=x.device)
            for future in (self.lookahead, 0)
        )
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, first_mask if index == 0 else causal_mask)
        hidden = hidden[:, hidden.shape[1] - tokens.shape[1]:]
        return self.proj_out(self.norm_out(hidden)).float().view(x.shape)

    def denoise(self, x_noisy: torch.Tensor, text: TextEmbedding | None = None, first_frame: int = 0) -> torch.Tensor:
        """``x_noisy - sigma * D(x_noisy)``: the clean latents estimated in one step (fp32)."""
        if self.noise_std is None:
            raise ValueError("the denoiser does not know its noise_std; set it (FlowModule does so from its own)")
        return x_noisy.float() - self.noise_std * self(x_noisy, text, first_frame)

    @property
    def frames_seen(self) -> tuple[int, int]:
        """How many frames before and after frame n its output depends on: ``window`` per layer back,
        ``lookahead`` ahead."""
        return self.window * len(self.layers), self.lookahead

    def denoise_stream(self, frames: Iterable[torch.Tensor], text: TextEmbedding | None = None
                       ) -> Iterator[torch.Tensor]:
        """``denoise`` of a video that arrives frame by frame (each (B, h, w, c)): yields each denoised
        frame as soon as the ``lookahead`` frames after it have arrived, computed over the frames it
        depends on only. The frames equal those of ``denoise`` over the whole video."""
        back, ahead = self.frames_seen
        seen: list[torch.Tensor] = []

        def denoised(n: int) -> torch.Tensor:
            first = max(0, n - back)
            return self.denoise(torch.stack(seen[first:n + ahead + 1], dim=1), text, first)[:, n - first]

        for frame in frames:
            seen.append(frame)
            if len(seen) > ahead:
                yield denoised(len(seen) - 1 - ahead)
        for n in range(max(0, len(seen) - ahead), len(seen)):
            yield denoised(n)
