"""One video file -> fixed-size clips: frame stepping to a target fps, centre crop, resize.

Any container and codec that PyAV's FFmpeg decodes works (mp4, avi, mkv, webm, mov, mpg, ogv; h264,
vp8/vp9, mpeg1/2/4, mjpeg, theora, ...). Frames that need no resize are PyAV's rgb24 decode,
cropped: bit for bit what the file holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".ogv", ".ogg",
                              ".flv", ".wmv", ".ts", ".3gp", ".gif"})


class VideoSkipped(Exception):
    """A video that yields no clip; the message is the reason listed in the summary."""


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut: ``frames`` per clip of ``height`` x ``width`` pixels.

    ``fps``: target frame rate reached by stepping through the source frames (None keeps the
    source rate; a source slower than the target is skipped, frames are never repeated).
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
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
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
        raise VideoSkipped("empty file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoSkipped("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
            if spec.fps is None:
                if source_fps is None:
                    raise VideoSkipped("unknown frame rate; pass --fps")
                fps, step = source_fps, 1.0
            else:
                if source_fps is None:
                    raise VideoSkipped("unknown frame rate, cannot step to the target fps")
                if source_fps < spec.fps * 0.999:
                    raise VideoSkipped(f"source is {source_fps:g} fps, below the target {spec.fps:g} fps")
                fps, step = spec.fps, source_fps / spec.fps
            picked: list[np.ndarray] = []
            for index, frame in enumerate(container.decode(stream)):
                # Output frame k is source frame floor(k * step): uneven steps keep the average rate exact.
                if index == math.floor(len(picked) * step + 1e-6):
                    picked.append(_fit(frame, spec.height, spec.width))
    except av.FFmpegError as err:
        raise VideoSkipped(f"undecodable: {err}") from err
    return picked, fps


def _fit(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    """Scale so the frame covers height x width, then crop the centre."""
    scale = max(height / frame.height, width / frame.width)
    if scale == 1.0:
        image = frame.to_ndarray(format="rgb24")
    else:
        size = (max(width, round(frame.width * scale)), max(height, round(frame.height * scale)))
        image = frame.reformat(*size, format="rgb24", interpolation="AREA" if scale < 1 else "BICUBIC").to_ndarray()
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])
