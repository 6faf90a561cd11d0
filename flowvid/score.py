"""``flowvid score``: exact bits per dimension of videos under a trained flow, ranked.

::

    flowvid score --ckpt model.safetensors --input clips/ --out scores.jsonl
    flowvid score --ckpt runs/shapes_t2v --input data/shapes/val --out scores.jsonl   # a shard folder
    flowvid score --ckpt model.safetensors --input clips/ --device cuda:1 --out scores.jsonl
    flowvid score --ckpt model.safetensors --input clips/ --captions captions.csv --out scores.jsonl

Every video is cut into consecutive clips of the model's training length (frames beyond the last
whole clip are scored as a shorter clip), each clip is scored exactly (the flow is invertible, the
likelihood factorises over frames), and one JSON line per video gives ``bits_per_dim`` and
``bits_per_dim_per_frame`` (one value per latent frame), with ``clips``, ``frames`` (the video frames
scored; absent for samples of latent shards of a non-pixel codec, which hold no video frames) and ``latent_frames``.
Latent shards of a causal codec (a video VAE whose first latent frame encodes one frame alone) are scored
in their first clip only: the later latent frames continue the earlier ones, so no later window of them
is the start of a clip the model was trained on. Such a line counts the ``unscored_latent_frames`` and
gives the ``unscored_reason``; score the source videos, whose every clip is encoded afresh, to cover
them all.
Lines are ranked from the least to the most likely video: the top of the file is where anomalies are.
What cannot be scored (an unreadable file, a sample that cannot be decoded, a broken shard, the copy of
a repeated key, a likelihood that comes out NaN) gets a line with ``error`` after them; a shard's says
how many ``samples`` it lost, the manifest's count telling those of a shard that ends early.

Captions: a shard's samples are scored under their own, video files as ``flowvid data from-videos``
captions them: each under its row of ``--captions FILE``, a CSV or JSONL of ``path,caption`` read as
from-videos reads it (paths relative to that file), else under its sidecar ``<video stem>.txt`` (or
``<video>.txt``), else under ``--caption`` (the empty caption without it), as from-videos'
``--default-caption``. With a table, a file that has neither a row, a sidecar nor ``--caption`` gets a
line with ``error`` and ``caption`` null, as from-videos skips it, and the summary counts it apart
from the files that could not be read (a file that cannot be read says so, row or not). A captions
file that is missing, unreadable, not UTF-8 or names none of the video files is refused before the
model loads. A sample ``flowvid generate`` wrote (``NAME.npy`` or ``NAME.mp4`` with
its record ``NAME.json`` beside it) is scored, when neither ``--caption`` nor ``--captions`` is given,
under the caption it was sampled under: the record's ``prompt`` with the task's prefix, as the model
read it (``caption_seen_by_model``). Every line names its ``caption``: the one scored under, ``""`` for
the empty caption and for every line of a model without text, which reads none.

A video file of another size than the model's is centre-cropped and resized to it (as ``generate``
fits its images), and its line says so with ``resized_from`` ([height, width] of the file as a
player shows it: upright, square pixels): the
score is that of the fitted frames. A shard folder holds clips made for one model size, so one of
another size is refused before any work, with both sizes.

Frame rate: a video file is scored at the frame rate the model was trained at, when its checkpoint or
export records it: frame k is the file's frame nearest in time to k / fps, as ``flowvid data from-videos
--fps`` picks frames, so a 30 fps file moves as the model's 24 fps clips did. A file slower than that
(by more than 0.1%) gets a line with ``error``; one that records no rate is scored frame by frame, with a
warning. A video file's line gives the ``fps`` its frames were scored at (null: unknown); ``.npy`` arrays
and shards are scored frame by frame.

With the pixel codec the number follows the discrete convention of image flows: 8-bit values ``v``
are dequantised uniformly, ``y = (v + u) / 127.5 - 1`` with ``u ~ U[0, 1)``, and the Jacobian of that
map (``ln 127.5`` nats per dimension) is added, so the figure is an upper bound on the bits a lossless
code built on the model would spend per 8-bit value, directly comparable with FFV1 or PNG on the same
frames. With a latent codec it is bits per dimension of the latents (``unit`` says which), the
model's density at the clean latents. Neither is the validation bits/dim, which is the density of the
noise-augmented latents at noisy points (what training fits; docs/metrics.md).

The model runs on the first CUDA GPU when there is one (``--device``), in fp32 unless ``--precision
bf16-mixed`` is asked for (the network's matmuls in bf16; z and the log-determinant stay fp32).
Video file (or shard) ``i`` of the inputs draws its dequantisation noise from ``--seed`` + ``i``.
Folders are listed once, before the model loads (under torchrun by the first process, for all): a file
added to one after that is not scored.

Under torchrun every process scores every N-th video file and shard on its own GPU and the first
writes them all, ranked, the same file as one process writes::

    torchrun --nproc-per-node 8 --no-python flowvid score --ckpt model.safetensors --input data/train --out s.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from flowvid.adapters import add_adapter_arguments, check_adapter_arguments
from flowvid.checks import is_blank
from flowvid.cli import CTRL_C_EXIT_STATUS, HelpFormatter, exit_statuses, help_text
from flowvid.codecs.base import LatentCodec, check_codec_identity
from flowvid.data.manifest import SPLIT_FOLDERS, what_to_give
from flowvid.export import add_weights_argument
from flowvid.generate import LATENTS_SUFFIX, SuggestingArgumentParser, sample_record
from flowvid.media import READABLE_VIDEO_SUFFIXES, EmptyVideo, MediaError, fit_frames, read_at_training_rate
from flowvid.paths import check_output_file, check_output_is_no_input, write_atomically
from flowvid.pipeline import training_fps
from flowvid.sampling.tasks import TASKS, check_seed, task_caption
from flowvid.placement import (add_placement_arguments, join_launch_group, precision_context, resolve_device,
                               resolve_precision)

PIXEL_UNIT = "bits per 8-bit subpixel (uniform dequantisation)"
LATENT_UNIT = "bits per latent dimension"


class ScoreError(ValueError):
    """An input that cannot be scored; the message is the one line the user sees."""


class MissingCaption(ScoreError):
    """A video file that ``--captions`` gives no caption: readable, but not scored. Its line has ``caption``
    null, and the summary counts it apart from the files that could not be read."""


def is_pixel_codec(codec) -> bool:
    return codec.name == "pixel"


@torch.no_grad()
def score_latents(module, latents: torch.Tensor, caption: str, discrete: bool) -> np.ndarray:
    """Bits/dim of every latent frame (T,) of one clip; ``discrete`` adds the dequantisation terms."""
    flow = module.flow
    text = module.text_encoder.encode([caption]) if module.text_encoder is not None else None
    nats = flow.nll_per_frame(latents[None].to(module.device), text)[0]
    if discrete:
        nats = nats + math.log(127.5)
    return (nats / math.log(2)).cpu().numpy()


def dequantised_latents(module, video: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Pixel-codec latents of uint8 ``video`` with uniform dequantisation noise (one draw)."""
    latents = module.codec.encode(torch.from_numpy(video)[None].to(module.device))[0]
    return latents + torch.rand(latents.shape, generator=generator).to(latents.device) / 127.5


def clips_of(frames: int, length: int, codec: LatentCodec) -> list[tuple[int, int]]:
    """Consecutive clips of ``length`` frames covering ``frames``; the last may be shorter, cut to what ``codec``
    encodes exactly."""
    spans = [(start, min(start + length, frames)) for start in range(0, frames, length)]
    spans = [(a, a + codec.usable_frames(b - a)) for a, b in spans]
    return [(a, b) for a, b in spans if b > a]


def score_video(module, video: np.ndarray, caption: str, generator: torch.Generator) -> dict[str, Any]:
    """Score uint8 frames (T, H, W, 3) clip by clip."""
    codec = module.codec
    discrete = is_pixel_codec(codec)
    per_frame: list[float] = []
    spans = clips_of(len(video), module.video_shape[0], codec)
    if not spans:
        raise ScoreError(f"{len(video)} frames are fewer than one latent frame of codec {codec.name!r}")
    for start, end in spans:
        clip = np.ascontiguousarray(video[start:end])
        if discrete:
            latents = dequantised_latents(module, clip, generator)
        else:
            latents = codec.encode(torch.from_numpy(clip)[None].to(module.device))[0]
        per_frame += score_latents(module, latents, caption, discrete).tolist()
    return {"bits_per_dim": float(np.mean(per_frame)), "bits_per_dim_per_frame": per_frame, "clips": len(spans),
            "frames": int(sum(end - start for start, end in spans)), "latent_frames": len(per_frame)}


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


@dataclass(frozen=True)
class ShardFolder:
    """A shard folder of the inputs, with its manifest (read once)."""

    path: Path
    manifest: dict[str, Any]

    def files(self) -> list[Path]:
        """What scoring reads: the manifest and every shard it lists."""
        from flowvid.data.shards import shard_folder_files

        return shard_folder_files(self.path, self.manifest)


@dataclass(frozen=True)
class Listing:
    """The listed inputs (``list_inputs``), and the files of their folders that are no videos and are not
    scored: a summary names how many, so that a file of an unknown format is not passed over in silence."""

    entries: list[Path | ShardFolder]
    not_videos: list[Path]


def list_inputs(inputs: list[str], caption: str | None = None) -> list[Path | ShardFolder]:
    """Every video file of the inputs (a folder's walked once) and every shard folder, in the order given.
    Every check and the scoring work on this one listing, so a file that appears in a folder afterwards is
    not scored unchecked. Refused before any work: an input that does not exist, a folder with nothing to
    score, a caption with no video file to apply to (shards are scored under their own captions)."""
    return listing_of(inputs, caption).entries


def listing_of(inputs: list[str], caption: str | None = None) -> Listing:
    """``list_inputs``, with the files of the folders given that are not videos."""
    from flowvid.data import load_manifest

    listed: list[Path | ShardFolder] = []
    not_videos: list[Path] = []
    for given in map(Path, inputs):
        if is_shard_folder(given):
            listed.append(ShardFolder(given, load_manifest(given)))
        elif not given.exists():
            raise ScoreError(f"input {given} does not exist")
        elif given.is_dir():
            found = folder_files(given)  # walked once, for the videos and for the files left out
            listed += videos_of_folder(given, found)
            not_videos += files_not_videos(found)
        else:
            listed.append(given)
    if caption and all(isinstance(entry, ShardFolder) for entry in listed):
        raise ScoreError("--caption applies to video files, and the inputs are all shard folders, whose samples "
                         "are scored under their own captions; leave out --caption")
    return Listing(listed, not_videos)


def list_inputs_once(inputs: list[str], caption: str | None = None) -> Listing:
    """``listing_of`` made by the first process under a process group and shared with the others: listed
    by each, a folder written to meanwhile would give the processes different work to divide."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return listing_of(inputs, caption)
    shared: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            shared[0] = listing_of(inputs, caption)
        except (ValueError, OSError) as refused:  # the others must not wait for a listing that never comes
            shared[0] = refused
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], Exception):
        raise shared[0]
    return shared[0]


def videos_of_folder(folder: Path, found: list[Path]) -> list[Path]:
    """The videos of ``folder`` among ``found``, what its walk found (``folder_files``)."""
    videos = videos_among(found)
    if not videos and holds_split_folders(folder):
        # The folder given to ``from-videos --val-fraction`` or ``make-synthetic`` as --out: point at its
        # halves, as the data tools do.
        raise ScoreError(f"no videos found in folder {folder}, and it is not a shard folder: "
                         f"{what_to_give(folder)}")
    if not videos:
        raise ScoreError(f"no videos found in folder {folder}: score looks for files ending in "
                         f"{' '.join(sorted(READABLE_VIDEO_SUFFIXES))} (in subfolders too), "
                         "or a shard folder with manifest.json")
    return videos


def holds_split_folders(folder: Path) -> bool:
    """Whether ``folder`` holds the ``train`` or ``val`` shard folder of a dataset with a validation split."""
    return any(is_shard_folder(folder / split) for split in SPLIT_FOLDERS)


def check_out_is_no_listed_input(out: str, listed: list[Path | ShardFolder],
                                 captions: FileCaptions | None = None) -> None:
    """Writing the scores over a video being scored, over a shard folder's manifest or shard, or over the
    captions table would destroy it: refuse such an ``--out`` before any work."""
    read = [path for entry in listed for path in (entry.files() if isinstance(entry, ShardFolder) else [entry])]
    read += captions.files() if captions is not None else []
    check_output_is_no_input(out, read, "scores", ScoreError)


def check_caption(module, caption: str, name: str = "--caption") -> None:
    """A caption for a model without a text encoder would be silently ignored: refuse it instead. ``name``
    is what the caller calls the caption (``--caption`` on the command line)."""
    if caption and module.text_encoder is None:
        raise ScoreError("this model is unconditional (trained without text) and takes no caption; "
                         f"leave out {name}")
    if caption and is_blank(caption):
        raise ScoreError(f"{name} {caption!r} holds only whitespace or invisible characters; give a caption, "
                         "or leave it out to score under the empty caption")


@dataclass(frozen=True)
class FileCaptions:
    """The caption each video file of the inputs carries, looked up as ``flowvid data from-videos`` looks it up:
    its row of a ``path,caption`` table (``--captions``), else its sidecar ``<video stem>.txt``, else
    ``--caption``."""

    table: str | None  # the table's file, as given; None: sidecars alone
    captions: dict[Path, str]  # by video file, as listed
    missing: dict[Path, str]  # why a video file has none
    sidecars: dict[Path, Path] = field(default_factory=dict)  # the sidecar each video file's caption was read from

    def caption(self, video: Path) -> str | None:
        """``video``'s caption, None where neither a row, a sidecar nor ``--caption`` gives one; MissingCaption,
        which its line gives, where the table should have (or its sidecar cannot be read)."""
        if video in self.missing:
            raise MissingCaption(self.missing[video])
        return self.captions.get(video)

    def files(self) -> list[Path]:
        """The files the captions are read from: the table and the sidecars."""
        return ([] if self.table is None else [Path(self.table)]) + list(self.sidecars.values())

    def given(self) -> dict[Path, str]:
        """The captions a user asked for by name (a row, ``--caption``) rather than left beside a video."""
        return {video: text for video, text in self.captions.items() if video not in self.sidecars}


def read_file_captions(table: str | Path | None, listed: list[Path | ShardFolder],
                       default: str | None) -> FileCaptions:
    """The captions the listed video files carry, found as ``flowvid data from-videos`` finds them
    (``found_caption``: the row of ``table``, read as ``--captions`` is, else the sidecar); a file without
    either gets ``default`` (``--caption``), as from-videos gives its ``--default-caption``, and where that
    is None and a table is given none, so that it is listed unscored as from-videos skips it. Refused before
    any work: a table that is missing or unreadable, or that names none of the files."""
    from data_tools.from_videos import CaptionTable, NoCaption, Sidecars, found_caption

    videos = [entry for entry in listed if isinstance(entry, Path)]
    # The table's rows are keyed by absolute paths, and by bare file names, as from-videos finds its videos.
    resolved = {video: video.resolve() for video in videos}
    rows = CaptionTable(table_rows(table, videos), resolved.values())
    sidecars = Sidecars(resolved.values())
    found = FileCaptions(None if table is None else str(table), {}, {})
    for video in videos:
        try:
            caption = found_caption(resolved[video], rows, sidecars)
        except NoCaption as err:
            found.missing[video] = str(err)
            continue
        if caption is not None:
            found.captions[video] = caption.text
            if caption.sidecar is not None:
                found.sidecars[video] = caption.sidecar
        elif default is not None:
            found.captions[video] = default
        elif table is not None:
            found.missing[video] = (f"no caption: --captions {table} has no row for it, no sidecar holds one, and "
                                    "no --caption gives the caption of such files")
    return found


def table_rows(table: str | Path | None, videos: list[Path]) -> dict[str, str]:
    """The rows of ``--captions`` (none without it), refused unless they name one of ``videos``."""
    from data_tools.from_videos import CaptionTable, load_captions

    if table is None:
        return {}
    if Path(table).is_dir():
        raise ScoreError(f"--captions {table} is a folder; give a CSV or JSONL file of path,caption rows")
    if not Path(table).exists():
        raise ScoreError(f"--captions {table} does not exist; give a CSV or JSONL file of path,caption rows")
    if not videos:
        raise ScoreError("--captions applies to video files, and the inputs are all shard folders, whose samples "
                         "are scored under their own captions; leave out --captions")
    rows = load_captions(table)
    if not any(CaptionTable(rows, []).names(video.resolve()) for video in videos):
        raise ScoreError(f"--captions {table} names none of the {len(videos)} video files of the inputs (paths are "
                         f"read relative to the captions file's folder, {Path(table).resolve().parent})")
    return rows


def video_inputs(paths: list[Path]) -> Iterator[Path]:
    """The videos of files and folders (``videos_among`` a folder's files)."""
    for path in paths:
        if path.is_dir():
            yield from videos_among(folder_files(path))
        else:
            yield path


def folder_files(folder: Path) -> list[Path]:
    """Everything in ``folder`` and its subfolders, sorted: the one walk of it that its listing reads."""
    return sorted(folder.rglob("*"))


def videos_among(found: list[Path]) -> list[Path]:
    """The videos of a folder's ``found`` files. A folder written by ``flowvid generate`` holds every sample
    as ``NAME.npy`` (its exact pixels) and ``NAME.mp4``, and its latents: each sample counts once, as its
    array."""
    videos = [p for p in found if is_video_name(p) and not p.name.endswith(LATENTS_SUFFIX)]
    arrays = {p.with_suffix("") for p in videos if p.suffix == ".npy"}
    return [p for p in videos if p.suffix == ".npy" or p.with_suffix("") not in arrays]


def files_not_videos(found: list[Path]) -> list[Path]:
    """The files among a folder's ``found`` that ``videos_among`` leaves out for not being videos. A sample
    ``flowvid generate`` wrote is more than its array: its record ``NAME.json``, latents ``NAME.latent.npy``
    and streamed frames ``NAME.stream/`` belong to it, as does the ``NAME.mp4`` beside its array: none of
    them is left out."""
    files = [path for path in found if path.is_file()]
    samples = {path.with_suffix("") for path in files if is_video_name(path) and not path.name.endswith(LATENTS_SUFFIX)}
    return [path for path in files if not (is_video_name(path) or belongs_to_sample(path, samples))]


def is_video_name(path: Path) -> bool:
    return path.suffix.lower() in READABLE_VIDEO_SUFFIXES


def belongs_to_sample(path: Path, samples: set[Path]) -> bool:
    """Whether ``path`` is the record or a streamed frame of one of ``samples`` (paths without suffix)."""
    if path.suffix == ".json" and path.with_suffix("") in samples:
        return True
    return any(folder.suffix == ".stream" and folder.with_suffix("") in samples for folder in path.parents)


@dataclass(frozen=True)
class Work:
    """One unit of scoring: a video file, or one shard of a shard folder (with the folder's sample spec)."""

    path: Path
    spec: Any = None
    listed: int = 0  # the samples the folder's manifest lists in the shard
    held_earlier: frozenset[str] = frozenset()  # keys of the shard that an earlier shard of its folder holds


def work_of(module, listed: list[Path | ShardFolder]) -> list[Work]:
    """Every video file and every shard of the listed inputs, in their order. A shard folder of another size
    or a latent one made with another codec is refused here, before any work."""
    work: list[Work] = []
    for entry in listed:
        work += shard_work(module, entry) if isinstance(entry, ShardFolder) else [Work(entry)]
    return work


def shard_work(module, folder: ShardFolder) -> list[Work]:
    """The shards of ``folder``, once the model is known to take its clips."""
    from flowvid.data import SampleSpec
    from flowvid.data.manifest import codec_identity
    from flowvid.data.shards import keys_held_earlier, shard_paths

    manifest = folder.manifest
    check_frame_size(module, manifest, folder.path)
    if manifest["kind"] == "latent":
        check_codec_identity(module.codec.identity(), codec_identity(manifest), f"shard folder {folder.path}")
    spec = SampleSpec.from_manifest(manifest)
    shards = shard_paths(folder.path, manifest)
    repeated = keys_held_earlier(shards)
    return [Work(path, spec, shard["samples"], repeated.get(str(path), frozenset()))
            for path, shard in zip(shards, manifest["shards"])]


def check_frame_size(module, manifest: dict[str, Any], folder: Path) -> None:
    """Shards hold clips made for one model size: another size is the wrong folder (or model), refused
    before any work. Unlike a video file, whose frames are fitted to the model, a shard is never resized."""
    from flowvid.data.manifest import video_shape

    _, height, width = video_shape(manifest)
    _, model_height, model_width = module.video_shape
    if (height, width) != (model_height, model_width):
        raise ScoreError(f"shard folder {folder} holds {height}x{width} clips, the model takes "
                         f"{model_height}x{model_width} (height x width); score shards made at the model's size "
                         f"(`flowvid data from-videos ... --size {model_height}x{model_width}`)")


def score_work(module, work: Work, caption: str | None, generator: torch.Generator,
               captions: FileCaptions | None = None) -> list[dict[str, Any]]:
    """The records of one video file, under its row of ``captions`` if given, else ``caption``, or of every
    sample of one shard; damage is reported, not fatal."""
    if work.spec is None:
        return [score_file(module, work.path, caption, generator, captions)]
    return list(score_shard(module, work, generator))


def score_file(module, path: Path, caption: str | None, generator: torch.Generator,
               captions: FileCaptions | None = None) -> dict[str, Any]:
    """The record of one video file (see ``score_work``): its frames fitted to the model's size and, for a
    model whose training rate is known, picked at that rate (``read_at_training_rate``). A file that cannot
    be read says so before whether it has a caption: what is wrong with it is the file."""
    _, height, width = module.video_shape
    try:
        timed = read_at_training_rate(path, training_fps(module))
        text = caption_of_file(path, caption, captions)
        record = {"path": str(path), "caption": caption_in_line(module, text),
                  **score_video(module, fit_frames(timed.frames, height, width), text, generator)}
    except MissingCaption as err:
        return {"path": str(path), "caption": None, "error": str(err)}
    except EmptyVideo as err:  # the line names the file: the reason alone, as from-videos lists it
        return {"path": str(path), "error": err.reason}
    except MediaError as err:
        return {"path": str(path), "error": str(err) + latents_hint(path)}
    except ScoreError as err:
        return {"path": str(path), "error": str(err)}
    if path.suffix != ".npy":  # an array holds frames, not their times
        record["fps"] = timed.fps
    shown = timed.frames[0].shape[:2]
    if shown != (height, width):  # the score is of the fitted frames, not of the file's own
        record["resized_from"] = list(shown)
    return record


def latents_hint(path: Path) -> str:
    """What to score instead of the latents ``flowvid generate`` writes beside a sample, which are no frames;
    nothing for any other file."""
    if not path.name.endswith(LATENTS_SUFFIX):
        return ""
    sample = path.with_name(path.name.removesuffix(LATENTS_SUFFIX))
    return (f"; this is the latents of a sample `flowvid generate` wrote: score its frames, {sample}.npy "
            f"(or {sample}.mp4), instead")


def caption_of_file(path: Path, caption: str | None, captions: FileCaptions | None) -> str:
    """The caption ``path`` is scored under: its row of ``captions`` or its sidecar, else ``caption``, else, for a
    sample ``flowvid generate`` wrote, the caption it was sampled under, else the empty caption."""
    found = None if captions is None else captions.caption(path)
    if found is not None:
        return found
    if caption is not None:
        return caption
    recorded = generated_caption(path)
    return "" if recorded is None else recorded


def generated_caption(video: Path) -> str | None:
    """The caption the model was given for ``video`` when ``flowvid generate`` wrote it: the sample's record
    ``NAME.json`` beside it gives it with the task's prefix (``caption_seen_by_model``), or, for a record of
    a model without text, its ``prompt`` and ``task``. None when no sample record lies beside ``video``."""
    try:
        record = sample_record(json.loads(video.with_suffix(".json").read_text(encoding="utf-8")))
    except (OSError, ValueError):  # no record, or not one generate wrote: a video like any other
        return None
    if record is None:
        return None
    seen, prompt, task = record.get("caption_seen_by_model"), record["prompt"], record.get("task", "t2v")
    if isinstance(seen, str):
        return seen
    return task_caption(task, prompt) if isinstance(prompt, str) and task in TASKS else None


def caption_in_line(module, caption: str) -> str:
    """The caption a record names: the one scored under, or the empty one for a model without text, which
    reads none (a shard's samples keep their captions, and a generated sample its own)."""
    return caption if module.text_encoder is not None else ""


def score_shard(module, work: Work, generator: torch.Generator) -> Iterator[dict[str, Any]]:
    """Score every sample of one shard of a raw or latent shard folder, under the samples' own captions.
    What the shard loses gets an ``error`` record, as training counts it (``shard_samples``): a broken
    shard, or one holding fewer than the ``listed`` samples, the ``samples`` it lost; a key that the shard
    or an earlier shard of its folder gave before, the copy."""
    from flowvid.data import BadSample, LostSamples, decode_sample, shard_samples

    shard = work.path
    for raw in shard_samples(shard, work.listed, work.held_earlier):
        if isinstance(raw, LostSamples):
            error = f"{raw.reason}: {raw.message}"
            yield ({"path": f"{shard}:{raw.key}", "error": error} if raw.key is not None
                   else {"path": str(shard), "error": error, "samples": raw.samples})
            continue
        where = f"{shard}:{raw.get('__key__', '?')}"  # the folder too: several may be scored at once
        try:
            sample = decode_sample(raw, work.spec)
        except BadSample as err:
            yield {"path": where, "error": str(err)}
            continue
        if "latents" in sample and is_pixel_codec(module.codec):
            # Pixel latents are 8-bit frames: score them as such, in the unit of every other pixel record.
            sample["video"] = module.codec.decode(torch.from_numpy(sample["latents"])[None])[0].numpy()
        caption = sample["caption"]
        if "video" in sample:
            yield {"path": where, "caption": caption_in_line(module, caption),
                   **score_video(module, sample["video"], caption, generator)}
        else:
            yield {"path": where, "caption": caption_in_line(module, caption),
                   **score_latent_clips(module, torch.from_numpy(sample["latents"]), caption)}


def score_latent_clips(module, latents: torch.Tensor, caption: str) -> dict[str, Any]:
    """Score latents (T, h, w, c) of a non-pixel codec in consecutive clips of the model's latent length, as
    ``score_video`` scores frames: a longer clip is never scored past the window the model was trained on.

    A causal codec (``causal_first_frame``) is scored in its first window only: its later latent frames
    continue the earlier ones, so a window cut from them is unlike every clip the model was trained on, whose
    first latent frame encodes one frame alone. The record counts the latent frames left out and says why."""
    codec, length = module.codec, module.latent_shape[0]
    scored = latents[:length] if codec.causal_first_frame else latents
    starts = range(0, len(scored), length)
    per_frame = [bits for start in starts
                 for bits in score_latents(module, scored[start:start + length], caption, discrete=False).tolist()]
    record = {"bits_per_dim": float(np.mean(per_frame)), "bits_per_dim_per_frame": per_frame, "clips": len(starts),
              "latent_frames": len(per_frame)}
    if len(scored) < len(latents):
        record["unscored_latent_frames"] = len(latents) - len(scored)
        record["unscored_reason"] = (f"codec {codec.name!r} is causal: latent frames after the model's first "
                                     f"{length} continue the ones before them, unlike the start of any clip the "
                                     "model was trained on; score the source video to score every clip of it")
    return record


def score_inputs(module, inputs: list[str], caption: str | None = None, seed: int = 0,
                 captions: str | Path | None = None) -> list[dict[str, Any]]:
    """Score every input (video files, folders of videos, shard folders); ranked, least likely first.

    Video files are scored under ``caption`` (None: the empty caption), or with ``captions``, a table of
    ``path,caption`` rows (``read_file_captions``), each under its row, and ``caption`` is that of the files
    the table lacks (None: they get an error record). Video file (or shard) ``i`` draws its dequantisation
    noise from ``seed + i``. Under a process group rank r scores the files and shards r, r + N, ..., and
    every rank returns all the records: the same as one process gives.
    """
    listed = list_inputs(inputs, caption)
    return score_listed(module, listed, caption, seed, read_file_captions(captions, listed, caption))


def score_listed(module, listed: list[Path | ShardFolder], caption: str | None = None, seed: int = 0,
                 captions: FileCaptions | None = None) -> list[dict[str, Any]]:
    """``score_inputs`` of inputs already listed (``list_inputs``), with their ``captions`` already read."""
    check_caption(module, caption)
    if captions is not None and captions.table is not None:  # a sidecar's caption is only there, not asked for
        for text in set(captions.given().values()):
            check_caption(module, text, f"--captions {captions.table}")
    work = work_of(module, listed)
    check_seed(seed, len(work), name="--seed")  # each file or shard its own seed: none may wrap onto another's
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {index: score_work(module, work[index], caption, torch.Generator().manual_seed(seed + index), captions)
            for index in range(rank, len(work), world_size)}
    if world_size > 1:
        parts: list[dict[int, list[dict[str, Any]]]] = [{} for _ in range(world_size)]
        dist.all_gather_object(parts, mine)
        mine = {index: records for part in parts for index, records in part.items()}
    records = [not_a_number_as_error(record) for index in sorted(mine) for record in mine[index]]
    unit = PIXEL_UNIT if is_pixel_codec(module.codec) else f"{LATENT_UNIT} (codec {module.codec.name})"
    scored = sorted((r for r in records if "error" not in r), key=lambda r: -r["bits_per_dim"])
    for rank_in_file, record in enumerate(scored, start=1):
        record.update(rank=rank_in_file, unit=unit)
    return scored + [r for r in records if "error" in r]


def not_a_number_as_error(record: dict[str, Any]) -> dict[str, Any]:
    """A NaN score is no rank: every comparison with it is false, so sorting it would scramble the ranking
    of every other video. It is reported as a video that could not be scored."""
    if "error" in record or not math.isnan(record["bits_per_dim"]):
        return record
    return {"path": record["path"], "caption": record["caption"],
            "error": "the model's likelihood of this video is NaN (not a number): the weights or the precision "
                     "overflow on it; score it with --precision 32-true, or with another checkpoint"}


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingArgumentParser(
        prog="flowvid score", description=help_text(__doc__.split("\n\n")[0]), formatter_class=HelpFormatter,
        epilog=exit_statuses("some video is scored (those that cannot be are listed with an error)",
                             "no video could be scored")
        + f" {CTRL_C_EXIT_STATUS} when stopped by Ctrl-C (nothing is written: the scores are written once all "
          "are done).")
    parser.add_argument("--ckpt", required=True,
                        help="exported .safetensors (or its folder), Lightning .ckpt, DeepSpeed directory, "
                             "or a run directory (its newest checkpoint)")
    parser.add_argument("--input", nargs="+", required=True,
                        help="video files, folders of videos (not the .latent.npy beside generated samples) "
                             "or shard folders")
    parser.add_argument("--caption", default=None,
                        help="caption for video files that have no row in --captions and no sidecar <video stem>.txt, "
                             "as from-videos' --default-caption (default: unconditional, and a sample of `flowvid "
                             "generate` under its own prompt; with --captions, such files are listed unscored); shards "
                             "are scored under their own captions; a model without text takes none")
    parser.add_argument("--captions", default=None, metavar="FILE",
                        help="CSV or JSONL of path,caption rows giving each video file its caption, as `flowvid data "
                             "from-videos --captions` reads it (paths relative to FILE; a bare file name captions "
                             "that name in any folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    add_weights_argument(parser)
    add_adapter_arguments(parser)
    add_placement_arguments(parser, precision="32-true")  # scores are exact unless asked otherwise
    parser.add_argument("--out", required=True, help="JSON lines, one per video")
    return parser


def summary(records: list[dict[str, Any]], out: Path, not_videos: int = 0) -> str:
    """The closing line: the videos scored, those that were not, by reason, and the ``not_videos`` files of
    the folders given that were left out."""
    scored = sum("error" not in r for r in records)
    uncaptioned = sum("error" in r and r.get("caption", "") is None for r in records)
    # A broken shard counts every sample it lost.
    failed = sum(r.get("samples", 1) for r in records if "error" in r) - uncaptioned
    partly = sum("unscored_latent_frames" in r for r in records)
    return (f"scored {scored} video{'' if scored == 1 else 's'} into {out}"
            + (f"; {partly} in their first clip only (unscored_reason says why)" if partly else "")
            + (f"; {uncaptioned} without a caption (listed)" if uncaptioned else "")
            + (f"; {failed} could not be read (listed)" if failed else "")
            + (f"; left out {not_videos} file{' that is not a video' if not_videos == 1 else 's that are not videos'}"
               if not_videos else ""))


def main(argv: list[str]) -> int:
    from flowvid.cli import UserError
    from flowvid.lit.checkpointing import CorruptCheckpointError
    from flowvid.loading import load_model

    args = build_parser().parse_args(argv)
    try:
        rank, world_size = join_launch_group()
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        listing = list_inputs_once(args.input, args.caption)
        listed = listing.entries
        captions = read_file_captions(args.captions, listed, args.caption)
        check_seed(args.seed, name="--seed")
        check_output_file(args.out, "--out", "give the JSON lines file to write", ScoreError)
        check_out_is_no_listed_input(args.out, listed, captions)
        check_adapter_arguments(args.lora, args.lora_strength)
        module = load_model(args.ckpt, weights=args.weights, map_location=device, adapters=args.lora,
                            adapter_strength=args.lora_strength)
        with precision_context(precision, device):
            records = score_listed(module, listed, args.caption, args.seed, captions)
    except KeyboardInterrupt:
        # The scores are written once every video is scored: an earlier scores file is left as it was.
        print(f"flowvid score: interrupted before every video was scored; nothing was written to {args.out}",
              file=sys.stderr)
        return CTRL_C_EXIT_STATUS
    except (ScoreError, FileNotFoundError, ValueError, CorruptCheckpointError, ImportError) as err:
        raise UserError(str(err)) from None
    if rank != 0:  # the first process writes everyone's records
        return 0
    out = Path(args.out)
    try:
        write_scores(out, records)
    except KeyboardInterrupt:
        print(f"flowvid score: interrupted while writing the scores to {out}, which holds either all of them or "
              "what it held before", file=sys.stderr)
        return CTRL_C_EXIT_STATUS
    except OSError as err:  # a full disk or a folder without write permission
        raise UserError(f"cannot write the scores to {out}: {err.strerror or err}") from None
    print(summary(records, out, len(left_out(listing, captions))))
    return 0 if any("error" not in r for r in records) else 1


def write_scores(out: Path, records: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_atomically(out, lambda path: path.write_text(text))  # a full disk keeps the earlier scores whole


def left_out(listing: Listing, captions: FileCaptions | None) -> list[Path]:
    """The files of the folders given that are no videos, but for the captions table and sidecars, which are read."""
    read = set() if captions is None else {path.resolve() for path in captions.files()}
    return [path for path in listing.not_videos if path.resolve() not in read]
