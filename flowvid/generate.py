"""``flowvid generate``: text-to-video, image-to-video, video-to-video and extension from a trained model.

::

    flowvid generate --ckpt model.safetensors --task t2v --prompt "a red circle moves left" --out samples/
    flowvid generate --ckpt runs/shapes_t2v --task i2v --image first.png --prompt "..." --frames 8 --seed 3 --out r/
    flowvid generate --ckpt runs/shapes_t2v --task i2v --image clip.mp4 --prompt "..." --out r/   # its first frame
    flowvid generate --ckpt runs/shapes_t2v --task extend --video clip.mp4 --prompts prompts.txt --out r/ --stream
    flowvid generate --ckpt model.safetensors --prompt "..." --device cuda:1 --precision bf16-mixed --out s/
    flowvid generate --ckpt model.safetensors --prompt "a red circle" --negative-prompt "moves left" --out s/
    flowvid generate --ckpt model.safetensors --prompts prompts.txt --samples-per-prompt 4 --out s/
    torchrun --nproc-per-node 8 --no-python flowvid generate --ckpt model.safetensors --prompts all.txt --out s/

For every sample it writes ``NAME.mp4``, the frames as ``NAME.npy`` (T, H, W, 3) uint8, the latents
before decoding as ``NAME.latent.npy`` and ``NAME.json`` (prompt, task, seed, sampler, guidance, negative
prompt, device, precision, timings, Jacobi iterations, the model and the weights that sampled, the ``fps``
of the mp4 unless it is 8, ``stream`` true for a sample of ``--stream``, ``denoise`` false for one of
``--no-denoise`` (the sampled latents decoded without the final denoising step), and ``resized_from`` for an image or
video fitted to the model's size). The mp4 plays at the frame rate the model was trained at when its
checkpoint or export records it, else at 8 fps (``--fps`` sets another). A folder holds one model's samples:
an ``--out`` with another model's is refused, and a sample of another request (another seed, prompt,
sampler...) under a name to be written is kept unless ``--force`` is given. Sample ``i`` uses seed
``seed + i``, so a sample does not depend on its batch (but for float rounding); ``--samples-per-prompt N``
samples each prompt N times in a row, named and seeded as the prompt repeated N times would be. The
sampler is the model's own (its recipe's ``model.sampler``; a windowed one's windows, context and
sampler of each window) unless ``--sampler`` names one. The model runs on the first CUDA GPU when
there is one (``--device``), in bf16-mixed on a GPU that supports it and in fp32 elsewhere
(``--precision``; see ``flowvid.placement``).
An unconditional model (one trained without text) takes no prompt: leave ``--prompt`` out for one
sample, or give ``--samples-per-prompt`` for several. Under torchrun every process draws its share of
the samples (``i % WORLD_SIZE == RANK``) on its own GPU (``cuda:LOCAL_RANK``), without talking to the
others; names and seeds follow the sample's index, so the folder holds what one process would have written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flowvid.adapters import add_adapter_arguments, check_adapter_arguments
from flowvid.checks import is_blank, json_object
from flowvid.cli import CTRL_C_EXIT_STATUS, HelpFormatter, exit_statuses, help_text
from flowvid.data.shards import file_sha256
from flowvid.export import add_weights_argument
from flowvid.media import DEFAULT_FPS, MediaError, frame_rate, write_video
from flowvid.paths import check_output_folder, write_atomically
from flowvid.pipeline import (
    CLIP_TASKS,
    DEFAULT_TOLERANCE,
    NON_FINITE_ADVICE,
    GenerateError,
    Source,
    VideoPipeline,
    build_named_sampler,
    check_per_prompt,
    check_window_fits,
    default_frames,
    each_prompt_repeated,
    is_windowed,
    model_sampler,
    playback_fps,
    read_source,
    sampler_takes,
    takes_the_precisions_tolerance,
    window_sampler,
)
from flowvid.placement import add_placement_arguments, launch_rank, resolve_device, resolve_precision
from flowvid.registry import SAMPLERS, check_arguments, closest_name, did_you_mean
from flowvid.sampling import Sampler, WindowedSampler, sampler_class
from flowvid.sampling.jacobi import check_tolerance
from flowvid.sampling.tasks import TASKS, check_seed


#: The latents written beside each sample (``NAME.latent.npy``): arrays, but not videos.
LATENTS_SUFFIX = ".latent.npy"

#: The files of a sample besides its record (``NAME.json``); a sample is complete when all are there.
SAMPLE_SUFFIXES = (".mp4", ".npy", LATENTS_SUFFIX)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while sampling: ``complete`` of the request's ``total`` samples are complete in the folder
    (their record and every file); the others are sampled by a rerun with ``--skip-existing``."""

    def __init__(self, complete: int, total: int):
        self.complete, self.total = complete, total
        super().__init__(f"interrupted with {complete} of {total} samples complete")


class NonFiniteSamples(GenerateError):
    """Some samples came out NaN or infinite and were not written; the others were."""

    def __init__(self, names: list[str], written: int):
        self.names, self.written = names, written
        super().__init__(f"{len(names)} sample(s) came out NaN or infinite and were not written ({', '.join(names)}; "
                         f"{written} written): {NON_FINITE_ADVICE}")


@dataclass
class Request:
    task: str
    prompts: list[str]
    frames: int
    sampler: str
    tol: float | None  # None: the sampler takes none, or keeps its own default
    guidance: float
    seed: int
    batch_size: int
    fps: float
    stream: bool
    image: str | None = None
    video: str | None = None
    precision: str = "32-true"
    lora: str | None = None
    lora_strength: float = 1.0
    first_block_size: int | None = None  # block sizes (Jacobi's); None keeps the sampler's defaults
    block_size: int | None = None
    sampler_args: dict[str, Any] = field(default_factory=dict)  # the sampler's other settings (the model's)
    negative_prompt: str = ""  # what guidance steers away from; "" is the unconditional (empty) caption
    context: int | None = None  # latent frames each window beyond the first continues; None: half the window
    window: int | None = None  # latent frames in view at once for a longer video; None: the training length
    skip_existing: bool = False  # leave out samples whose files are complete in the output folder
    force: bool = False  # overwrite samples of another request (another seed, prompt, sampler...) in the folder
    model: str = ""  # the export or checkpoint that samples (recorded, and checked by skip_existing)
    weights: str = "ema"  # which of the model's weights sample: its moving average ("ema") or as trained
    rank: int = 0  # under torchrun this process samples prompts rank, rank + world_size, ...
    world_size: int = 1
    samples_per_prompt: int = 1  # each prompt's samples, in a row, as the prompt repeated would give them
    denoise: bool = True  # end with the model's denoising step; False decodes the sampled latents as they are


def check_options(args: argparse.Namespace) -> None:
    """Refuse numbers, names, input files and an output path that cannot work, before the model is loaded."""
    if args.batch_size < 1:
        raise GenerateError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_per_prompt(args.samples_per_prompt, "--samples-per-prompt")
    if args.frames is not None and args.frames < 1:
        raise GenerateError(f"--frames must be >= 1, got {args.frames}")
    if args.context is not None and args.context < 0:
        raise GenerateError(f"--context must be >= 0 latent frames, got {args.context}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise GenerateError(f"--guidance must be a finite number >= 0, got {args.guidance:g}")
    if args.sampler is not None:
        check_sampler_known(args.sampler)
        try:
            sampler_class(args.sampler)
        except KeyError as err:
            raise GenerateError(f"--sampler: {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise GenerateError(f"--sampler: {err}") from None
        check_sampler_settings(args, args.sampler, "--sampler")
    for option, path in (("--image", args.image), ("--video", args.video)):
        if path is not None and not Path(path).exists():  # (a folder is named so when it is read)
            raise GenerateError(f"{option} {path} does not exist")
    if args.tol is not None:
        try:
            check_tolerance(args.tol, "--tol")
        except ValueError as err:
            raise GenerateError(str(err)) from None
    for option, value in (("--first-block-size", args.first_block_size), ("--block-size", args.block_size)):
        if value is not None and value < 1:
            raise GenerateError(f"{option} must be >= 1, got {value}")
    if args.task == "t2v" and (args.image or args.video):
        raise GenerateError("t2v takes no --image or --video; use --task i2v, extend or v2v")
    if args.task == "i2v" and not args.image:
        raise GenerateError("i2v needs --image FILE")
    if args.task in ("extend", "v2v") and not args.video:
        raise GenerateError(f"{args.task} needs --video FILE")
    if args.negative_prompt is not None and is_blank(args.negative_prompt):
        raise GenerateError("--negative-prompt holds no words; leave it out to guide away from the empty caption")
    check_seed(args.seed, name="--seed")
    try:
        if args.fps is not None:
            frame_rate(args.fps)
    except MediaError:
        raise GenerateError(f"--fps must be a finite number of frames per second >= 0.001, got {args.fps}") from None
    check_output_folder(args.out, "--out", "give a folder for the samples", GenerateError)


def usable_samplers() -> list[str]:
    """The registered samplers ``--sampler`` takes: all but the windowed ones (``check_sampler_settings``)."""
    return [name for name in SAMPLERS.names() if not is_windowed(name)]


def check_sampler_known(name: str) -> None:
    """Refuse a name no registered sampler has, listing (and suggesting) only those generate takes."""
    # A class path is imported later, and a plugin's sampler that failed to load is named with its failure.
    if "." in name or name in SAMPLERS or name in {failure.name for failure in SAMPLERS.failures()}:
        return
    usable = usable_samplers()
    raise GenerateError(f"--sampler: unknown sampler {name!r}; generate takes {', '.join(usable)} or a plugin's "
                        f"class path{did_you_mean(name, usable)}")


#: The sampler settings the command line sets, by the option that sets each.
SAMPLER_OPTIONS = {"tol": "--tol", "first_block_size": "--first-block-size", "block_size": "--block-size"}


def check_sampler_settings(args: argparse.Namespace, sampler: str, source: str,
                           settings: dict[str, Any] | None = None) -> None:
    """Refuse the windowed sampler (a long video is sampled in windows anyway), and settings given to a
    sampler that takes none such (where they would be ignored without a word) or that, with its
    ``settings`` from the recipe, it cannot be built with."""
    if is_windowed(sampler):
        raise GenerateError(f"{source} {sampler}: videos longer than the model's training length are sampled in "
                            "windows of that length already; choose the sampler of each window (jacobi, sequential)")
    for key, option in SAMPLER_OPTIONS.items():
        if getattr(args, key) is not None and not sampler_takes(sampler, key):
            raise GenerateError(f"{option}: {source} {sampler} takes no {key}")
        if key in args.sampler_args:
            if getattr(args, key) is not None:
                raise GenerateError(f"--sampler-args: {key} is set by {option} already; leave it out of --sampler-args")
            raise GenerateError(f"--sampler-args: give {key} as {option}")
    try:
        check_arguments(f"{source} {sampler}", sampler_class(sampler), {**(settings or {}), **args.sampler_args},
                        "--sampler-args")
    except ValueError as err:
        raise GenerateError(str(err)) from None


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` (repeatable), in the order given, then those of ``--prompts FILE`` (one per
    line), whatever the order of the options; may be none. Samples are numbered in this order."""
    found = list(prompts or [])
    if prompt_file is not None:
        found += read_prompt_file(Path(prompt_file))
    return found


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a UTF-8 file, one per line, in order. Blank lines and comment lines (``#`` first) are
    skipped wherever they are: they are no prompts, and an unconditional sample is ``--prompt ''``."""
    if path.is_dir():
        raise GenerateError(f"prompt file {path} is a folder; give a text file with one prompt per line")
    if not path.exists():  # /dev/null or a pipe (<(...)) is no regular file, yet is read as one
        raise GenerateError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GenerateError(f"prompt file {path} is not UTF-8 text: {err.reason} at byte {err.start}; "
                            "save it as UTF-8") from None
    except OSError as err:
        raise GenerateError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    # A byte-order mark is not prompt text: Windows editors write one first, and files joined with cat hold
    # one inside. Lines end at \n, \r\n or \r alone: str.splitlines() would also cut a prompt at a Unicode
    # line separator (U+2028, as text pasted from the web holds) or a form feed.
    text = text.replace("\ufeff", "")
    prompts = [line.strip() for line in re.split(r"\r\n|\r|\n", text) if not (is_blank(line) or is_comment(line))]
    if not prompts:
        held = "is empty" if is_blank(text) else "holds only blank lines and # comments"
        raise GenerateError(f"prompt file {path} {held}; write one prompt per line")
    return prompts


def is_comment(line: str) -> bool:
    """Whether a line of a prompt file is a comment: ``#`` is its first character but spaces."""
    return line.lstrip().startswith("#")


def slug(text: str, limit: int = 40) -> str:
    """A file name's part for a prompt; a prompt without letters or digits is named as one all the same."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit]
    return words or ("prompt" if text.strip() else "unconditional")


def request_sampler(request: Request) -> Sampler:
    """The sampler the request names, with its settings."""
    return build_named_sampler(request.sampler, {**request.sampler_args, **chosen_settings(request)})


def with_context(sampler: Sampler, module, request: Request) -> Sampler:
    """``sampler`` in windows of ``request.window`` latent frames (the training length unless set) that
    each continue the last ``request.context`` latent frames of the window before (half the window unless
    set); with neither set, the pipeline's windows, which are those."""
    if request.context is None and request.window is None:
        return sampler
    trained = module.latent_shape[0]
    if request.window is None and module.codec.latent_frames(request.frames) <= trained:
        raise GenerateError(f"--context: {request.frames} frames fit in the model's training length of "
                            f"{module.video_shape[0]} and are sampled in one piece; --context is for longer videos")
    window = trained if request.window is None else request.window
    context = window // 2 if request.context is None else request.context
    if context >= window:
        in_view = (f"the model's training length of {trained}" if request.window is None
                   else f"the model's sampler's window of {window}")
        raise GenerateError(f"--context must be below {in_view} latent frames, so that every window samples new "
                            f"frames; got {context}")
    return WindowedSampler(sampler, window=window, context=context)


def model_window_sampler(module) -> tuple[str, dict[str, Any], WindowedSampler | None]:
    """The name and settings of the model's sampler, and, for a model whose recipe samples in windows, that
    ``WindowedSampler``: then the sampler and settings are those of each window, since ``generate``
    cuts a longer video into windows itself (``recipe_windows``)."""
    sampler, settings = model_sampler(module)
    if not is_windowed(sampler):
        return sampler, settings, None
    windowed = build_named_sampler(sampler, settings)
    check_window_fits(windowed.window, module.latent_shape[0])
    sampler, settings = window_sampler(settings)
    return sampler, settings, windowed


def recipe_windows(module, frames: int, windowed: WindowedSampler | None,
                   context: int | None) -> tuple[int | None, int | None]:
    """The window and context (None: the training length, and half the window) that sample a video of
    ``frames``: the recipe's ``windowed``, for a video longer than its window, with ``--context`` (given
    as ``context``) over its own. Each is None where it is the default, so that the record of a sample
    names only what sets it apart (``planned_records``)."""
    if windowed is None or module.codec.latent_frames(frames) <= windowed.window:
        return None, context
    window = None if windowed.window == module.latent_shape[0] else windowed.window
    if context is None and windowed.context != windowed.window // 2:
        context = windowed.context
    return window, context


def chosen_settings(request: Request) -> dict[str, Any]:
    """The tolerance and block sizes the request sets (None: the sampler's own)."""
    return {key: getattr(request, key) for key in SAMPLER_OPTIONS if getattr(request, key) is not None}


def write_sample(out: Path, name: str, video: np.ndarray, latents: np.ndarray, record: dict[str, Any], fps: float) -> None:
    """The sample's files, each written whole; its JSON record last, so a record means a complete sample.
    The record of an earlier sample under the same name goes first: an interrupted overwrite leaves no
    record for ``--skip-existing`` to trust."""
    (out / f"{name}.json").unlink(missing_ok=True)
    write_atomically(out / f"{name}.mp4", lambda path: write_video(path, video, fps=fps, container="mp4"))
    for path, array in ((out / f"{name}.npy", video), (out / f"{name}{LATENTS_SUFFIX}", latents.astype(np.float32))):
        write_atomically(path, lambda partial, array=array: _save_npy(partial, array))
    write_atomically(out / f"{name}.json", lambda path: path.write_text(json.dumps(record, indent=2)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would add ".npy" to a path not ending in it
        np.save(file, array)


#: The keys of a record that the request fixes (``planned_records``); a key only some requests set is
#: compared too, so that a sample made with a negative prompt or an adapter is not kept for one without.
REQUEST_KEYS = ("prompt", "task", "seed", "samples_per_prompt", "sampler", "tol", "first_block_size",
                "block_size", "sampler_args", "context", "window", "guidance", "denoise",
                "negative_prompt", "precision", "lora", "lora_strength", "frames", "fps", "stream", "model", "weights",
                "source", "source_sha256")


def planned_records(request: Request, prompts: list[str], frames: int) -> dict[int, dict[str, Any]]:
    """What the request fixes of the record of each sample this process makes (by prompt index): two
    samples with the same are the same video."""
    source = request.image or request.video
    shared = {
        "task": request.task, "sampler": request.sampler, "tol": request.tol, **chosen_settings(request),
        **({"sampler_args": request.sampler_args} if request.sampler_args else {}),
        "guidance": request.guidance,
        **({"negative_prompt": request.negative_prompt} if request.negative_prompt else {}),
        "precision": request.precision,
        **({"lora": request.lora, "lora_strength": request.lora_strength} if request.lora else {}),
        "frames": frames,
        **({"context": request.context} if request.context is not None else {}),
        **({"window": request.window} if request.window is not None else {}),
        # The mp4's rate, left out at 8 fps: records from before it was recorded hold samples written at 8.
        **({"fps": request.fps} if request.fps != DEFAULT_FPS else {}),
        # Likewise. Another count moves the later prompts to other names and seeds, so a run resumed with
        # another one would leave the folder a mix of both.
        **({"samples_per_prompt": request.samples_per_prompt} if request.samples_per_prompt != 1 else {}),
        # Likewise: a streamed sample inverts frame by frame, each from a guess of the one before, and comes
        # out other than the plain one up to the tolerance, so a folder of either is not completed with the other.
        **({"stream": True} if request.stream else {}),
        # Likewise: records from before the switch hold denoised samples.
        **({"denoise": False} if not request.denoise else {}),
        **({"model": request.model, "weights": request.weights} if request.model else {}),
        # The file as resolved, as the model is recorded: another spelling of it is the same request.
        **({"source": resolved_source(source), "source_sha256": file_sha256(source)} if source else {}),  # read once
    }
    return {i: {"prompt": prompts[i], "seed": request.seed + i, **shared}
            for i in range(request.rank, len(prompts), request.world_size)}


def resolved_source(path: str | Path) -> str:
    """The absolute path, links resolved, of an image or video given as typed."""
    return str(Path(path).resolve())


def already_written(out: Path, name: str, planned: dict[str, Any], found: dict[str, Any],
                    force: bool = False) -> bool:
    """Whether ``out`` holds this sample, complete: its record (written last; ``found`` holds the folder's
    records, ``read_json_files``) and every file beside it (one removed by hand, or lost, is sampled
    again). A record of another request under the same name is an error rather than a sample silently
    kept, or, without ``force``, overwritten."""
    path = out / f"{name}.json"
    if path.name not in found:
        return False
    record = found[path.name]
    if isinstance(record, Unreadable):
        raise GenerateError(f"cannot read {path} to skip its sample: {record.reason}; remove it to sample it again")
    if not isinstance(record, dict):
        raise GenerateError(f"cannot read {path} to skip its sample: it holds no sample's record; remove it to "
                            "sample it again")
    differences = request_differences(record, planned)
    if differences and not force:
        raise GenerateError(f"{path} was written by another request ({'; '.join(differences)}); "
                            "write to another --out folder, remove it, or pass --force to overwrite it")
    return not differences and has_every_file(out, name, planned)


def has_every_file(out: Path, name: str, planned: dict[str, Any]) -> bool:
    """Whether the files of sample ``name`` besides its record are all in ``out``: with ``--stream``, its
    frames' folder too."""
    streamed = not planned.get("stream") or (out / f"{name}.stream").is_dir()
    return streamed and all((out / f"{name}{suffix}").is_file() for suffix in SAMPLE_SUFFIXES)


def is_complete(out: Path, name: str, planned: dict[str, Any]) -> bool:
    """Whether ``out`` holds sample ``name`` of the request that plans ``planned``, complete."""
    try:
        record = sample_record(json.loads((out / f"{name}.json").read_text()))
    except (OSError, ValueError):
        return False
    return record is not None and not request_differences(record, planned) and has_every_file(out, name, planned)


def request_differences(record: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """What the request that wrote ``record`` asked otherwise than ``planned``, one entry per key."""
    if isinstance(record.get("source"), str):
        # An older record holds the path as typed, relative to where generate ran: it is read from
        # here, where a rerun of its request most likely runs too.
        record = {**record, "source": resolved_source(record["source"])}
    record, planned = with_registered_sampler(record), with_registered_sampler(planned)
    return [difference(key, record, planned) for key in REQUEST_KEYS
            if (key in planned or key in record) and record.get(key) != planned.get(key)]


def difference(key: str, record: dict[str, Any], planned: dict[str, Any]) -> str:
    """``key``'s value in ``record``, and in ``planned`` (asked now), for a message; a value the user did not
    give but the run chose is said to be a default; one a switch sets, by that switch."""
    if key in SWITCHES:
        flag = SWITCHES[key][0]
        return (f"{key}: written {'with' if switched(record, key) else 'without'} {flag}, now "
                f"{'with' if switched(planned, key) else 'without'} it")
    asked = shown(planned, key)
    now = "now not given" if asked == NOT_GIVEN else f"not {asked}{default_note(key, planned)}"
    return f"{key} {shown(record, key)}, {now}"


def default_note(key: str, planned: dict[str, Any]) -> str:
    """`` (the default in PRECISION)`` for a Jacobi tolerance that is the precision's default, which the
    run fills in where neither the user nor the model sets one."""
    precision = planned.get("precision")
    if key != "tol" or planned.get("tol") != DEFAULT_TOLERANCE.get(precision):
        return ""
    try:
        chosen = takes_the_precisions_tolerance(planned["sampler"])
    except (KeyError, TypeError, ValueError, ImportError):
        return ""
    return f" (the default in {precision})" if chosen else ""


def with_registered_sampler(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its sampler by its registered name: a class path names the same sampler."""
    sampler = record.get("sampler")
    return {**record, "sampler": registered_name(sampler)} if isinstance(sampler, str) else record


def registered_name(sampler: str) -> str:
    """The registered name of the sampler a name or class path names; the name as given where it names no
    registered one (a plugin's own class, or one not installed here)."""
    try:
        return SAMPLERS.name_of(sampler_class(sampler)) or sampler
    except (KeyError, TypeError, ValueError, ImportError):
        return sampler


#: What a record that leaves a key out was sampled with: the default of its option.
LEFT_OUT_MEANS = {"samples_per_prompt": 1, "fps": DEFAULT_FPS, "stream": False, "denoise": True}
#: How a key left out, that has no default value, is shown.
NOT_GIVEN = "not given"
#: Keys a switch sets: its flag and the value it gives them.
SWITCHES = {"stream": ("--stream", True), "denoise": ("--no-denoise", False)}


def switched(record: dict[str, Any], key: str) -> bool:
    """Whether the request that wrote ``record`` gave the switch of ``key`` (one left out was not given)."""
    value = record.get(key)
    return (LEFT_OUT_MEANS[key] if value is None else value) == SWITCHES[key][1]


def shown(record: dict[str, Any], key: str) -> str:
    """The value of ``key`` in ``record`` as a user gives it: a number as typed, a JSON object as JSON, and a
    key left out (or None) as its option's default, else ``NOT_GIVEN``."""
    value = record.get(key)
    if value is None:
        value = LEFT_OUT_MEANS.get(key)
    if value is None:
        return NOT_GIVEN
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return json.dumps(value)
    return repr(value)


def check_not_overwriting(out: Path, names: dict[int, str], planned: dict[int, dict[str, Any]],
                          found: dict[str, Any]) -> None:
    """Samples are kept: one of another request (another seed, prompt, sampler...) under a name this
    request writes is refused, before any sampling, rather than replaced without a word. The same
    request's sample is the same video, so it may be written again."""
    for index, plan in planned.items():
        path = out / f"{names[index]}.json"
        record = sample_record(found.get(path.name))
        differences = [] if record is None else request_differences(record, plan)
        if differences:
            raise GenerateError(f"{path} holds a sample of another request ({'; '.join(differences)}); write to "
                                "another --out folder, remove it, or pass --force to overwrite it")


#: The keys of a sample's record that say which model made it.
MODEL_KEYS = ("model", "weights", "lora", "lora_strength")


def check_one_model(out: Path, planned: dict[str, Any], found: dict[str, Any]) -> None:
    """A folder of samples is one model's, as FVD and ``--skip-existing`` read it: samples of this model
    beside or over another's would mix the two or lose the other's, so that is refused."""
    if "model" not in planned:  # a library caller that names no model
        return
    for file_name in sorted(found):
        record = sample_record(found[file_name])
        if record is None or "model" not in record:
            continue
        differences = [difference(key, record, planned) for key in MODEL_KEYS if record.get(key) != planned.get(key)]
        if differences:
            raise GenerateError(f"{out} holds samples of another model ({file_name}: {'; '.join(differences)}); "
                                "write to another --out folder or remove them")


@dataclass(frozen=True)
class Unreadable:
    """A JSON file of the output folder that could not be read or parsed, and why."""

    reason: str


def read_json_files(out: Path) -> dict[str, Any]:
    """The JSON files of ``out`` by file name, parsed (``Unreadable`` where that failed): read once, for
    every check of a run, since a folder may hold many thousands of samples."""
    found = {}
    for path in out.glob("*.json"):
        if path.is_file():
            try:
                found[path.name] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                found[path.name] = Unreadable(str(err))
    return found


def sample_record(content: Any) -> dict[str, Any] | None:
    """A JSON file's content if it is the record of a sample ``generate`` wrote, else None."""
    return content if isinstance(content, dict) and {"sampler", "seed", "prompt"} <= content.keys() else None


def run(module, request: Request, out: Path, progress: Callable[[str], None] | None = None,
        source: Source | None = None) -> list[dict[str, Any]]:
    """Generate every prompt of ``request`` into ``out``; returns the JSON records written. ``progress``
    receives a line after every batch; ``source``: the request's image or clip read already (``read_source``),
    else it is read here. Ctrl-C raises ``Interrupted``, which counts the samples complete in ``out``."""
    pipeline = VideoPipeline(module, request_sampler(request), request.precision)
    check_per_prompt(request.samples_per_prompt, "samples_per_prompt")
    prompts = each_prompt_repeated(pipeline.prompts_for(request.prompts), request.samples_per_prompt)
    pipeline.check(request.task, request.frames, request.guidance, request.negative_prompt, request.seed,
                   request.batch_size, count=len(prompts))
    pipeline.sampler = with_context(pipeline.sampler, module, request)
    if source is None:
        source = pipeline.source_frames(request.task, request.image, request.video)
    pipeline.check_room(request.task, request.frames, source)
    # As flowvid score records it: the given image or video was centre-cropped and resized to the model's size.
    resized = {"resized_from": source.resized_from} if source is not None and source.resized_from else {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked up front by the command; a library caller may still hit this
        raise GenerateError(f"cannot make the output folder {out}: {err.strerror or err}") from None
    frames = module.codec.usable_frames(request.frames)
    name = {i: f"{request.task}_{i:03d}_{slug(prompt)}" for i, prompt in enumerate(prompts)}
    planned = planned_records(request, prompts, frames)
    todo = samples_to_make(out, request, name, planned)
    if progress and len(todo) < len(planned):
        progress(f"{len(planned) - len(todo)} of {len(planned)} samples are in {out} already")
    records, failed = [], []
    started = time.perf_counter()
    try:
        for start in range(0, len(todo), request.batch_size):
            indices = todo[start:start + request.batch_size]
            names = [name[i] for i in indices]
            for sample in names:  # frames streamed for an earlier sample of the same name are not this one's
                shutil.rmtree(out / f"{sample}.stream", ignore_errors=True)
            result = pipeline.generate_batch([prompts[i] for i in indices], [request.seed + i for i in indices],
                                             None if source is None else source.frames,
                                             task=request.task, frames=request.frames, guidance=request.guidance,
                                             negative_prompt=request.negative_prompt, denoise=request.denoise,
                                             on_frame=_frame_writer(module, out, names) if request.stream else None)
            records += write_batch(pipeline, request, out, result, names, [{**planned[i], **resized} for i in indices])
            failed += [names[row] for row in result.failed]
            if progress:
                done, seconds = len(records) + len(failed), sum(result.timings.values())
                left = (time.perf_counter() - started) / done * (len(todo) - done)
                progress(f"{done}/{len(todo)} samples ({seconds:.1f} s for the last {len(indices)}"
                         + (f", about {_duration(left)} left)" if done < len(todo) else ")"))
    except KeyboardInterrupt:
        # A sample is written whole or not at all (its record last), so the folder says what is done.
        complete = sum(is_complete(out, name[i], planned[i]) for i in planned)
        raise Interrupted(complete, len(planned)) from None
    if failed:
        raise NonFiniteSamples(failed, len(records))
    return records


def samples_to_make(out: Path, request: Request, name: dict[int, str], planned: dict[int, dict[str, Any]]) -> list[int]:
    """The indices of the samples to make: all of them, or with --skip-existing those ``out`` lacks. Raises a
    GenerateError if ``out`` holds another model's samples, or samples this run would overwrite unasked."""
    found = read_json_files(out)
    check_one_model(out, next(iter(planned.values()), {}), found)
    if not (request.skip_existing or request.force):
        check_not_overwriting(out, name, planned, found)
    return [i for i in planned
            if not (request.skip_existing and already_written(out, name[i], planned[i], found, request.force))]


def write_batch(pipeline: VideoPipeline, request: Request, out: Path, result, names: list[str],
                planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the samples of one generated batch, named ``names``, whose records start as ``planned``;
    returns the records written. A sample that diverged is not written, so --skip-existing samples it again."""
    module, records = pipeline.model, []
    for row, sample in enumerate(names):
        if row in result.failed:
            shutil.rmtree(out / f"{sample}.stream", ignore_errors=True)
            continue
        record = {
            **planned[row],
            # A model without text sees no caption: say so by leaving the field out.
            **({"caption_seen_by_model": result.captions[row]} if pipeline.reads_text else {}),
            "device": str(module.device),
            "timings": {k: v / len(names) for k, v in result.timings.items()}, "batch_size": len(names),
            "sampler_stats": result.sampler_stats[0],
        }
        if request.stream and not decodes_frame_by_frame(module.codec):  # its frames come now, at the end
            write_stream_frames(out / f"{sample}.stream", result.videos[row])
        write_sample(out, sample, result.videos[row], result.latents[row], record, request.fps)
        records.append({"name": sample, **record})
    return records


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def decodes_frame_by_frame(codec) -> bool:
    """Whether each latent frame decodes on its own into one video frame (not in groups, as a VAE's)."""
    return codec.temporal_factor == 1 and not codec.causal_first_frame


def write_stream_frames(folder: Path, frames: np.ndarray, first: int = 0) -> None:
    """uint8 frames (T, H, W, 3) as ``folder/frame_XXX.png``, numbered from ``first``."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for index, image in enumerate(frames, start=first):
        Image.fromarray(image).save(folder / f"frame_{index:03d}.png")


def _frame_writer(module, out: Path, names: list[str]):
    """Writes each frame, final (denoised and decoded), as ``NAME.stream/frame_XXX.png`` the moment it is
    known: the denoiser's look-ahead behind the sampler. Codecs that decode groups of frames together
    have their frames written once the batch is done."""

    def write(index: int, frame: torch.Tensor) -> None:
        if not decodes_frame_by_frame(module.codec):
            return
        pixels = module.codec.decode(frame[:, None]).cpu().numpy()
        for name, video in zip(names, pixels):
            write_stream_frames(out / f"{name}.stream", video, first=index)

    return write


def interrupted_line(stop: Interrupted, args: argparse.Namespace) -> str:
    """What a Ctrl-C left in ``--out``, and how to finish, in one line."""
    share = " of this process's" if launch_rank()[1] > 1 else " of"
    finish = "the same command" if args.skip_existing else "the same command with --skip-existing"
    return (f"interrupted with {stop.complete}{share} {stop.total} samples complete in {args.out}; run {finish} to "
            "sample the others")


class SuggestingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose refusal of an unknown option suggests the option it most likely misspells.
    Abbreviations are refused, as ``flowvid fit`` refuses them: ``--guid`` would silently mean ``--guidance``
    until an option starting the same way is added."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self.suggestion(extras)}")
        return parsed

    def suggestion(self, extras: list[str]) -> str:
        """`` (did you mean --x?)`` for the first unknown option close to one of this parser's."""
        options = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for extra in extras:
            if extra.startswith("--"):
                close = closest_name(extra.split("=", 1)[0], options)
                if close:
                    return f" (did you mean {close}?)"
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingArgumentParser(
        prog="flowvid generate", description=help_text(__doc__.split("\n\n")[0]), formatter_class=HelpFormatter,
        epilog=exit_statuses("every sample is written", "some samples came out NaN or infinite and were not "
                             "written (the others were; --skip-existing samples only those again)")
        + f" {CTRL_C_EXIT_STATUS} when stopped by Ctrl-C (the samples written are complete; --skip-existing "
          "samples the others).")
    parser.add_argument("--ckpt", required=True,
                        help="exported .safetensors (or its folder), Lightning .ckpt, DeepSpeed directory, "
                             "or a run directory (its newest checkpoint)")
    parser.add_argument("--task", choices=TASKS, default="t2v",
                        help="t2v: text-to-video, i2v: from --image, extend: continue --video, v2v: transform --video")
    parser.add_argument("--prompt", action="append",
                        help="a caption (repeatable); samples are numbered from the --prompt captions, in order, "
                             "then the --prompts file's")
    parser.add_argument("--prompts",
                        help="a UTF-8 file with one caption per line; blank lines and lines starting with # are "
                             "skipped")
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="samples of each caption, in a row, named and seeded as the caption repeated "
                             "(default: 1)")
    parser.add_argument("--image",
                        help="i2v: the first frame: an image file, a .npy of one image (H, W, 3) uint8, or a video "
                             "file or .npy of frames (T, H, W, 3) whose first frame it is")
    parser.add_argument("--video", help="extend / v2v: the clip to continue or transform (video file or .npy)")
    parser.add_argument("--frames", type=int,
                        help="video frames to generate, the given image or clip included (default: the training "
                             "length; extend and v2v: the clip's frames, then one training length of new ones); "
                             "longer videos than the training length are sampled in windows of that length, each "
                             "continuing the one before (see --context)")
    parser.add_argument("--context", type=int, default=None,
                        help="for videos longer than the training length: the latent frames of the window before "
                             "that each window continues, 0 (none) to the training length - 1 (default: the "
                             "model's windowed sampler's, else half the training length); with more, each window "
                             "sees more of the video before it, with fewer, it samples more new frames")
    parser.add_argument("--sampler", default=None,
                        help="registered sampler name (jacobi, sequential, ...) or a plugin's class path; default: "
                             "the model's (its recipe's model.sampler, jacobi unless set; a windowed one samples "
                             "each window with its own sampler)")
    parser.add_argument("--sampler-args", type=json_object, default={}, metavar="JSON",
                        help="the sampler's other settings as JSON, e.g. '{\"max_iterations\": 64}'; over the model's "
                             "own when --sampler is left out")
    parser.add_argument("--tol", type=float, default=None,
                        help="tolerance of the sampler (Jacobi: relative change per pass); default: the model's "
                             "sampler's, else a plugin's own default, else Jacobi's 1e-3 in 32-true and 1e-2 in "
                             "bf16-mixed")
    parser.add_argument("--first-block-size", type=int, default=None,
                        help="Jacobi: slots per block in the first frame and in the shallow blocks (default: the model's "
                             "sampler's, else one frame on a GPU, where fewer, larger passes are faster, and 16 on a CPU)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="Jacobi: slots per block of the deep block after the first frame (default: the model's "
                             "sampler's, else one frame)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the model's)")
    parser.add_argument("--negative-prompt", default=None,
                        help="a caption guidance steers away from, instead of the empty caption")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="samples drawn together")
    parser.add_argument("--fps", type=float, default=None,
                        help=f"frame rate of the written mp4 (default: the rate the model was trained at, when its "
                             f"checkpoint or export records it, else {DEFAULT_FPS:g})")
    parser.add_argument("--stream", action="store_true",
                        help="write each frame as soon as it is final, as NAME.stream/frame_000.png, ... beside the "
                             "sample's files (with a codec that decodes frames in groups, once the sample is done); "
                             "streamed samples differ from plain ones up to the tolerance, so each is its own request "
                             "for --skip-existing")
    parser.add_argument("--no-denoise", dest="denoise", action="store_false",
                        help="decode the sampled latents as they are, without the model's final denoising step "
                             "(its learned denoiser, else a Tweedie step through the flow); recorded as denoise "
                             "false")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave out samples already complete in --out, their record and every file (to "
                             "finish an interrupted run)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite samples of another request (seed, prompt, sampler, ...) in --out; without "
                             "it they are refused")
    add_weights_argument(parser)
    add_adapter_arguments(parser)
    add_placement_arguments(parser, precision="auto")
    parser.add_argument("--out", required=True,
                        help="folder for one model's samples (a folder holding another model's is refused)")
    return parser


def request_from_options(args: argparse.Namespace, module, model: Path, prompts: list[str], precision: str,
                         rank: int, world_size: int) -> tuple[Request, Source | None]:
    """The request the command line makes of the loaded ``module``, and the image or clip it gives, read
    once (``None`` when the task takes none or it is read later, by ``run``)."""
    if args.sampler is None:
        sampler, settings, windowed = model_window_sampler(module)
        check_sampler_settings(args, sampler, "the model's sampler", settings)
    else:
        sampler, settings, windowed = args.sampler, {}, None
    settings.update(args.sampler_args)
    # The command line's settings, else the model's, else the precision's tolerance (Jacobi) and the
    # sampler's own defaults.
    chosen = {key: settings.pop(key, None) for key in SAMPLER_OPTIONS}
    chosen.update({key: getattr(args, key) for key in SAMPLER_OPTIONS if getattr(args, key) is not None})
    if chosen["tol"] is None and takes_the_precisions_tolerance(sampler):
        chosen["tol"] = DEFAULT_TOLERANCE[precision]
    # extend and v2v continue the clip by default, so it is read (once) for its length.
    source = read_source(module, args.task, args.image, args.video) if args.frames is None \
        and args.task in CLIP_TASKS else None
    frames = default_frames(module, args.task, source) if args.frames is None else args.frames
    window, context = recipe_windows(module, frames, windowed, args.context)
    request = Request(
        task=args.task, prompts=prompts, frames=frames,
        sampler=sampler, sampler_args=settings, **chosen, context=context, window=window,
        guidance=module.guidance if args.guidance is None else args.guidance, seed=args.seed,
        batch_size=args.batch_size, fps=playback_fps(module) if args.fps is None else args.fps,
        stream=args.stream, skip_existing=args.skip_existing, force=args.force,
        image=args.image, video=args.video,
        precision=precision, lora=args.lora, lora_strength=args.lora_strength,
        negative_prompt=args.negative_prompt or "", rank=rank, world_size=world_size,
        samples_per_prompt=args.samples_per_prompt, denoise=args.denoise,
        model=str(model.resolve()), weights=module.weights_used,
    )
    return request, source


def main(argv: list[str]) -> int:
    from flowvid.cli import UserError
    from flowvid.lit.checkpointing import CorruptCheckpointError
    from flowvid.loading import load_model, model_file

    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        check_adapter_arguments(args.lora, args.lora_strength)
        prompts = read_prompts(args.prompt, args.prompts)
        # Every sample's seed, before the model loads; an unconditional model samples once without a prompt.
        check_seed(args.seed, max(len(prompts), 1) * args.samples_per_prompt, name="--seed")
        rank, world_size = launch_rank()
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        model = model_file(args.ckpt)
        module = load_model(model, weights=args.weights, map_location=device, adapters=args.lora,
                            adapter_strength=args.lora_strength)
        request, source = request_from_options(args, module, model, prompts, precision, rank, world_size)
        records = run(module, request, Path(args.out), progress=lambda line: print(line, file=sys.stderr, flush=True),
                      source=source)
    except Interrupted as stop:
        print(f"flowvid generate: {interrupted_line(stop, args)}", file=sys.stderr)
        return CTRL_C_EXIT_STATUS
    except KeyboardInterrupt:  # while the model loads: nothing is written yet
        print("flowvid generate: interrupted before sampling began", file=sys.stderr)
        return CTRL_C_EXIT_STATUS
    except NonFiniteSamples as err:  # the request was sound and the other samples are written: no usage error
        print(f"flowvid generate: error: {err}", file=sys.stderr)
        return 1
    except KeyError as err:  # str() of a KeyError quotes its message
        raise UserError(str(err.args[0]) if err.args else str(err)) from None
    except (GenerateError, FileNotFoundError, ImportError) as err:
        raise UserError(str(err)) from None
    except CorruptCheckpointError as err:
        raise UserError(str(err)) from None
    except ValueError as err:  # bad sizes, guidance without text encoder, codec mismatch, ...
        raise UserError(str(err)) from None
    # Processes share the samples by index: with one sample per prompt, the prompts.
    shared = "prompts" if args.samples_per_prompt == 1 else "samples"
    shard = (f", {shared} {rank}, {rank + world_size}, ... of {len(prompts) * args.samples_per_prompt}"
             if world_size > 1 else "")
    samples = f"{len(records)} sample{'' if len(records) == 1 else 's'}"
    print(f"wrote {samples} to {args.out} ({module.device}, {precision}{shard})")
    return 0
