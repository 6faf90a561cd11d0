"""``VideoPipeline``: a trained model and its sampler, ready to generate from Python.

::

    from flowvid import VideoPipeline

    pipe = VideoPipeline.from_pretrained("exported/model.safetensors")     # or a .ckpt / DeepSpeed directory
    out = pipe(["a red circle moves left"], seed=0)                          # out.videos: uint8 (B, T, H, W, 3)
    out = pipe(["a red circle moves left"], task="i2v", image=first_frame)   # (H, W, 3) uint8, an image or a video file
    out = pipe(["..."], task="extend", video="clip.mp4", frames=16)
    out = pipe(["..."], task="v2v", video="clip.mp4", frames=16)              # the source, then new frames
    pipe.sampler = SequentialSampler()                                       # swap it, like a scheduler
    pipe.to("cuda", precision="bf16-mixed")                                  # move it, as in diffusers
    pipe.score(video, caption="a red circle moves left")                     # exact bits/dim, per frame too
    for frame in pipe.stream("a red circle moves left", frames=32): ...     # (1, H, W, 3), each once final

It is what ``flowvid generate`` runs, without the files: the same seeds give the same videos. Sample
``i`` of a call draws its noise from ``seed + i``, so a sample does not depend on the batch it is
sampled in, but for float rounding (about 1e-6 in the latents); ``videos_per_prompt=N`` samples each
prompt N times in a row, as the prompt repeated would.
The sampler stands apart from the model: ``sampler`` is any registered sampler, used as it is for the
training length and inside a sliding window (``WindowedSampler``) for longer videos.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from flowvid.caller_warnings import warn_caller
from flowvid.checks import is_blank, is_integer
from flowvid.media import (
    DEFAULT_FPS,
    READABLE_VIDEO_SUFFIXES,
    fit_frames,
    read_at_training_rate,
    read_frames,
    read_image_array,
    read_image_frame,
)
from flowvid.other_names import (
    DIFFUSERS_CALL_NAMES,
    DIFFUSERS_LOAD_NAMES,
    DIFFUSERS_MOVE_NAMES,
    SCORE_NAMES,
    other_names,
)
from flowvid.placement import precision_context, resolve_device, resolve_precision
from flowvid.sampling import JacobiSampler, Sampler, WindowedSampler, build_sampler, sampler_class
from flowvid.sampling.tasks import TASKS, check_seed, encode_text, task_caption, task_inputs

#: Jacobi's default tolerance per precision: bf16 matmuls leave a relative noise of 1e-3 to 3e-3 in every
#: pass, below which a block's change need not fall (it would then run to max_iterations).
DEFAULT_TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 1e-2}

#: What to try when a video comes out NaN or infinite.
NON_FINITE_ADVICE = "lower the guidance, sample in 32-true, or use the sequential sampler"

#: ``on_frame(index, latents)``: the final latents (B, h, w, c) of frame ``index`` of a batch, as soon as known.
FrameCallback = Callable[[int, torch.Tensor], None]


def model_sampler(model) -> tuple[str, dict[str, Any]]:
    """The registered name (or class path) and settings of the sampler the model was configured with
    (``FlowModule(sampler=...)``)."""
    return name_and_settings(getattr(model, "sampler_spec", "jacobi"))


def name_and_settings(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered name (or class path) and settings of a sampler as a recipe writes it."""
    if isinstance(spec, str):
        return spec, {}
    return spec.get("name") or spec["class_path"], dict(spec.get("init_args") or {})


def is_windowed(name: str) -> bool:
    """Whether the sampler a registered name or class path names samples in windows (``WindowedSampler``)."""
    return issubclass(sampler_class(name), WindowedSampler)


def window_sampler(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The name and settings of the sampler of each window, from a ``WindowedSampler``'s settings."""
    default = inspect.signature(WindowedSampler).parameters["sampler"].default
    return name_and_settings(settings.get("sampler", default))


def build_named_sampler(name: str, init_args: dict[str, Any]) -> Sampler:
    """A sampler from a registered name, or from the import path of a plugin's class."""
    return build_sampler(sampler_spec(name, init_args))


def sampler_spec(name: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """A sampler as a recipe writes it, from a registered name or the import path of a plugin's class."""
    return {"class_path" if "." in name else "name": name, "init_args": init_args}


def sampler_takes(name: str, setting: str) -> bool:
    """Whether the sampler a registered name or class path names takes ``setting`` (``tol``, say)."""
    return setting in inspect.signature(sampler_class(name)).parameters


def default_sampler(model, precision: str) -> Sampler:
    """The model's own sampler, Jacobi at the precision's tolerance unless the model sets one."""
    name, settings = model_sampler(model)
    return build_named_sampler(name, with_default_tolerance(name, settings, precision))


def takes_the_precisions_tolerance(name: str) -> bool:
    """Whether a sampler left without ``tol`` gets the precision's (``DEFAULT_TOLERANCE``): a Jacobi sampler
    whose own default is ``JacobiSampler``'s. A plugin that chose another default keeps it."""
    cls = sampler_class(name)
    return issubclass(cls, JacobiSampler) and _tol_default(cls) in (None, _tol_default(JacobiSampler))


def _tol_default(cls: type) -> Any:
    """The default of ``tol`` in ``cls``'s signature; None where it takes ``tol`` only through ``**kwargs``."""
    parameter = inspect.signature(cls).parameters.get("tol")
    return None if parameter is None else parameter.default


def with_default_tolerance(name: str, settings: dict[str, Any], precision: str) -> dict[str, Any]:
    """``settings`` with the precision's tolerance for a Jacobi sampler that sets none, be it the sampler
    itself or the sampler of each window of a ``WindowedSampler``."""
    if takes_the_precisions_tolerance(name):
        return {"tol": DEFAULT_TOLERANCE[precision], **settings}
    if is_windowed(name):
        inner, inner_settings = window_sampler(settings)
        return {**settings, "sampler": sampler_spec(inner, with_default_tolerance(inner, inner_settings, precision))}
    return settings


class GenerateError(ValueError):
    """A request that cannot be generated; the message is one line for the user."""


def check_per_prompt(count: Any, name: str = "videos_per_prompt") -> None:
    """Refuse a number of videos per prompt that is not a whole number >= 1 (``True`` is no count)."""
    if not is_integer(count) or count < 1:
        raise GenerateError(f"{name} must be an integer >= 1, got {count!r}")


def prompt_list(prompts: Any) -> list[Any]:
    """The items of a sequence of prompts; a single prompt of another type than a string (a number, say) is
    refused as ``prompts_for`` refuses one inside a list."""
    try:
        return list(prompts)
    except TypeError:
        raise GenerateError(f"prompts must be strings, got {prompts!r} ({type(prompts).__name__})") from None


def check_denoise(denoise: Any) -> None:
    """``denoise`` is a switch: a string such as "tweedie" would otherwise count as True without a word."""
    if not isinstance(denoise, (bool, np.bool_)):
        raise GenerateError(f"denoise must be True or False, got {denoise!r}")


def each_prompt_repeated(prompts: list[str], times: int) -> list[str]:
    """``prompts`` with each one ``times`` in a row, as diffusers orders its videos per prompt: video ``i``
    still draws from ``seed + i``, so each is the video that the prompt repeated by hand gives."""
    return [prompt for prompt in prompts for _ in range(int(times))]


#: The weights ``from_pretrained`` loads: the moving average (when the run kept one) or the trained ones.
WEIGHTS = ("ema", "trained")


def check_sampler_given(sampler: Any) -> None:
    """A sampler given to a pipeline must be one already built: a name would only fail at the first call."""
    if sampler is not None and not isinstance(sampler, Sampler):
        raise GenerateError(f"sampler must be a Sampler instance (such as SequentialSampler()), got {sampler!r}; "
                            "build a registered one by name with flowvid.sampling.build_sampler")


def check_window_fits(window: int, trained: int) -> None:
    """A window of at most the model's training length: the model never saw more frames in view at once,
    and every frame sampled with more would pay for it in quality without a word."""
    if window > trained:
        raise GenerateError(f"the sampler's window of {window} latent frames is longer than the model's training "
                            f"length of {trained}; use WindowedSampler(window={trained}) or fewer")


@contextlib.contextmanager
def refused_as_generate_error():
    """Checks of a request raise GenerateError, whatever part of flowvid finds the fault (a seed out of
    range, a frame count the codec cannot encode, a file that cannot be read): callers catch one error."""
    try:
        yield
    except GenerateError:
        raise
    except ValueError as err:  # MediaError, ScoreError, a codec's or check_seed's refusal
        raise GenerateError(str(err)) from err


@dataclass
class GeneratedVideos:
    """What a pipeline call returns.

    Attributes:
        videos: a uint8 numpy array (B, T, H, W, 3), the given frames of ``i2v`` / ``extend`` / ``v2v`` as given.
        latents: a float32 numpy array (B, T, h, w, c), denoised (unless the call set ``denoise=False``),
            before decoding.
        captions: the captions the model saw (with the task's prefix).
        seeds: the noise seed of each video.
        timings: seconds spent sampling, denoising and decoding, summed over the batches.
        sampler_stats: the sampler's ``last_stats`` of each batch (Jacobi: passes per block).
        fps: the frame rate to play the videos at, the pipeline's ``fps``.

    ``failed`` lists the videos whose latents came out NaN or infinite: their frames mean nothing.
    """

    videos: np.ndarray
    latents: np.ndarray
    captions: list[str]
    seeds: list[int]
    timings: dict[str, float]
    sampler_stats: list[dict[str, Any]]
    fps: float = DEFAULT_FPS

    @property
    def failed(self) -> list[int]:
        return [index for index, latents in enumerate(self.latents) if not np.isfinite(latents).all()]

    @classmethod
    def concatenate(cls, parts: list["GeneratedVideos"]) -> "GeneratedVideos":
        """The videos of several batches as one result."""
        return cls(
            videos=np.concatenate([part.videos for part in parts]),
            latents=np.concatenate([part.latents for part in parts]),
            captions=[caption for part in parts for caption in part.captions],
            seeds=[seed for part in parts for seed in part.seeds],
            timings={name: sum(part.timings[name] for part in parts) for name in parts[0].timings},
            sampler_stats=[stats for part in parts for stats in part.sampler_stats],
            fps=parts[0].fps,
        )


class VideoPipeline:
    """Generates videos from a trained ``FlowModule`` (see the module's docstring).

    Args:
        model: the trained model (``flowvid.loading.load_model`` gives one), in eval mode.
        sampler: inverts the flow; default: the model's own (``FlowModule(sampler=...)``, as a diffusers
            pipeline loads the scheduler saved with its model), Jacobi at the precision's tolerance
            unless that sets one.
        precision: ``"32-true"`` or ``"bf16-mixed"`` (the network under bf16 autocast, sampling math fp32).
    """

    def __init__(self, model, sampler: Sampler | None = None, precision: str = "32-true"):
        if precision not in DEFAULT_TOLERANCE:
            raise GenerateError(f"precision must be one of {', '.join(DEFAULT_TOLERANCE)}, got {precision!r}")
        self.model = model.eval()
        self.precision = precision
        self.sampler = sampler

    @property
    def sampler(self) -> Sampler:
        """Inverts the flow; assign a ``Sampler`` instance to swap it, or None for the model's own."""
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: Sampler | None) -> None:
        check_sampler_given(sampler)
        # The model's own sampler takes the precision's tolerance, so ``to`` rebuilds it; a given one is kept.
        self.uses_default_sampler = sampler is None
        self._sampler = default_sampler(self.model, self.precision) if sampler is None else sampler

    @classmethod
    @other_names(DIFFUSERS_LOAD_NAMES)
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                        weights: str = "ema", sampler: Sampler | None = None, lora: str | os.PathLike | None = None,
                        lora_strength: float = 1.0) -> "VideoPipeline":
        """Load a trained model and its sampler, as ``flowvid generate --ckpt`` does.

        Args:
            path: an export, the folder holding it, a Lightning checkpoint, a DeepSpeed directory, or a
                run directory (its newest readable checkpoint).
            device: ``"auto"`` (the first CUDA GPU, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            precision: ``"auto"`` (bf16-mixed on a GPU that supports it, else fp32), ``"32-true"`` or
                ``"bf16-mixed"``.
            weights: ``"ema"`` (the moving average when the run kept one, else the trained weights) or
                ``"trained"``.
            sampler: a ``Sampler`` instance; default: the model's own (see the class).
            lora: a file of adapters (``flowvid export --adapters-only``) to merge into the weights.
            lora_strength: the factor on the adapters' updates.
        """
        from flowvid.loading import load_model

        with refused_as_generate_error():  # before the model loads: a slip costs no wait
            placed = resolve_device(device, setting="device")
            precision = resolve_precision(precision, placed, setting="precision")
        if weights not in WEIGHTS:
            raise GenerateError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        check_sampler_given(sampler)
        model = load_model(path, weights=weights, map_location=placed, adapters=lora, adapter_strength=lora_strength)
        return cls(model, sampler, precision)

    @other_names(DIFFUSERS_MOVE_NAMES)
    def to(self, device: str | torch.device | None = None, precision: str | None = None) -> "VideoPipeline":
        """Move the model to ``device`` and sample at ``precision``, each as ``from_pretrained`` takes
        it (None: as now); returns the pipeline, as a diffusers pipeline's ``to`` does. The model's own
        sampler follows the precision's tolerance; a sampler given to the pipeline is kept as it is.

        Raises:
            GenerateError: a device or precision that cannot be used here, before anything moves.
        """
        with refused_as_generate_error():
            placed = self.device if device is None else resolve_device(str(device), setting="device")
            precision = self.precision if precision is None else resolve_precision(precision, placed,
                                                                                  setting="precision")
        self.model.to(placed)
        self.precision = precision
        if self.uses_default_sampler:
            self.sampler = None
        return self

    def __repr__(self) -> str:
        model = self.model
        text_encoder = type(model.text_encoder).__name__ if model.text_encoder is not None else None
        return (f"VideoPipeline(video_shape={model.video_shape}, codec={model.codec.name!r}, "
                f"text_encoder={text_encoder}, sampler={self.sampler!r}, device={self.device}, "
                f"precision={self.precision!r})")

    @property
    def device(self) -> torch.device:
        """Where the model is, and where it samples."""
        return self.model.device

    @property
    def fps(self) -> float:
        """The frame rate the videos play at: the model's training rate where its checkpoint or export records
        it (``model.training_fps``), else 8, as ``flowvid generate`` writes them. A video file given to a call
        or to ``score`` is read at the training rate."""
        return playback_fps(self.model)

    @property
    def reads_text(self) -> bool:
        """Whether the model reads captions; an unconditional one has no text encoder."""
        return self.model.text_encoder is not None

    @other_names(DIFFUSERS_CALL_NAMES)
    def __call__(self, prompts: str | Sequence[str] | None = None, *, task: str = "t2v",
                 image: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
                 video: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
                 frames: int | None = None, guidance: float | None = None, negative_prompt: str | None = "",
                 seed: int = 0, batch_size: int = 8, videos_per_prompt: int = 1,
                 denoise: bool = True) -> GeneratedVideos:
        """Videos for ``prompts`` (``videos_per_prompt`` each; an unconditional model takes none and samples
        ``videos_per_prompt``).

        Args:
            prompts: a caption, or a sequence of them (a list, a tuple, an array of strings).
            task: ``t2v``, ``i2v`` (needs ``image``), ``extend`` or ``v2v`` (need ``video``).
            image, video: uint8 frames (H, W, 3) / (T, H, W, 3) at the model's size, or a file to read
                and resize; the image may be a video file, whose first frame it is.
            frames: frames to generate, the given image or clip included (default: the training length;
                for ``extend`` and ``v2v``, the clip followed by one training length of new frames); longer
                videos than the training length slide a window.
            guidance: classifier-free guidance weight (default: the model's).
            negative_prompt: a caption guidance steers away from instead of the empty one ("" or None: none).
            seed: video ``i`` draws its noise from ``seed + i`` (every one from 0 to 2**32 - 1).
            batch_size: videos sampled together.
            videos_per_prompt: videos of each prompt, in a row: those of ``["a", "b"]`` with 2 are those of
                ``["a", "a", "b", "b"]``, seeds included.
            denoise: end with the model's denoising step (its learned denoiser, else a Tweedie step through
                the flow); False decodes the sampled latents as they are.

        Returns:
            ``GeneratedVideos``: ``videos`` uint8 (B, T, H, W, 3) in 0..255, ``latents`` and the rest.

        Raises:
            GenerateError: a request that cannot be sampled, before any sampling.
        """
        prompts, seeds, frames, guidance, negative_prompt, source = self._request(
            prompts, task, image, video, frames, guidance, negative_prompt, seed, batch_size, videos_per_prompt)
        check_denoise(denoise)
        parts = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            parts.append(self.generate_batch(batch, seeds[start:start + batch_size], source, task=task, frames=frames,
                                             guidance=guidance, negative_prompt=negative_prompt, denoise=denoise))
        result = GeneratedVideos.concatenate(parts)
        failed = result.failed
        if failed:
            warn_caller(f"videos {failed} came out NaN or infinite ({NON_FINITE_ADVICE}); "
                        "GeneratedVideos.failed lists them")
        return result

    @other_names(SCORE_NAMES)
    @torch.no_grad()
    def score(self, video: np.ndarray | torch.Tensor | str | os.PathLike, caption: str = "",
              seed: int = 0) -> dict[str, Any]:
        """The exact likelihood of a video under ``caption``, as ``flowvid score`` gives it: ``bits_per_dim``
        and ``bits_per_dim_per_frame`` of uint8 frames (T, H, W, 3) at the model's size, or of a video
        file. Always in fp32 (scores are exact); ``seed`` fixes the pixel codec's dequantisation noise."""
        from flowvid.score import ScoreError, check_caption, score_video  # flowvid.score reads generate's file names

        if not isinstance(caption, str):  # the text encoder would refuse it only after the video is encoded
            raise GenerateError(f"caption must be a string ('' for none), got {caption!r}")
        with refused_as_generate_error():
            check_caption(self.model, caption, name="caption")
            check_seed(seed)  # torch keeps 32 bits: seed -1 would silently be seed 2**32 - 1
            frames, _ = _frames(video, self.model, "video")
        try:
            return score_video(self.model, frames, caption, torch.Generator().manual_seed(int(seed)))
        except ScoreError as err:  # a video too short to score, found as it is cut into clips
            raise GenerateError(str(err)) from err

    # --- checks, before any work -----------------------------------------------------------------

    def _request(self, prompts, task, image, video, frames, guidance, negative_prompt, seed, batch_size,
                 videos_per_prompt=1):
        """The prompts (each ``videos_per_prompt`` times in a row), their seeds, the frames, guidance,
        negative prompt and conditioning frames of a call, with the model's defaults filled in, checked
        before any work. Counts and seeds come back
        as ints, whatever integer type (numpy's) they were given in."""
        # A sequence of prompts may be an array, whose truth value is ambiguous: only None means none. Bytes
        # are one prompt in the wrong type, not a sequence of integers.
        one_prompt = isinstance(prompts, (str, bytes))
        check_per_prompt(videos_per_prompt)
        prompts = each_prompt_repeated(
            self.prompts_for([prompts] if one_prompt else [] if prompts is None else prompt_list(prompts)),
            videos_per_prompt)
        guidance = self.model.guidance if guidance is None else guidance
        asked = frames
        frames = self.model.video_shape[0] if frames is None else frames  # checked before the clip is read
        negative_prompt = "" if negative_prompt is None else negative_prompt  # None, as diffusers pipelines take
        self.check(task, frames, guidance, negative_prompt, seed, batch_size, count=len(prompts))
        source = self.source_frames(task, image, video)
        if asked is None:
            frames = default_frames(self.model, task, source)
        self.check_room(task, frames, source)
        seeds = list(range(int(seed), int(seed) + len(prompts)))
        return prompts, seeds, int(frames), guidance, negative_prompt, None if source is None else source.frames

    def prompts_for(self, prompts: list[str]) -> list[str]:
        """At least one caption for a model that reads text; none but empty ones for an unconditional
        model, which samples one video when given none."""
        not_text = [prompt for prompt in prompts if not isinstance(prompt, str)]
        if not_text:
            raise GenerateError(f"prompts must be strings, got {not_text[0]!r} ({type(not_text[0]).__name__})")
        if self.reads_text:
            if not prompts:
                raise GenerateError("give at least one prompt")
            blank = [prompt for prompt in prompts if prompt and is_blank(prompt)]
            if blank:  # it would be sampled as the empty caption, unconditionally, without a word
                raise GenerateError(f"prompt {blank[0]!r} holds only whitespace or invisible characters; "
                                    "give a caption, or '' for an unconditional sample")
            return prompts
        if any(prompts):
            raise GenerateError("this model is unconditional (trained without text) and takes no prompt "
                                "('' for each of several samples)")
        return prompts or [""]

    def check(self, task: str, frames: int, guidance: float, negative_prompt: str, seed: int, batch_size: int,
              count: int = 1) -> None:
        """Refuse a request of ``count`` videos that cannot be sampled, before any work."""
        if task not in TASKS:
            raise GenerateError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if not (is_integer(frames) and is_integer(batch_size)) or frames < 1 or batch_size < 1:
            raise GenerateError(f"frames and batch_size must be integers >= 1, got {frames!r} and {batch_size!r}")
        with refused_as_generate_error():
            check_seed(seed, count)
            self.model.codec.latent_frames(frames)
        # A bool is no weight: True would run as guidance 1.0.
        if not (isinstance(guidance, numbers.Real) and not isinstance(guidance, bool) and math.isfinite(guidance)
                and guidance >= 0):
            raise GenerateError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if not isinstance(negative_prompt, str):
            raise GenerateError(f"negative_prompt must be a string ('' for none), got {negative_prompt!r}")
        if negative_prompt:
            if is_blank(negative_prompt):  # it would steer away from a caption of no words, not the empty one
                raise GenerateError(f"negative prompt {negative_prompt!r} holds only whitespace or invisible "
                                    "characters; give a caption, or '' to steer away from the empty caption")
            if not self.reads_text:
                raise GenerateError("this model is unconditional (trained without text) and takes no negative prompt")
            if guidance <= 0:
                raise GenerateError(f"a negative prompt steers guidance, which is off (guidance {guidance}); "
                                    "give guidance > 0")
        if guidance > 0 and not self.reads_text:  # guidance contrasts captions, which this model cannot read
            raise GenerateError(f"this model is unconditional (trained without text) and cannot be guided "
                                f"(guidance {guidance}); give guidance 0")

    def check_room(self, task: str, frames: int, source: "Source | None") -> None:
        """Refuse a video no longer than its given frames: there would be nothing to sample. The last check
        of a request; only a request that passes them all is then warned of a task the model never trained."""
        if source is not None:
            given_frames = source.frames.shape[1]
            if given_frames >= self.model.codec.usable_frames(frames):
                given = "the image" if task == "i2v" else f"the video's {given_frames} frames"
                raise GenerateError(f"{task}: {frames} frames leave nothing to sample after {given}; ask for more "
                                    f"than {given_frames} frames (the result starts with the given ones)")
        warn_if_untrained(self.model, task, self.reads_text)

    def source_frames(self, task: str, image, video) -> "Source | None":
        """The task's conditioning frames, read once, or None for t2v."""
        return read_source(self.model, task, image, video)

    # --- one batch -------------------------------------------------------------------------------

    def sampler_for(self, latent_frames: int) -> Sampler:
        """The sampler for a video of ``latent_frames``: beyond the trained length, a window of that length
        that keeps half of it in view (none for a model of single frames, whose frames are independent),
        unless the sampler is a ``WindowedSampler`` already, whose own window (at most the training length)
        is then the one used."""
        trained = self.model.latent_shape[0]
        if isinstance(self.sampler, WindowedSampler):
            check_window_fits(self.sampler.window, trained)
            return self.sampler
        if latent_frames > trained:
            return WindowedSampler(self.sampler, window=trained, context=trained // 2)
        return self.sampler

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], seeds: list[int], source: torch.Tensor | None, *, task: str = "t2v",
                       frames: int | None = None, guidance: float = 0.0, negative_prompt: str = "",
                       on_frame: FrameCallback | None = None, denoise: bool = True) -> GeneratedVideos:
        """Sample, denoise (unless ``denoise=False``) and decode one batch, checked already (``__call__``
        checks and batches).

        With ``on_frame`` the video is sampled frame by frame and denoised as it comes (``stream``), and
        ``on_frame(index, latents)`` receives each frame's final latents (B, h, w, c) as soon as they are
        known; the timings then count the interleaved denoising as sampling."""
        with self._precision():
            batch = self._prepare(prompts, seeds, source, task, frames or self.model.video_shape[0], guidance,
                                  negative_prompt)
            started = time.perf_counter()
            if on_frame is None:
                latents = batch.sampler.sample(self.model.flow, batch.z, batch.text, guidance, batch.prefix)
                check_sampled(batch.sampler, latents, batch.z.shape, "sample")
                sampled = time.perf_counter()
                if denoise:
                    latents = self.model.denoise(latents, batch.cond)
                if batch.known is not None:  # the given frames come back exactly as given
                    latents[:, :batch.known.shape[1]] = batch.known
            else:
                final = []
                for index, frame in enumerate(self._final_frames(batch, guidance, denoise)):
                    on_frame(index, frame)
                    final.append(frame)
                latents = torch.stack(final, dim=1)
                sampled = time.perf_counter()
            denoised = time.perf_counter()
            videos = self.model.codec.decode(latents)
            if source is not None:  # as given, not as the codec gives them back (a VAE does not exactly)
                videos[:, :source.shape[1]] = source.to(videos.device)
            decoded = time.perf_counter()
        return GeneratedVideos(
            videos=videos.cpu().numpy(), latents=latents.float().cpu().numpy(), captions=batch.captions,
            seeds=list(seeds), timings={"sample_seconds": sampled - started, "denoise_seconds": denoised - sampled,
                                        "decode_seconds": decoded - denoised},
            sampler_stats=[batch.sampler.last_stats], fps=self.fps,
        )

    @other_names(DIFFUSERS_CALL_NAMES)  # outside no_grad, which must see the generator function to cover it
    @torch.no_grad()
    def stream(self, prompts: str | Sequence[str] | None = None, *, task: str = "t2v",
               image: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
               video: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
               frames: int | None = None, guidance: float | None = None, negative_prompt: str | None = "",
               seed: int = 0, videos_per_prompt: int = 1, denoise: bool = True) -> Iterator[np.ndarray]:
        """The frames of the videos for ``prompts`` (sampled together; arguments as for a call), uint8
        (B, H, W, 3) each, in order, as soon as each is final: sampled, denoised and decoded. Each
        prompt is sampled ``videos_per_prompt`` times in a row, from the seeds a call gives those videos.

        The learned denoiser needs the ``lookahead`` frames after a frame, so frames come that many
        behind the sampler; without a denoiser (the Tweedie step reads every later frame), or with a
        codec that decodes frames in groups, they come once the video is done. The videos equal a
        call's up to the sampler's tolerance (the frames are sampled one at a time). With
        ``denoise=False`` each frame comes as soon as it is sampled."""
        prompts, seeds, frames, guidance, negative_prompt, source = self._request(
            prompts, task, image, video, frames, guidance, negative_prompt, seed, batch_size=1,
            videos_per_prompt=videos_per_prompt)
        check_denoise(denoise)
        codec = self.model.codec
        by_frame = codec.temporal_factor == 1 and not codec.causal_first_frame
        with self._precision():
            batch = self._prepare(prompts, seeds, source, task, frames, guidance, negative_prompt)
            final = self._final_frames(batch, guidance, denoise)
        # The frames that come back as given: none for t2v, yet shaped as frames, to be written into a video.
        given = np.zeros((0, *self.model.video_shape[1:], 3), np.uint8) if source is None else source[0].numpy()
        # Autocast is entered for each step only: a caller's code between two frames runs without it.
        held = []
        for index in itertools.count():
            with self._precision():
                frame = next(final, None)
                if frame is not None and by_frame and index >= len(given):
                    pixels = codec.decode(frame[:, None])[:, 0].cpu().numpy()
            if frame is None:
                break
            if by_frame:
                yield np.repeat(given[None, index], len(prompts), axis=0) if index < len(given) else pixels
            else:
                held.append(frame)
        if held:
            with self._precision():
                videos = codec.decode(torch.stack(held, dim=1)).cpu().numpy()
            videos[:, :len(given)] = given
            yield from videos.swapaxes(0, 1)

    # --- one batch, inside -----------------------------------------------------------------------

    def _precision(self):
        return precision_context(self.precision, self.device)

    def _prepare(self, prompts, seeds, source, task, frames, guidance, negative_prompt) -> "_Batch":
        """Noise, prefix, text and sampler of one batch."""
        model = self.model
        latent_frames = model.codec.latent_frames(frames)
        known = None if source is None else model.codec.encode(source.to(model.device)).float()
        per_sample = [task_inputs(task, [prompt], latent_frames, tuple(model.latent_shape[1:]), seed, known,
                                  model.noise_std, model.device, negative_prompt)
                      for prompt, seed in zip(prompts, seeds)]
        captions = [caption for inputs in per_sample for caption in inputs.captions]
        text = encode_text(model.text_encoder, captions, guidance, per_sample[0].uncond_caption)
        return _Batch(
            z=torch.cat([inputs.z for inputs in per_sample]),
            prefix=None if known is None else torch.cat([inputs.prefix for inputs in per_sample]),
            known=known, captions=captions, text=text, cond=getattr(text, "cond", text),
            sampler=self.sampler_for(latent_frames),
        )

    def _final_frames(self, batch: "_Batch", guidance: float, denoise: bool = True) -> Iterator[torch.Tensor]:
        """Each frame's final latents (B, h, w, c), in order, as soon as they are known: the given frames
        as given, the sampled ones once the denoiser has what it needs (as sampled with ``denoise=False``)."""
        given = [] if batch.prefix is None else list(batch.prefix.unbind(1))
        frame_shape = (batch.z.shape[0], *batch.z.shape[2:])
        sampled = (check_sampled(batch.sampler, frame, frame_shape, "stream")
                   for frame in batch.sampler.stream(self.model.flow, batch.z, batch.text, guidance, batch.prefix))
        frames = itertools.chain(given, sampled)
        for index, frame in enumerate(self.model.denoise_stream(frames, batch.cond) if denoise else frames):
            yield batch.known[:, index].expand_as(frame) if index < len(given) else frame


#: The tasks a model learns only when its training drew them, by the FlowModule setting that draws them.
TRAINED_BY = {"extend": "extend_prob", "v2v": "v2v_prob"}


def warn_if_untrained(model, task: str, reads_text: bool) -> None:
    """A model trained without ``task`` still samples it, as it must (a continuation of the given frames),
    but not as the task was meant: say so."""
    setting = TRAINED_BY.get(task)
    if setting is None or getattr(model, setting, None) != 0:
        return
    if task == "v2v":
        warn_caller(f"this model was trained with {setting} 0: it never learned to transform a video, so v2v "
                    "continues the given clip instead")
    elif reads_text:  # extension is a continuation anyway: only its captions are new to the model
        warn_caller(f"this model was trained with {setting} 0: its '{task_caption(task, '').strip()}' captions "
                    "are new to it, so the continuation may follow the caption less well")


def check_sampled(sampler: Sampler, latents: Any, shape: tuple[int, ...], call: str) -> torch.Tensor:
    """What a sampler's ``sample`` (the video) or ``stream`` (one frame) gave, if it is float32 latents of
    the noise's shape: a plugin's slip is named here, not deep in the denoiser or the codec."""
    if not isinstance(latents, torch.Tensor) or latents.dtype != torch.float32 or tuple(latents.shape) != tuple(shape):
        got = (f"{latents.dtype} {tuple(latents.shape)}" if isinstance(latents, torch.Tensor)
               else type(latents).__name__)
        raise TypeError(f"sampler {type(sampler).__name__}.{call} returned {got}; expected float32 latents of "
                        f"shape {tuple(shape)}")
    return latents


@dataclass
class _Batch:
    z: torch.Tensor
    prefix: torch.Tensor | None  # the given frames' latents with the noise the model was trained with
    known: torch.Tensor | None  # the given frames' latents (1, P, h, w, c)
    captions: list[str]
    text: Any  # what the sampler reads: the captions' states, or a GuidedText
    cond: Any  # the captions' states alone, for the denoiser
    sampler: Sampler


@dataclass
class Source:
    """The frames a task starts from (the image of i2v, the clip of extend and v2v)."""

    frames: torch.Tensor  # uint8 (1, S, H, W, 3) at the model's size
    resized_from: list[int] | None  # [height, width] of a file of another size, as a player shows it


@refused_as_generate_error()
def read_source(model, task: str, image, video) -> "Source | None":
    """The conditioning frames of ``task`` (an image, or a clip cut to the frames the codec encodes exactly)
    at the model's size, or None for t2v; what ``VideoPipeline.source_frames`` reads."""
    _, height, width = model.video_shape
    codec = model.codec
    if task == "t2v":
        if image is not None or video is not None:
            raise GenerateError("t2v takes no image or video; use the task i2v, extend or v2v")
        return None
    if task == "i2v":
        if image is None:
            raise GenerateError("i2v needs an image")
        frame, given_size = _frames(image, model, "image")
        frames = np.repeat(frame[None], 1 if codec.causal_first_frame else codec.temporal_factor, axis=0)
    else:
        if video is None:
            raise GenerateError(f"{task} needs a video")
        frames, given_size = _frames(video, model, "video")
        usable = codec.usable_frames(len(frames))
        if usable < 1:
            raise GenerateError(f"the video has {len(frames)} frames, fewer than one latent frame")
        if usable < len(frames):  # the codec encodes whole latent frames only
            warn_caller(f"the video's last {len(frames) - usable} of {len(frames)} frames are left out: codec "
                        f"{codec.name!r} encodes {usable} of them exactly")
        frames = frames[:usable]
    resized_from = list(given_size) if given_size != (height, width) else None
    return Source(torch.from_numpy(np.ascontiguousarray(frames))[None], resized_from)


#: The tasks that continue a given clip.
CLIP_TASKS = ("extend", "v2v")


def default_frames(model, task: str, source: "Source | None") -> int:
    """The frames a request that names none generates: the training length, or for ``extend`` and ``v2v``
    the clip (as read, ``read_source``) followed by one training length of new latent frames, so that any
    clip, one as long as the model makes included, is continued."""
    if task not in CLIP_TASKS or source is None:
        return model.video_shape[0]
    codec = model.codec
    return codec.decoded_frames(codec.latent_frames(source.frames.shape[1]) + model.latent_shape[0])


def read_start_image(path: str | os.PathLike) -> np.ndarray:
    """The image ``i2v`` starts from, uint8 (H, W, 3): an image file, a ``.npy`` of one image (H, W, 3) or
    of frames (T, H, W, 3), whose first it is, or the first frame of a video file, the only frame decoded.
    A video is known by its suffix, as ``flowvid score`` knows the videos of a folder."""
    if Path(path).suffix.lower() == ".npy":
        return read_image_array(path)
    if Path(path).suffix.lower() in READABLE_VIDEO_SUFFIXES:
        return read_frames(path, max_frames=1)[0]
    return read_image_frame(path)


def training_fps(model) -> float | None:
    """The frame rate of the clips the model was trained on (``load_model`` sets it); None where unknown, as
    for a model built in Python or loaded from a checkpoint that records none."""
    return getattr(model, "training_fps", None)


def playback_fps(model) -> float:
    """The frame rate to play the model's videos at: its training rate, else ``DEFAULT_FPS``. A model trained
    on 24 fps clips played at 8 would move in slow motion."""
    trained = training_fps(model)
    return DEFAULT_FPS if trained is None else trained


def _frames(given, model, what: str) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 frames (T, H, W, 3), or (H, W, 3) for an image, at the model's size, from an array or tensor
    or read from a file (a video at the rate the model was trained at) and fitted; with the (height, width)
    the frames were given at."""
    _, height, width = model.video_shape
    image = what == "image"
    if isinstance(given, (str, os.PathLike)):
        read = [read_start_image(given)] if image else read_at_training_rate(given, training_fps(model)).frames
        fitted = fit_frames(read, height, width)
        return fitted[0] if image else fitted, read[0].shape[:2]
    frames = given.cpu().numpy() if isinstance(given, torch.Tensor) else np.asarray(given)
    expected = (height, width, 3)
    if frames.dtype != np.uint8 or frames.ndim != (3 if image else 4) or frames.shape[-3:] != expected:
        shape = ("" if image else "T, ") + ", ".join(map(str, expected))
        well_shaped = frames.ndim == (3 if image else 4) and frames.shape[-3:] == expected
        remedy = "convert them to uint8, 0 to 255" if well_shaped else "give a file to have it resized"
        raise GenerateError(f"the {what} must be uint8 frames of shape ({shape}), the model's size; got "
                            f"{frames.dtype} {tuple(frames.shape)} ({remedy})")
    return frames, (height, width)
