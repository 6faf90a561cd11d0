"""Reading and writing the media users hand to and get from flowvid: images, video files, frame arrays."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace
from PIL import Image, ImageOps, UnidentifiedImageError

from flowvid.caller_warnings import warn_caller


class MediaError(ValueError):
    """A file that cannot be read as the image or video it should be, or a video that cannot be written."""


class EmptyVideo(MediaError):
    """A video file of 0 bytes (a copy or a download that never started). ``reason`` is the wording every tool
    lists it under, ``flowvid data from-videos`` too."""

    reason = "empty file"

    def __init__(self, path: Path):
        super().__init__(f"video {path}: {self.reason}")


def decode_failure(err: Exception) -> str:
    """Why a file could not be decoded, in FFmpeg's words ("Invalid data found when processing input"), with
    the line FFmpeg logged about it when PyAV kept one. PyAV prints its errors as ``[Errno 1094995529] ...:
    'path'``: an internal error code no reader can use and the path that our own message names already."""
    if not isinstance(err, av.FFmpegError) or not err.strerror:
        return str(err)
    logged = err.log[-1].strip() if err.log else ""
    return f"{err.strerror} ({logged})" if logged else err.strerror


def frame_rate(fps: float) -> Fraction:
    """``fps`` as the fraction a video stream stores (denominator at most 1000); MediaError unless it is a
    finite rate of at least 1/1000 frame per second, so that a bad rate is refused before any work."""
    rate = Fraction(fps).limit_denominator(1000) if math.isfinite(fps) else Fraction(0)
    if rate <= 0:
        raise MediaError(f"the frame rate must be a finite number of frames per second >= 0.001, got {fps}")
    return rate


# What a folder is searched for. Camcorder (.mts, .m2ts, .dv), DVD (.vob) and broadcast (.mxf) files are
# video as much as .mp4 is; a file named directly is read whatever its extension.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".avi", ".mkv", ".webm", ".mov", ".qt", ".mpg", ".mpeg", ".m2v",
                            ".ogv", ".ogg", ".flv", ".f4v", ".wmv", ".asf", ".ts", ".mts", ".m2ts", ".vob", ".dv",
                            ".mxf", ".y4m", ".3gp", ".3g2", ".gif"})
#: What ``read_frames`` reads as a video: a video file, or a ``.npy`` of frames (the exact pixels that
#: ``flowvid generate`` saves beside each ``.mp4``).
READABLE_VIDEO_SUFFIXES = VIDEO_SUFFIXES | {".npy"}


# Every YUV stream is converted from RGB with BT.601's matrix in limited range (16-235): the one FFmpeg assumes
# for a stream without colour tags, as VP8 streams and AVI files are. Where the stream can, it is tagged so:
# players guess the matrix of an untagged stream from its size (BT.709 for HD) and would shift its colours.
# The pixels themselves are sRGB, whose primaries and transfer are BT.709's.
SMPTE_170M = 6  # FFmpeg's (ITU-T H.273's) tag of BT.601's matrix; PyAV's Colorspace holds swscale's codes
YUV_COLOUR_TAGS = {"colorspace": SMPTE_170M, "color_range": ColorRange.MPEG,
                   "color_primaries": ColorPrimaries.BT709, "color_trc": ColorTrc.BT709}


#: The frame rate a video is written at when nothing says otherwise (a model whose training rate is unknown).
DEFAULT_FPS = 8.0


def write_video(path: str | Path, frames: np.ndarray, fps: float = DEFAULT_FPS, codec: str = "libx264",
                container: str | None = None) -> None:
    """uint8 frames (T, H, W, 3) -> a video file; H.264 at CRF 12, colour at half resolution, by default.

    ``ffv1`` stores the frames losslessly (RGB). Other encoders store YUV, converted with BT.601's matrix in
    limited range and tagged so (``YUV_COLOUR_TAGS``). Most keep colour at half the resolution of brightness
    (4:2:0), which needs even sides: odd ones are padded by one pixel (a copy of the last row or column), so
    such a video reads back one pixel taller or wider. ``libx265`` (HEVC) takes no side under 64 pixels and
    ``libsvtav1`` (AV1) none under 25: smaller frames are refused before the file is made (``MINIMUM_SIDE``).
    ``container`` is FFmpeg's name of the file format (``"mp4"``), by default read from the file's suffix.
    """
    rate = frame_rate(fps)
    frames = video_pixels(frames, path)
    encoder = encoder_name(codec)
    check_frame_size(frames, encoder, path)
    with open_for_writing(Path(path), container) as output:
        stream = add_video_stream(output, encoder, rate)
        frames = padded_to_whole_colour_samples(frames, stream.pix_fmt)
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            output.mux(stream.encode(encodable_frame(frame, stream.pix_fmt)))
        output.mux(stream.encode())


# The smallest side (in pixels) an encoder takes, where that is more than one pixel. libx265 refuses sides
# under 16, and below its largest coding block (64) it writes past its buffers: the process aborts on some
# sizes and goes on with corrupted memory on others. libsvtav1 refuses sides under 4, and waits forever for
# its own threads at the end of a video whose side is under 25 while the other side is over 64 (24x65 hangs,
# 24x64 and 25x4096 are written). Those bounds were measured on one SVT-AV1 release, so the whole class of
# sides under 25 is refused rather than only that corner of it.
MINIMUM_SIDE = {"libx265": 64, "libsvtav1": 25}


def check_frame_size(frames: np.ndarray, encoder: str, path: str | Path) -> None:
    """MediaError unless every side of ``frames`` (T, H, W, 3) is one ``encoder`` takes (``MINIMUM_SIDE``)."""
    height, width = frames.shape[1:3]
    minimum = MINIMUM_SIDE.get(encoder, 1)
    if min(height, width) < minimum:
        raise MediaError(f"cannot write video {path} with {encoder}: it needs frames of at least {minimum}x{minimum} "
                         f"pixels, got {height}x{width} (HxW); use libx264 or ffv1, or scale the frames up")


def add_video_stream(output: av.container.OutputContainer, encoder: str, rate: Fraction) -> av.VideoStream:
    """A stream of ``encoder`` in ``output``, in the encoder's first pixel format unless set here, YUV tagged."""
    stream = output.add_stream(encoder, rate=rate)
    if encoder == "libx264":
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "12"}
    elif encoder == "ffv1":
        stream.pix_fmt = "bgr0"
    if not av.VideoFormat(stream.pix_fmt).is_rgb:
        for tag, value in YUV_COLOUR_TAGS.items():
            setattr(stream.codec_context, tag, value)
    return stream


def padded_to_whole_colour_samples(frames: np.ndarray, pix_fmt: str) -> np.ndarray:
    """``frames`` with the last row and column repeated until each side is a whole number of the colour
    samples of ``pix_fmt`` (even sides for 4:2:0): encoders such as libx264 and libx265 refuse other sizes."""
    pixel_format = av.VideoFormat(pix_fmt)
    # A side's length over its colour sample count is how many pixels one colour sample covers.
    step_h, step_w = 64 // pixel_format.chroma_height(64), 64 // pixel_format.chroma_width(64)
    pad_h, pad_w = -frames.shape[1] % step_h, -frames.shape[2] % step_w
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def encodable_frame(rgb: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    """uint8 RGB (H, W, 3) as a frame the encoder takes; a YUV one converted with the matrix and range the
    stream is tagged with (``YUV_COLOUR_TAGS``), named rather than left to the encoder's default."""
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if av.VideoFormat(pix_fmt).is_rgb:
        return frame
    return frame.reformat(format=pix_fmt, dst_colorspace=Colorspace.ITU601, dst_color_range=ColorRange.MPEG)


def video_pixels(frames: np.ndarray, path: str | Path) -> np.ndarray:
    """``frames`` as uint8 (T, H, W, 3), at least one frame. A cast alone would wrap values outside 0-255
    and turn a float video in [0, 1] black, so only whole numbers in 0-255 pass."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3) for video {path}, got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"no frames to write to video {path}: the array holds 0 frames {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype == bool or not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"expected uint8 frames (0-255) for video {path}, got {frames.dtype}; a float video in "
                         "[0, 1] becomes uint8 with (frames * 255).round().astype(np.uint8)")
    low, high = frames.min(), frames.max()
    if low < 0 or high > 255:
        raise ValueError(f"frames for video {path} hold values from {low} to {high}, expected 0-255; "
                         "clip or rescale them to uint8")
    return frames.astype(np.uint8)


def encoder_name(codec: str) -> str:
    """FFmpeg's encoder for ``codec``: ``h264`` is ``libx264``, which gets the settings above."""
    try:
        return av.Codec(codec, "w").name
    except av.codec.codec.UnknownCodecError:
        raise MediaError(f"no video encoder {codec!r} in this FFmpeg; use libx264 (h264), mpeg4, libvpx-vp9 "
                         "or ffv1") from None


def open_for_writing(path: Path, container: str | None) -> av.container.OutputContainer:
    """``path`` opened to write a video; MediaError naming the file when its folder or format is wrong."""
    if not path.parent.is_dir():
        raise MediaError(f"cannot write video {path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise MediaError(f"cannot write video {path}: it is a folder; give a file name such as {path / 'video.mp4'}")
    try:
        return av.open(str(path), "w", format=container)
    except ValueError as err:  # an unknown suffix or container name
        raise MediaError(f"cannot write video {path}: {err}; end the name in .mp4 or .mkv, or give the "
                         "container (\"mp4\")") from None


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``frame`` (H, W, 3) to the target aspect ratio, then resize (bilinear) to (height, width)."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = min(h / height, w / width)
    crop_h, crop_w = round(height * scale), round(width * scale)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    image = Image.fromarray(frame[top:top + crop_h, left:left + crop_w])
    return np.asarray(image.resize((width, height), Image.BILINEAR))


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) a player gives a decoded frame: its display matrix. Phones
    store portrait video as landscape frames and say so there."""
    return round(frame.rotation / 90) % 4


def shown_size(frame: av.VideoFrame, pixel_aspect: Fraction | None = None) -> tuple[int, int]:
    """(width, height) of ``frame`` as a player shows it: pixels made square by the stream's sample aspect
    ratio ``pixel_aspect`` (anamorphic video: DV, DVD), then turned upright."""
    # At least one pixel: a sliver of a frame with very narrow pixels (or a damaged aspect ratio) is still a frame.
    width = max(1, round(frame.width * pixel_aspect)) if pixel_aspect and pixel_aspect != 1 else frame.width
    return (frame.height, width) if quarter_turns(frame) % 2 else (width, frame.height)


def shown_frame(frame: av.VideoFrame, pixel_aspect: Fraction | None = None, size: tuple[int, int] | None = None,
                interpolation: str | None = None) -> np.ndarray:
    """A decoded frame as uint8 RGB (H, W, 3) the way a player shows it (``shown_size``, colours converted
    with the matrix and range it is tagged with), or scaled to ``size`` = (width, height) of the shown frame."""
    turns = quarter_turns(frame)
    width, height = size or shown_size(frame, pixel_aspect)
    stored = (height, width) if turns % 2 else (width, height)
    # Named, not left to PyAV: older versions converted every frame as BT.601 whatever its tags said.
    colours = {"src_colorspace": frame.colorspace, "src_color_range": frame.color_range}
    if stored == (frame.width, frame.height):
        image = frame.to_ndarray(format="rgb24", **colours)
    else:
        image = frame.reformat(*stored, format="rgb24", interpolation=interpolation, **colours).to_ndarray()
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def read_image(path: str | Path, height: int, width: int) -> np.ndarray:
    """An image file as uint8 (height, width, 3), upright, centre-cropped and resized (``read_image_frame``)."""
    return fit_frame(read_image_frame(path), height, width)


def read_image_frame(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) at its own size, upright by its EXIF orientation (phone photos)."""
    try:
        with Image.open(path) as image:
            return rgb_pixels(ImageOps.exif_transpose(image), path)
    except FileNotFoundError:
        raise MediaError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise MediaError(f"image {path} is a folder; give an image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(f"cannot read image {path}: {err}") from None


def rgb_pixels(image: Image.Image, path: str | Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image. PIL's own conversion clips 16- and 32-bit grey values at 255
    rather than scaling them, which turns a 16-bit PNG white: they are scaled from 16 bits here."""
    if image.mode == "F":  # floating-point pixels have no range to scale from
        raise MediaError(f"cannot read image {path}: its pixels are floating-point numbers; save it with 8 or "
                         "16 bits per channel")
    if image.mode.startswith("I"):  # I;16, I;16B, I (a 16-bit PNG in older Pillow)
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def read_video(path: str | Path, height: int, width: int, max_frames: int | None = None) -> np.ndarray:
    """A video file (or a ``.npy`` array (T, H, W, 3) uint8) as uint8 (T, height, width, 3)."""
    return fit_frames(read_frames(path, max_frames), height, width)


def fit_frames(frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """uint8 frames of any size, each fitted to ``height`` x ``width`` (``fit_frame``), as one array."""
    return np.stack([fit_frame(frame, height, width) for frame in frames])


def read_frames(path: str | Path, max_frames: int | None = None) -> list[np.ndarray]:
    """The frames of a video file (or a ``.npy`` array (T, H, W, 3) uint8) as uint8, at the size a player
    shows them (``shown_frame``: square pixels, upright), every frame the file holds."""
    return read_frames_at(path, None, max_frames).frames


@dataclass(frozen=True)
class TimedFrames:
    """Frames read from a file, and their rate in frames per second: the rate asked for, else the file's own;
    None where it is unknown (a ``.npy`` array, a file that records no rate)."""

    frames: list[np.ndarray]
    fps: float | None


class SlowerVideo(MediaError):
    """A video slower than the rate it is to be read at (``fps``; its own is ``source_fps``): its frames would
    be shown more than once."""

    def __init__(self, path: Path, source_fps: float, fps: float):
        self.source_fps, self.fps = source_fps, fps
        super().__init__(f"video {path} is {source_fps:g} fps, below the {fps:g} fps it is to be read at")


def read_frames_at(path: str | Path, fps: float | None, max_frames: int | None = None) -> TimedFrames:
    """The frames of a video file (or a ``.npy`` array) as ``read_frames`` gives them, at ``fps``: output frame
    k is the frame nearest in time to k / fps after the first one (``frames_at_rate``), as ``flowvid data
    from-videos`` cuts its clips. A file at ``fps`` already, one that records no rate, a ``.npy`` array and
    ``fps=None`` give every frame as stored. SlowerVideo for a file slower than ``fps`` (``is_slower``)."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"video {path} is a folder; give a video file or a .npy array")
    if not path.is_file():
        raise MediaError(f"video {path} does not exist")
    if path.stat().st_size == 0:  # FFmpeg would call it "Invalid data"; there is no data
        raise EmptyVideo(path)
    timed = TimedFrames(read_frame_array(path, max_frames), None) if path.suffix == ".npy" else \
        decode_frames(path, fps, max_frames)
    if not timed.frames:
        raise MediaError(f"video {path} has no frames")
    return timed


def read_at_training_rate(path: str | Path, training_fps: float | None) -> TimedFrames:
    """The frames of a video file at the frame rate a model was trained at (``read_frames_at``), as ``flowvid
    score`` and the video tasks of ``flowvid generate`` read them. A model of unknown rate (None), a ``.npy``
    array and a file at the model's rate are read frame by frame; so is a file that records no rate, with a
    warning. MediaError for a file slower than the model's rate: it would show frames twice, a motion the
    model never saw."""
    try:
        timed = read_frames_at(path, training_fps)
    except SlowerVideo as err:
        raise MediaError(f"video {path} is {err.source_fps:g} fps, below the {err.fps:g} fps the model was trained "
                         "at: at that rate it would show frames twice, a motion the model never saw") from None
    if training_fps is not None and timed.fps is None and Path(path).suffix != ".npy":
        warn_caller(f"{path} records no frame rate: read frame by frame, not at the model's {training_fps:g} fps")
    return timed


def read_frame_array(path: Path, max_frames: int | None) -> list[np.ndarray]:
    frames = load_frame_array(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise MediaError(f"{path} holds {frames.dtype} {frames.shape}, expected uint8 (T, H, W, 3)")
    return list(np.array(frames[:max_frames]))


def read_image_array(path: str | Path) -> np.ndarray:
    """The image a ``.npy`` file holds, uint8 (H, W, 3): one image as ``numpy.save`` writes it, or the first
    of uint8 frames (T, H, W, 3), the only frame read."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"image {path} is a folder; give an image file or a .npy array")
    if not path.is_file():
        raise MediaError(f"image {path} does not exist")
    array = load_frame_array(path)
    if array.dtype == np.uint8 and array.ndim in (3, 4) and array.shape[-1] == 3:
        if array.ndim == 3:
            return np.array(array)
        if len(array):
            return np.array(array[0])
        raise MediaError(f"video {path} has no frames")
    raise MediaError(f"{path} holds {array.dtype} {array.shape}, expected a uint8 image (H, W, 3) or uint8 frames "
                     "(T, H, W, 3)")


def decode_frames(path: Path, fps: float | None, max_frames: int | None) -> TimedFrames:
    """A video file's frames, at ``fps`` when it is another rate that the file records (see ``read_frames_at``)."""
    frames = []
    try:
        # Tags are never read; one in another encoding (Latin-1 from old taggers) must not lose the video.
        with av.open(str(path), metadata_errors="replace") as container:
            stream = container.streams.video[0]
            rate = stream_rate(stream)  # of the frames picked: the file's own, or fps
            picked = container.decode(stream)
            if fps is not None and rate is not None and rate != Fraction(fps):
                if is_slower(rate, fps):
                    raise SlowerVideo(path, float(rate), fps)
                picked, rate = frames_at_rate(picked, Fraction(fps), rate), Fraction(fps)
            for frame in picked:
                frames.append(shown_frame(frame, stream.sample_aspect_ratio))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, IndexError) as err:
        raise MediaError(f"cannot decode video {path}: {decode_failure(err)}") from None
    return TimedFrames(frames, None if rate is None else float(rate))


# --- frame rates --------------------------------------------------------------------------------------------

#: How much slower than a target rate a source may be and still be read at it: 29.97 fps footage
#: (30000/1001) makes 30 fps clips, with a frame shown twice about once in a thousand.
RATE_TOLERANCE = 0.001


def stream_rate(stream: av.VideoStream) -> Fraction | None:
    """The frame rate of a video stream (its average, else FFmpeg's guess); None where the file records none."""
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


def is_slower(source_rate: Fraction, fps: float) -> bool:
    """Whether a source at ``source_rate`` is too slow to be read at ``fps`` (``RATE_TOLERANCE``)."""
    return source_rate < fps * (1 - RATE_TOLERANCE)


def frames_at_rate(frames: Iterable[av.VideoFrame], rate: Fraction,
                   source_rate: Fraction) -> Iterator[av.VideoFrame]:
    """For each output time ``start + k / rate``, the source frame nearest to it, from the first frame's
    time ``start`` to the end of the last frame.

    Timestamps, not frame counts, decide: a variable-rate video keeps its timing, and a frame that the
    source shows for longer than an output frame (a slow stretch of it) is given again, as a player
    would show it. A frame is nearest to the times up to the midpoint between it and the next frame;
    the last frame is taken to last as long as the interval before it.
    """
    start = previous = previous_time = None
    interval = 1 / Fraction(source_rate)  # the last frame's length when it is the only one
    index = 0  # of the next output frame
    for number, frame in enumerate(frames):
        time = frame_time(frame, number, source_rate)
        if previous_time is not None and time <= previous_time:
            continue  # shown for no time at all: a repeated or out-of-order timestamp
        if previous is None:
            start = time
        else:
            interval = time - previous_time
            while start + index / rate <= previous_time + interval / 2:
                yield previous
                index += 1
        previous, previous_time = frame, time
    if previous is None:
        return
    while start + index / rate < previous_time + interval / 2:
        yield previous
        index += 1


def frame_time(frame: av.VideoFrame, number: int, source_rate: Fraction) -> Fraction:
    """Presentation time in seconds, exact; from the frame's position where the file stores no timestamp."""
    if frame.pts is None or frame.time_base is None:
        return number / Fraction(source_rate)
    return frame.pts * frame.time_base


def load_frame_array(path: Path) -> np.ndarray:
    """A ``.npy`` file as an array mapped from the disk, so that reading a few frames of a long video reads
    only those. numpy's errors do not name the file, and on a file that is not a ``.npy`` at all it speaks
    of pickled data and ``allow_pickle``, which is no help here."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise MediaError(f"cannot read {path}: not an array saved with numpy.save (or a damaged one); "
                         "expected uint8 frames (T, H, W, 3)") from None


def contact_sheet(videos: np.ndarray, path: str | Path, max_frames: int = 8, gap: int = 2, zoom: int = 4) -> None:
    """A PNG with one row per video and one column per frame, scaled up ``zoom`` times."""
    videos = np.asarray(videos)[:, :max_frames]
    count, frames, height, width, _ = videos.shape
    sheet = np.full((count * (height + gap) + gap, frames * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for row in range(count):
        for col in range(frames):
            top, left = gap + row * (height + gap), gap + col * (width + gap)
            sheet[top:top + height, left:left + width] = videos[row, col]
    image = Image.fromarray(sheet)
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)
