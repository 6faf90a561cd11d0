"""Videos and frame grids for TensorBoard, without moviepy, and the metric its HPARAMS tab compares runs by.

``SummaryWriter.add_video`` needs moviepy 1.x and, without it, prints a message and logs nothing.
A video here is written the way ``add_video`` stores it, as an animated GIF image summary, but
encoded with Pillow. TensorBoard shows it in the Images tab.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import Summary

from flowvid.metrics.extractor import check_video


def tile_videos(videos: torch.Tensor) -> np.ndarray:
    """uint8 ``(B, T, H, W, 3)`` -> ``(T, H, B * W, 3)``: the batch side by side, as one video."""
    check_video(videos)
    batch, frames, height, width, _ = videos.shape
    return videos.detach().cpu().permute(1, 2, 0, 3, 4).reshape(frames, height, batch * width, 3).numpy()


def frame_grid(videos: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` -> image ``(3, B * H, T * W)``: one row per video, one column per frame."""
    check_video(videos)
    batch, frames, height, width, _ = videos.shape
    grid = videos.detach().cpu().permute(0, 2, 1, 3, 4).reshape(batch * height, frames * width, 3)
    return grid.permute(2, 0, 1).contiguous()


#: GIF players show a frame for at least 20 ms (a shorter delay plays as 100 ms in browsers).
MAX_GIF_FPS = 50.0


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 ``(T, H, W, 3)`` -> an animated GIF that loops forever, at ``fps`` (at most ``MAX_GIF_FPS``)."""
    if not 0 < fps <= MAX_GIF_FPS:
        raise ValueError(f"a GIF plays at more than 0 and at most {MAX_GIF_FPS:g} frames per second, got {fps!r}")
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=frame_durations_ms(len(images), fps), loop=0)
    return buffer.getvalue()


def frame_durations_ms(count: int, fps: float) -> list[int]:
    """How long each of ``count`` frames shows, in the 10 ms steps a GIF stores: frame ``k`` starts at
    ``k / fps`` seconds, rounded to 10 ms, so the video keeps its speed: one duration for all frames,
    which the GIF writer truncates to 10 ms, would play 30 fps as 33 fps."""
    starts = [math.floor(100 * k / fps + 0.5) for k in range(count + 1)]
    return [10 * (end - start) for start, end in zip(starts, starts[1:])]


def add_video_gif(writer: SummaryWriter, tag: str, videos: torch.Tensor, step: int, fps: float = 8.0) -> None:
    """Log uint8 videos ``(B, T, H, W, 3)`` side by side as one animated GIF image summary."""
    frames = tile_videos(videos)
    _, height, width, _ = frames.shape
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def tensorboard_writers(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers (empty when there are none)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


#: The metric TensorBoard's HPARAMS tab lists beside each run's settings.
COMPARED_METRIC = "val/bits_per_dim"


def without_placeholder_metric(trainer: Trainer) -> None:
    """Leave out the ``hp_metric`` of -1 that Lightning's default TensorBoard logger writes at step 0 as a
    placeholder: bits/dim may be negative, and the run's settings are compared by ``COMPARED_METRIC``
    instead (``compare_runs_by``)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._default_hp_metric = False  # the constructor's setting; Lightning builds this logger itself


def compare_runs_by(logger: object, hparams: dict, metrics: dict[str, float], step: int) -> bool:
    """Write the run's settings for TensorBoard's HPARAMS tab with ``COMPARED_METRIC`` from ``metrics`` (its
    point at ``step`` included), once a validation has measured it; whether it was written."""
    if not isinstance(logger, TensorBoardLogger) or COMPARED_METRIC not in metrics:
        return False
    logger.log_hyperparams(hparams, {COMPARED_METRIC: metrics[COMPARED_METRIC]}, step=step)
    return True
