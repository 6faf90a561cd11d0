"""Videos and frame grids for TensorBoard, without moviepy.

``SummaryWriter.add_video`` needs moviepy 1.x and, without it, prints a message and logs nothing.
A video here is written the way ``add_video`` stores it, as an animated GIF image summary, but
encoded with Pillow. TensorBoard shows it in the Images tab.
"""

from __future__ import annotations

import io

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


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 ``(T, H, W, 3)`` -> an animated GIF that loops forever."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(int(round(1000 / fps)), 20), loop=0)
    return buffer.getvalue()


def add_video_gif(writer: SummaryWriter, tag: str, videos: torch.Tensor, step: int, fps: float = 8.0) -> None:
    """Log uint8 videos ``(B, T, H, W, 3)`` side by side as one animated GIF image summary."""
    frames = tile_videos(videos)
    _, height, width, _ = frames.shape
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def tensorboard_writers(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers (empty when there are none)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
