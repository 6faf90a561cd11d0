"""Edge cases of writing videos (write_video, read back with read_frames) and of the TensorBoard sample videos."""

import io
import subprocess
import sys

import av
import lightning as L
import numpy as np
import pytest
import torch
from av.video.reformatter import Colorspace
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from data_tools.clips import ClipSpec, VideoSkipped, read_clips
from flowvid.lit.callbacks import SampleVideoLogger
from flowvid.media import MediaError, read_frames, write_video


def smooth_video(frames: int, height: int, width: int) -> np.ndarray:
    """Red grows left to right, green top to bottom, blue over time, a few levels a step: what lossy
    codecs keep well (4:2:0 chroma at half resolution blurs sharp colour edges)."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.minimum(x * 3, 255), np.minimum(y * 3, 255), np.minimum(64 + t * 8, 255)], axis=-1
                    ).astype(np.uint8)


def stream_rate_and_count(path) -> tuple:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.average_rate, stream.frames


@pytest.mark.parametrize("frames, height, width", [(6, 32, 48), (1, 16, 16), (4, 2, 200), (4, 200, 2)])
def test_a_smooth_video_reads_back_with_its_frames_size_and_colours(tmp_path, frames, height, width):
    video = smooth_video(frames, height, width)
    write_video(tmp_path / "clip.mp4", video)
    back = np.stack(read_frames(tmp_path / "clip.mp4"))
    assert back.shape == video.shape
    assert np.abs(back.astype(int) - video).mean() < 4  # H.264 at crf 12, chroma at half resolution


@pytest.mark.parametrize("height, width", [(17, 33), (1, 1), (3, 200)])
def test_odd_sides_are_padded_by_one_pixel_for_h264_and_the_picture_is_kept(tmp_path, height, width):
    video = smooth_video(4, height, width)
    write_video(tmp_path / "odd.mp4", video)
    back = np.stack(read_frames(tmp_path / "odd.mp4"))
    assert back.shape == (4, height + height % 2, width + width % 2, 3)
    assert np.abs(back[:, :height, :width].astype(int) - video).mean() < 4


@pytest.mark.parametrize("codec", ["h264", "libx264"])
def test_h264_by_its_short_name_pads_odd_sides_like_libx264(tmp_path, codec):
    write_video(tmp_path / "odd.mp4", smooth_video(3, 17, 33), codec=codec)
    assert np.stack(read_frames(tmp_path / "odd.mp4")).shape == (3, 18, 34, 3)


@pytest.mark.parametrize("fps, stored", [(0.5, 0.5), (29.97, 29.97), (240, 240), (8, 8)])
def test_low_high_and_fractional_frame_rates_keep_every_frame(tmp_path, fps, stored):
    write_video(tmp_path / "rate.mp4", smooth_video(5, 16, 16), fps=fps)
    rate, count = stream_rate_and_count(tmp_path / "rate.mp4")
    assert float(rate) == pytest.approx(stored) and count == 5
    assert len(read_frames(tmp_path / "rate.mp4")) == 5


def test_a_path_with_spaces_and_unicode_is_written_and_read(tmp_path):
    path = tmp_path / "my clips é 日本" / "vidéo 1.mp4"
    path.parent.mkdir()
    write_video(path, smooth_video(3, 16, 16))
    assert len(read_frames(path)) == 3


@pytest.mark.parametrize("frames", [np.full((2, 8, 8, 3), 0.5, dtype=np.float32),
                                    np.full((2, 8, 8, 3), 200.0),
                                    np.ones((2, 8, 8, 3), dtype=bool)])
def test_frames_that_are_not_whole_numbers_0_to_255_are_refused_rather_than_cast(tmp_path, frames):
    # A cast to uint8 would write a float video in [0, 1] as black frames.
    with pytest.raises(ValueError, match=rf"expected uint8 frames \(0-255\) for video .*clip.mp4, got {frames.dtype}"):
        write_video(tmp_path / "clip.mp4", frames)
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize("low, high", [(-1, 100), (0, 256)])
def test_integer_frames_outside_0_to_255_are_refused_rather_than_wrapped(tmp_path, low, high):
    frames = np.linspace(low, high, 2 * 8 * 8 * 3).round().astype(np.int64).reshape(2, 8, 8, 3)
    with pytest.raises(ValueError, match=f"hold values from {low} to {high}, expected 0-255"):
        write_video(tmp_path / "clip.mp4", frames)


def test_integer_frames_within_0_to_255_are_written_as_they_are(tmp_path):
    video = smooth_video(3, 16, 16)
    write_video(tmp_path / "clip.mkv", video.astype(np.int64), codec="ffv1")
    assert np.array_equal(np.stack(read_frames(tmp_path / "clip.mkv")), video)


def test_a_video_of_no_frames_is_refused_rather_than_leaving_no_file(tmp_path):
    with pytest.raises(ValueError, match=r"no frames to write to video .*empty.mp4"):
        write_video(tmp_path / "empty.mp4", np.zeros((0, 8, 8, 3), dtype=np.uint8))


def test_a_missing_folder_is_named(tmp_path):
    path = tmp_path / "not made" / "clip.mp4"
    with pytest.raises(MediaError, match=f"the folder {tmp_path / 'not made'} does not exist; create it first"):
        write_video(path, smooth_video(2, 8, 8))


@pytest.mark.parametrize("name, container, reason", [("clip", None, "Could not determine output format"),
                                                     ("clip.mp4", "nope", "no container format 'nope'")])
def test_an_unknown_file_format_names_the_file(tmp_path, name, container, reason):
    with pytest.raises(MediaError, match=f"cannot write video {tmp_path / name}: {reason}; end the name in .mp4"):
        write_video(tmp_path / name, smooth_video(2, 8, 8), container=container)


def test_an_unknown_encoder_is_named(tmp_path):
    with pytest.raises(MediaError, match="no video encoder 'x246' in this FFmpeg"):
        write_video(tmp_path / "clip.mp4", smooth_video(2, 8, 8), codec="x246")


def test_a_file_that_is_no_video_is_named_with_ffmpegs_reason_and_no_internal_error_code(tmp_path):
    """PyAV's own text, ``[Errno 1094995529] Invalid data ...: 'path'``, would show a code no reader can use
    and the path twice, in `generate` and `score` errors and in the skip list of `from-videos`."""
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(MediaError) as refused:
        read_frames(path)
    assert str(refused.value) == f"cannot decode video {path}: Invalid data found when processing input"
    with pytest.raises(VideoSkipped) as skipped:
        read_clips(path, ClipSpec(frames=2, height=8, width=8))
    assert str(skipped.value) == "undecodable: Invalid data found when processing input"


def encoder_or_skip(codec: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {codec} encoder")


def test_frames_of_a_npy_video_come_back_as_arrays_of_their_own(tmp_path):
    video = smooth_video(6, 8, 10)
    np.save(tmp_path / "clip.npy", video)
    first = read_frames(tmp_path / "clip.npy", max_frames=2)
    assert len(first) == 2 and all(type(frame) is np.ndarray and frame.flags.writeable for frame in first)
    np.save(tmp_path / "clip.npy", np.zeros_like(video))  # the file may change once it has been read
    assert np.array_equal(np.stack(first), video[:2])


@pytest.mark.parametrize("name", ["camcorder.MTS", "broadcast.ts", "old.wmv", "frames.npy", "clip.mp4"])
def test_score_and_image_to_video_know_the_videos_that_from_videos_reads(tmp_path, name):
    from flowvid.pipeline import read_start_image
    from flowvid.score import video_inputs

    video = smooth_video(3, 16, 16)
    path = tmp_path / name
    np.save(path, video) if name.endswith(".npy") else write_video(path, video, container="mpegts"
                                                                    if name.lower().endswith(("ts", "mts")) else None)
    (tmp_path / "notes.txt").write_text("not a video")
    assert list(video_inputs([tmp_path])) == [path]
    assert read_start_image(path).shape == (16, 16, 3)


# 65x129: libx265 takes no side under 64 pixels.
@pytest.mark.parametrize("codec, suffix", [("libx265", "mp4"), ("mpeg4", "mp4"), ("libvpx-vp9", "webm"),
                                           ("libsvtav1", "mkv"), ("mpeg2video", "mkv")])
def test_odd_sides_are_padded_for_every_encoder_that_halves_the_colour_resolution(tmp_path, codec, suffix):
    encoder_or_skip(codec)
    video = smooth_video(3, 65, 129)
    write_video(tmp_path / f"odd.{suffix}", video, codec=codec)
    with av.open(str(tmp_path / f"odd.{suffix}")) as container:
        pixel_format = av.VideoFormat(container.streams.video[0].codec_context.pix_fmt)
    assert (pixel_format.chroma_height(66), pixel_format.chroma_width(130)) == (33, 65)  # 4:2:0
    back = np.stack(read_frames(tmp_path / f"odd.{suffix}"))
    assert back.shape == (3, 66, 130, 3)
    assert np.abs(back[:, :65, :129].astype(int) - video).mean() < 4


WRITE_IN_ITS_OWN_PROCESS = """
import sys
import numpy as np
from flowvid.media import write_video
path, codec, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
write_video(path, np.full((3, height, width, 3), 128, dtype=np.uint8), codec=codec)
"""


def write_in_its_own_process(path, codec: str, height: int, width: int) -> subprocess.CompletedProcess:
    """Three grey frames written to ``path`` by a Python process of their own, so that an encoder that aborts
    the process or never finishes fails the test instead of taking pytest down or holding it forever."""
    seconds = 300  # a healthy write of these frames takes about one; the rest is room for a loaded machine
    try:
        return subprocess.run([sys.executable, "-c", WRITE_IN_ITS_OWN_PROCESS, str(path), codec, str(height),
                               str(width)], capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{codec} did not finish writing {height}x{width} (HxW) frames within {seconds} seconds")


# Below 64 pixels a side libx265 writes past its buffers and may abort the process. libsvtav1 refuses sides
# under 4 with an unexplained error and never finishes a video with a side under 25 and another over 64.
@pytest.mark.parametrize("codec, minimum, height, width", [
    ("libx265", 64, 8, 8), ("libx265", 64, 16, 40), ("libx265", 64, 24, 40), ("libx265", 64, 40, 16),
    ("libx265", 64, 63, 200), ("libx265", 64, 200, 48),
    ("libsvtav1", 25, 2, 64), ("libsvtav1", 25, 4, 200), ("libsvtav1", 25, 8, 200), ("libsvtav1", 25, 200, 8),
    ("libsvtav1", 25, 24, 65), ("libsvtav1", 25, 16, 16)])
def test_frames_smaller_than_the_encoder_takes_are_refused_before_any_file_is_made(tmp_path, codec, minimum,
                                                                                   height, width):
    encoder_or_skip(codec)
    path = tmp_path / "small.mkv"
    run = write_in_its_own_process(path, codec, height, width)
    assert run.returncode == 1, f"exit status {run.returncode}:\n{run.stderr[-2000:]}"
    assert run.stderr.strip().splitlines()[-1] == (
        f"flowvid.media.MediaError: cannot write video {path} with {codec}: it needs frames of at least "
        f"{minimum}x{minimum} pixels, got {height}x{width} (HxW); use libx264 or ffv1, or scale the frames up")
    assert not path.exists()


# Odd sides are padded to even ones (25 -> 26).
@pytest.mark.parametrize("codec, height, width", [("libx265", 64, 64), ("libx265", 64, 200),
                                                  ("libsvtav1", 25, 25), ("libsvtav1", 25, 200),
                                                  ("libsvtav1", 200, 26)])
def test_frames_of_the_smallest_size_the_encoder_takes_are_written(tmp_path, codec, height, width):
    encoder_or_skip(codec)
    path = tmp_path / "small.mkv"
    run = write_in_its_own_process(path, codec, height, width)
    assert run.returncode == 0, f"exit status {run.returncode}:\n{run.stderr[-2000:]}"
    assert np.stack(read_frames(path)).shape == (3, height + height % 2, width + width % 2, 3)


BT601_LIMITED_SRGB = (6, 1, 1, 1)  # H.273 codes: SMPTE 170M matrix, limited range, BT.709 primaries and transfer


@pytest.mark.parametrize("codec, suffix", [("libx264", "mp4"), ("libx265", "mkv"), ("mpeg4", "mp4"),
                                           ("libvpx-vp9", "webm")])
def test_a_yuv_stream_is_tagged_with_the_matrix_and_range_it_was_converted_with(tmp_path, codec, suffix):
    encoder_or_skip(codec)
    write_video(tmp_path / f"clip.{suffix}", smooth_video(2, 64, 64), codec=codec)
    with av.open(str(tmp_path / f"clip.{suffix}")) as container:
        stream = container.streams.video[0].codec_context
        assert (stream.colorspace, stream.color_range, stream.color_primaries, stream.color_trc) == BT601_LIMITED_SRGB


def as_a_player_shows(path) -> np.ndarray:
    """The frames decoded with the matrix and range the stream is tagged with, the way players do. Untagged,
    they guess: BT.709 for video taller than 576 lines (HD), BT.601 for smaller."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            matrix = frame.colorspace
            if matrix == 2:  # unspecified
                matrix = Colorspace.ITU709 if frame.height > 576 else Colorspace.ITU601
            frames.append(frame.to_ndarray(format="rgb24", src_colorspace=matrix, src_color_range=frame.color_range))
    return np.stack(frames)


@pytest.mark.parametrize("height, width", [(16, 16), (720, 1280)])
def test_saturated_colours_come_back_from_read_frames_and_in_players(tmp_path, height, width):
    red, green, blue, yellow = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    video = np.stack([np.full((height, width, 3), colour, dtype=np.uint8) for colour in (red, green, blue, yellow)])
    write_video(tmp_path / "colours.mp4", video)
    assert np.abs(np.stack(read_frames(tmp_path / "colours.mp4")).astype(int) - video).max() <= 4
    assert np.abs(as_a_player_shows(tmp_path / "colours.mp4").astype(int) - video).max() <= 4


class OddSizedVideos(L.LightningModule):
    """One 17x33 frame per caption."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch).square().mean()

    def generate_videos(self, captions, seed):
        return torch.from_numpy(smooth_video(1, 17, 33)).expand(len(captions), -1, -1, -1, -1).clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_tensorboard_gets_a_one_frame_odd_sized_video_and_long_unicode_captions(tmp_path):
    captions = ["un chat bleu saute 🐈 " + "très loin, " * 200, ""]
    logger = SampleVideoLogger(every_n_steps=1, captions=captions, tag="échantillons")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"),
                        callbacks=[logger], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(OddSizedVideos(), DataLoader([torch.randn(2)], batch_size=1))

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (video,) = events.Images("échantillons/video")
    assert (video.width, video.height) == (2 * 33, 17)
    gif = Image.open(io.BytesIO(video.encoded_image_string))
    assert gif.n_frames == 1 and gif.size == (2 * 33, 17)
    (grid,) = events.Images("échantillons/frames")
    assert (grid.width, grid.height) == (33, 2 * 17)
    (text,) = events.Tensors("échantillons/captions/text_summary")
    listing = text.tensor_proto.string_val[0].decode()
    assert listing == f"0. {captions[0]}\n1. (unconditional)"
