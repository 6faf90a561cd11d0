"""Videos longer than the model was trained on: a sliding window over latent frames.

The first ``window`` frames are sampled as usual. Then the window moves on by ``window - context``
frames: its last ``context`` frames are encoded again as the prefix of a fresh window (a fresh cache,
frame positions starting at 0 again, the text encoded again) and the rest of the window is sampled::

    frames   0 ............ window
                    |<- context ->|<- new ->|
                    start ......... start + window

so every frame is sampled with at most ``window`` frames in view, as in training. A given prefix that
fills the window (continuing a clip as long as the training length, or longer) is treated like an
earlier window: only its last ``context`` frames are in view of the first frames sampled, and the
whole prefix is returned as given.
"""

from __future__ import annotations

from typing import Iterator

import torch

from flowvid.checks import is_count
from flowvid.registry import SAMPLERS
from flowvid.sampling.base import Sampler, TextInput, build_sampler, check_request


def check_window(window: int, context: int) -> None:
    """A window of at least one frame, and a context that leaves it room to sample."""
    if not is_count(window) or window <= 0:
        raise ValueError(f"window must be a positive number of latent frames, got {window!r}")
    if not is_count(context) or not 0 <= context < window:
        raise ValueError(f"context must be an integer in [0, window={window}), got {context!r}")


def windows(frames: int, window: int, context: int, given: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` of every window over ``frames`` latent frames; each starts ``context`` before
    the previous end.

    ``given`` prefix frames are all in the first window when they leave room to sample; a prefix that
    fills the window is continued from its last ``context`` frames, as the end of a sampled window is.
    """
    check_window(window, context)
    if not is_count(frames) or frames <= 0 or not is_count(given) or not 0 <= given <= frames:
        raise ValueError(f"need frames > 0 and 0 <= given <= frames, got frames={frames!r}, given={given!r}")
    start = 0 if given < window else given - context
    spans = [(start, min(start + window, frames))]
    while spans[-1][1] < frames:
        start = spans[-1][1] - context
        spans.append((start, min(start + window, frames)))
    return spans


@SAMPLERS.register("windowed")
class WindowedSampler(Sampler):
    """Samples any length with ``sampler`` over windows of ``window`` latent frames.

    Args:
        sampler: the sampler of each window: an instance, a registered name or a mapping with
            ``name`` and ``init_args`` (see ``build_sampler``).
        window: latent frames in view at once; the training length of the model.
        context: frames of the previous window re-encoded as the prefix of the next, 0 <= context < window.

    ``last_stats`` lists the inner sampler's statistics for every window.
    """

    def __init__(self, sampler: str | dict | Sampler = "jacobi", window: int = 8, context: int = 4):
        check_window(window, context)
        self.sampler = build_sampler(sampler)
        self.window = window
        self.context = context
        self._window_stats: list[dict] = []

    def call_stats(self) -> dict:
        return {"window": self.window, "context": self.context, "windows": list(self._window_stats)}

    def _windows(self, z: torch.Tensor, prefix: torch.Tensor | None) -> list[tuple[int, int]]:
        given = prefix.shape[1] if prefix is not None and prefix.dim() == 5 else 0
        return windows(z.shape[1], self.window, self.context, given)

    def _check(self, flow, z, text, guidance, prefix) -> None:
        # Validated as one request over the whole video: windows only cut it up, and a prefix may be
        # longer than a window.
        check_request(flow, z, text, guidance, prefix)

    def _known(self, video: torch.Tensor | None, start: int) -> torch.Tensor | None:
        """The frames of a window that are already sampled (or given): its prefix."""
        if video is None or video.shape[1] <= start:
            return None
        return video[:, start:]

    @torch.no_grad()
    def sample(self, flow, z: torch.Tensor, text: TextInput = None, guidance: float = 0.0,
               prefix: torch.Tensor | None = None) -> torch.Tensor:
        self._check(flow, z, text, guidance, prefix)
        self._window_stats = []
        video = None if prefix is None else prefix.float()
        for start, end in self._windows(z, prefix):
            known, lost = _stand_in_for_lost(self._known(video, start))
            part = self.sampler.sample(flow, z[:, start:end], text, guidance, known)
            self._window_stats.append(self.sampler.last_stats)
            new = _lost(part if known is None else part[:, known.shape[1]:], lost)
            video = new if video is None else torch.cat([video, new], dim=1)
        return video

    @torch.no_grad()
    def stream(self, flow, z: torch.Tensor, text: TextInput = None, guidance: float = 0.0,
               prefix: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield each frame as soon as it is sampled, holding only the frames a later window re-encodes."""
        self._check(flow, z, text, guidance, prefix)
        stats = self._window_stats = []  # this call's; another call may run while this one waits
        spans = self._windows(z, prefix)
        # The latest frames (given or sampled) by their index in the video: the next window's prefix.
        recent = {} if prefix is None else dict(enumerate(prefix.unbind(1)))
        for number, (start, end) in enumerate(spans):
            context = [recent[i] for i in sorted(recent) if i >= start]
            known, lost = _stand_in_for_lost(torch.stack(context, dim=1) if context else None)
            first_new = start + (0 if known is None else known.shape[1])
            stats.append({})
            for offset, frame in enumerate(self.sampler.stream(flow, z[:, start:end], text, guidance, known)):
                frame = _lost(frame, lost)
                recent[first_new + offset] = frame
                # Kept up to date frame by frame: a caller that stops after the frames it asked for (or
                # early) still finds the statistics of every frame it was given.
                stats[-1] = self.sampler.last_stats
                self._window_stats = stats
                yield frame
            next_start = spans[number + 1][0] if number + 1 < len(spans) else end
            recent = {i: frame for i, frame in recent.items() if i >= next_start}


def _stand_in_for_lost(known: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A window's prefix, with zeros standing in for the videos an earlier window lost (non-finite values,
    from too strong a guidance, say), so that the others go on; and which videos those are (None: none)."""
    if known is None:
        return None, None
    lost = ~torch.isfinite(known).flatten(1).all(dim=1)
    if not lost.any():
        return known, None
    return torch.where(lost.view(-1, *[1] * (known.dim() - 1)), torch.zeros_like(known), known), lost


def _lost(frames: torch.Tensor, lost: torch.Tensor | None) -> torch.Tensor:
    """``frames`` with the lost videos' values NaN: they stay failed, however well the stand-in sampled."""
    if lost is None:
        return frames
    return frames.masked_fill(lost.view(-1, *[1] * (frames.dim() - 1)), float("nan"))
