"""One video file -> fixed-size clips: frames picked by timestamp at a target fps, centre crop, resize.

Any container and codec that PyAV's FFmpeg decodes works (mp4, avi, mkv, webm, mov, mpg, ogv; h264,
vp8/vp9, mpeg1/2/4, mjpeg, theora, ...). Frames that need no resize are PyAV's rgb24 decode,
cropped: bit for bit what the file holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from flowvid.media import EmptyVideo, decode_failure, frames_at_rate, is_slower, shown_frame, shown_size, stream_rate


class VideoSkipped(Exception):
    """A video that yields no clip; the message is the reason listed in the summary."""


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut: ``frames`` per clip of ``height`` x ``width`` pixels.

    ``fps``: target frame rate; output frame k is the source frame nearest in time to k / fps after
    the first frame (None keeps the source rate; a source slower than the target is skipped).
    ``stride``: output frames between the starts of consecutive clips (None: ``frames``, no overlap).
    """

    frames: int
    height: int
    width: int
    fps: float | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"clip frames, height and width must be >= 1, "
                             f"got {self.frames}, {self.height}, {self.width}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a finite number of frames per second > 0, got {self.fps}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


@dataclass
class Clips:
    """The clips of one file: ``starts`` are output-frame indices, ``fps`` their frame rate."""

    videos: list[np.ndarray]
    starts: list[int]
    fps: float


def read_clips(path: str | Path, spec: ClipSpec) -> Clips:
    """Decode ``path`` and cut it into uint8 clips ``(frames, height, width, 3)``; VideoSkipped says why not."""
    frames, fps = _decode(Path(path), spec)
    if len(frames) < spec.frames:
        raise VideoSkipped(f"shorter than one clip: {len(frames)} frames at {fps:g} fps, need {spec.frames}")
    video = np.stack(frames)
    starts = list(range(0, len(frames) - spec.frames + 1, spec.stride or spec.frames))
    return Clips([video[s : s + spec.frames] for s in starts], starts, fps)


def _decode(path: Path, spec: ClipSpec) -> tuple[list[np.ndarray], float]:
    if path.stat().st_size == 0:
        raise VideoSkipped(EmptyVideo.reason)
    try:
        # Titles and tags are never read; one in another encoding (Latin-1 from old taggers) must not lose the video.
        with av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.video:
                raise VideoSkipped("no video stream")
            stream = container.streams.video[0]
            source_rate = stream_rate(stream)
            rate = _output_rate(source_rate, spec.fps)
            picked = [_fit(frame, spec.height, spec.width, stream.sample_aspect_ratio)
                      for frame in frames_at_rate(container.decode(stream), rate, source_rate)]
    except av.FFmpegError as err:
        raise VideoSkipped(f"undecodable: {decode_failure(err)}") from err
    return picked, float(rate)


def _output_rate(source_rate: Fraction | None, fps: float | None) -> Fraction:
    """The clips' frame rate: ``fps``, or the source's own; VideoSkipped when the source cannot give it."""
    if not source_rate:
        raise VideoSkipped("unknown frame rate; pass --fps" if fps is None
                           else "unknown frame rate, cannot step to the target fps")
    if fps is None:
        return Fraction(source_rate)
    if is_slower(source_rate, fps):  # within 0.1% below the target passes (RATE_TOLERANCE)
        raise VideoSkipped(f"source is {float(source_rate):g} fps, below the target {fps:g} fps")
    return Fraction(fps)


def _fit(frame: av.VideoFrame, height: int, width: int, pixel_aspect: Fraction | None) -> np.ndarray:
    """Scale so the frame as a player shows it (square pixels, upright) covers height x width, then crop
    the centre."""
    shown_width, shown_height = shown_size(frame, pixel_aspect)
    scale = max(height / shown_height, width / shown_width)
    size = (max(width, round(shown_width * scale)), max(height, round(shown_height * scale)))
    image = shown_frame(frame, pixel_aspect, size, interpolation="AREA" if scale < 1 else "BICUBIC")
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])
