"""``fvd``: FVD (or FVD-proxy) of generated videos against a real set, from the command line.

    flowvid data fvd GENERATED [GENERATED ...] --reference REF [--extractor NAME]
                     [--extractor-args JSON] [--batch-size 8] [--device auto] [--out FILE.json]

GENERATED are video files (``.mp4``, ``.npy``, ...) or folders of them, such as the output folder of
``flowvid generate`` (whose ``.latent.npy`` files are left out). REF is either an ``.npz`` written by
``flowvid data fvd-stats``, whose key fixes the extractor (``--extractor`` defaults to the one named
in it, and settings such as I3D's ``resolution`` to the reference's; others are refused), the frames
and the resolution, or a raw shard folder, whose statistics (of every clip) are computed with
``--extractor`` (default ``inception-proxy``) the first time and kept in its ``fvd_stats/``, where
``fvd-stats`` keeps them too.
A generated video file is read at the frame rate of the reference's clips (frame k: the one nearest in
time to k / fps), which a shard folder's manifest and an ``.npz`` of ``fvd-stats`` record (an older ``.npz``
takes it from the folder it was computed from while that still holds the same shards); an unknown rate is
one warning, and the files are then read frame by frame. Every generated video is cut to the reference's
frames and fitted to its resolution (centre-cropped to its aspect ratio, then resized), and counted as
``cut`` or ``resized``; a video that cannot be read, is too short or is slower than the reference is skipped and counted (the
skips are listed even when too few videos are left for an FVD: the exit status is then 1, while fewer
than 2 videos found is 2). The result is one JSON line on
stdout (and in ``--out``, which must not be one of the inputs): the distance, its protocol name
(extractor, frames, resolution, sample count) and the counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from data_tools.arguments import check_registered_arguments
from data_tools.fvd_stats import (check_raw_shards, feed_in_batches, kept_statistics, note_few_samples, planned_key,
                                 shards_sha256)
from data_tools.report import console, print_error, print_summary, progress_bar, samples_skipped
from flowvid.checks import json_object
from flowvid.cli import exit_statuses
from flowvid.data.manifest import load_manifest, video_shape
from flowvid.data.shards import shard_folder_files
from flowvid.media import (READABLE_VIDEO_SUFFIXES, EmptyVideo, MediaError, SlowerVideo, fit_frames,
                           read_frames_at)
from flowvid.metrics.extractor import build_extractor, extractor_help
from flowvid.metrics.fvd import FrechetVideoDistance, ReferenceStats
from flowvid.paths import check_output_file, check_output_is_no_input, write_atomically
from flowvid.placement import add_device_argument, resolve_device
from flowvid.registry import FVD_EXTRACTORS
from flowvid.score import video_inputs

DEFAULT_EXTRACTOR = "inception-proxy"  # for a raw shard folder reference

# From this many features on, the Fréchet distance (an eigendecomposition of a features x features
# matrix) takes long enough on a CPU that a silent command looks stuck: 4096 took minutes on 2 cores.
LONG_DISTANCE_FEATURES = 2048


EXIT_STATUS = exit_statuses("the distance is computed",
                            "skipping the unreadable or too short videos leaves fewer than 2 (when fewer "
                            "than 2 are found: 2)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generated", nargs="+", metavar="GENERATED", help="video files or folders of them")
    parser.add_argument("--reference", required=True,
                        help="an .npz of `flowvid data fvd-stats`, or a raw shard folder of real clips")
    parser.add_argument("--extractor", default=None,
                        help=f"{extractor_help()}; default: the one an .npz reference names, else {DEFAULT_EXTRACTOR}")
    parser.add_argument("--extractor-args", type=json_object, default={}, metavar="JSON",
                        help='extractor arguments as JSON, e.g. \'{"weights": "i3d_pretrained_400.pt"}\'')
    parser.add_argument("--batch-size", type=int, default=8, help="clips run through the extractor together")
    add_device_argument(parser)
    parser.add_argument("--out", default=None, help="also write the result to this .json file")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None:
        check_output_file(args.out, "--out", "give the .json file to write")
    videos = generated_videos(args.generated)
    if len(videos) < 2:  # before the reference and the extractor: the request cannot be done
        raise ValueError(too_few(len(videos), 0))
    reference_path = Path(args.reference)
    if not reference_path.exists():  # before the extractor (I3D weights) is loaded
        raise ValueError(f"--reference {reference_path} does not exist; give an .npz of `flowvid data fvd-stats` "
                         "or a raw shard folder")
    shard_manifest = load_manifest(reference_path) if reference_path.is_dir() else None
    if shard_manifest is not None:
        check_raw_shards(shard_manifest, reference_path, "fvd --reference")
    if args.out is not None:
        check_output_is_no_input(args.out, [*videos, *reference_files(reference_path, shard_manifest)], "result")
    cached = None if reference_path.is_dir() else ReferenceStats.load(reference_path)
    extractor = args.extractor or (cached.extractor if cached is not None else DEFAULT_EXTRACTOR)
    extractor_args = args.extractor_args
    if cached is not None and extractor == cached.extractor:
        extractor_args = {**cached.extractor_settings, **extractor_args}  # the reference's settings unless given
    device = resolve_device(args.device)
    check_registered_arguments(FVD_EXTRACTORS, extractor, extractor_args, "--extractor-args")
    # Missing extractor weights raise FileNotFoundError, which `flowvid data` prints in one line.
    metric = FrechetVideoDistance(build_extractor(extractor, **extractor_args)).to(device)
    if cached is not None:
        check_reference_fits(cached, metric, reference_path)
    reference = real_set(metric, reference_path, args.batch_size, device, cached, shard_manifest)
    fps = reference_fps(reference_path, shard_manifest, cached)
    if fps is None:
        note_unknown_rate(reference_path, videos)

    skipped: list[dict[str, str]] = []
    fitted: Counter = Counter()
    with progress_bar() as bar:
        task = bar.add_task("generated videos", total=len(videos))
        used = add_generated(metric, videos, reference, args.batch_size, device, skipped, fitted,
                             on_video=lambda: bar.advance(task), fps=fps)
    if used < 2:
        print_summary("fvd: too few usable generated videos", {"generated": used, "skipped": len(skipped)}, skipped)
        print_error("fvd", too_few(used, len(skipped)))
        return 1
    note_few_samples(used, metric.extractor.feature_dim, "generated videos")
    note_long_distance(metric.extractor.feature_dim)
    result = {"fvd": float(metric.compute()), "protocol": metric.protocol_name, "generated": used,
              "skipped": len(skipped), "cut": fitted["cut"], "resized": fitted["resized"],
              "reference": str(args.reference), "reference_samples": reference.num_samples}
    print_summary(f"fvd of {used} generated videos", result, skipped)
    print(json.dumps(result))
    if args.out is not None:
        text = json.dumps(result) + "\n"  # the line printed: one JSON line, as a log of runs appends them
        write_atomically(Path(args.out), lambda path: path.write_text(text))
    return 0


def too_few(used: int, skipped: int) -> str:
    videos = "video" if used == 1 else "videos"
    return f"{used} usable generated {videos} ({skipped} skipped); FVD needs at least 2"


def reference_fps(reference: Path, shard_manifest: dict[str, Any] | None,
                  cached: ReferenceStats | None) -> float | None:
    """The frame rate of the reference's clips: its shard folder's manifest records it, and so does an .npz
    that ``fvd-stats`` wrote. For an .npz that records none, the folder it was computed from does, while it
    still holds those shards (the .npz's ``shards_sha256``): the folder it names, else the one whose
    ``fvd_stats/`` holds it. None: unknown."""
    if shard_manifest is not None:
        return shard_manifest["video"].get("fps")
    if cached is not None and cached.fps is not None:
        return cached.fps
    if cached is None or not cached.shards_sha256:
        return None
    named = [Path(cached.source)] if cached.source else []
    for folder in dict.fromkeys([*named, reference.resolve().parent.parent]):
        try:
            manifest = load_manifest(folder)
        except (ValueError, KeyError, OSError):  # moved, replaced or never there: the rate stays unknown
            continue
        if shards_sha256(manifest) == cached.shards_sha256:
            return manifest["video"].get("fps")
    return None


def note_unknown_rate(reference: Path, videos: list[Path]) -> None:
    """One line when video files are read frame by frame for want of the reference's frame rate."""
    if any(video.suffix != ".npy" for video in videos):
        console.print(f"[yellow]warning[/] the frame rate of {reference}'s clips is unknown: the generated video files "
                      "are read frame by frame, whatever their rate")


def note_long_distance(features: int) -> None:
    if features >= LONG_DISTANCE_FEATURES:
        console.print(f"[yellow]note[/] computing the Fréchet distance of {features} features; on a CPU of few "
                      "cores this takes a minute or more")


def generated_videos(inputs: list[str]) -> list[Path]:
    """The video files among ``inputs`` (folders searched, subfolders too); refuses inputs that hold none."""
    for given in map(Path, inputs):
        if not given.exists():
            raise ValueError(f"generated videos {given} do not exist")
    videos = list(video_inputs(list(map(Path, inputs))))
    if not videos:
        raise ValueError(f"no videos found in {' '.join(inputs)}: fvd looks for files ending in "
                         f"{' '.join(sorted(READABLE_VIDEO_SUFFIXES))}")
    return videos


def reference_files(reference: Path, shard_manifest: dict[str, Any] | None) -> list[Path]:
    """The files a reference is read from: the .npz itself, or a raw shard folder's manifest (``shard_manifest``)
    and shards."""
    return [reference] if shard_manifest is None else shard_folder_files(reference, shard_manifest)


def check_reference_fits(stats: ReferenceStats, metric: FrechetVideoDistance, path: Path) -> None:
    """Raise a ValueError, naming the .npz ``path``, unless ``stats`` come from ``metric``'s extractor, with its
    settings and weights."""
    mismatch = stats.identity_mismatch(metric.extractor)
    if mismatch is not None:
        name, theirs, ours = mismatch
        computed = f" (computed from {stats.source})" if stats.source else ""
        raise ValueError(f"--reference {path}{computed} has {name} {theirs!r}, the extractor has {ours!r}; leave "
                         f"--extractor and its settings out to use the reference's, or recompute it with "
                         f"`flowvid data fvd-stats RAW_SHARD_DIR --extractor {metric.extractor.name}` and the same "
                         "--extractor-args")


def real_set(metric: FrechetVideoDistance, reference: Path, batch_size: int, device: torch.device,
             cached: ReferenceStats | None = None, shard_manifest: dict[str, Any] | None = None) -> ReferenceStats:
    """Load (an .npz, or ``cached``, its contents) or compute (a raw shard folder, whose manifest is
    ``shard_manifest``) the real statistics into ``metric``."""
    if shard_manifest is not None:
        return shard_folder_stats(metric, reference, shard_manifest, batch_size, device)
    metric.set_reference(reference if cached is None else cached)
    return metric.reference


def shard_folder_stats(metric: FrechetVideoDistance, folder: Path, manifest: dict[str, Any], batch_size: int,
                       device: torch.device) -> ReferenceStats:
    """The real statistics of every clip of a raw shard folder: those ``fvd-stats`` (or an earlier ``fvd``)
    keeps in its ``fvd_stats/``, else computed and kept there, as ``fvd-stats`` would, for the next run."""
    frames = video_shape(manifest)[0]
    planned = planned_key(manifest, metric, frames, max_samples=None)
    skipped: list[dict[str, str]] = []
    kept = kept_statistics(folder, manifest, metric, planned, frames=frames, max_samples=None,
                           batch_size=batch_size, device=device, skipped=skipped, keeping_is_optional=True)
    if kept.computed is None:
        console.print(f"[green]cached[/] the statistics of {folder} are read from {kept.path}")
        metric.set_reference(kept.path)
        return metric.reference
    if skipped:
        console.print(f"[yellow]note[/] {samples_skipped(skipped)} samples of {folder} were skipped")
    return kept.computed


def add_generated(metric: FrechetVideoDistance, videos: list[Path], reference: ReferenceStats, batch_size: int,
                  device: torch.device, skipped: list[dict[str, Any]], fitted: Counter,
                  on_video=lambda: None, fps: float | None = None) -> int:
    """Feed the generated videos, at the reference's frames and resolution, to ``metric``; returns how many.
    A video file is read at ``fps``, the reference's frame rate (``read_frames_at``: frame k is the one nearest
    in time to k / fps), where known. ``fitted`` counts the videos that were ``cut`` (more frames) and
    ``resized`` (another height or width). The extractor runs once two videos are usable: fewer is refused
    without it."""
    size = (reference.height, reference.width)

    def usable() -> Iterator[np.ndarray]:
        for path in videos:
            on_video()
            try:
                frames = read_frames_at(path, fps, max_frames=reference.frames + 1).frames  # one more: longer
            except SlowerVideo as err:
                skipped.append({"path": str(path), "reason": f"too_slow: {err.source_fps:g} fps, below the "
                                                             f"reference's {err.fps:g} fps"})
                continue
            except EmptyVideo as err:
                skipped.append({"path": str(path), "reason": err.reason})
                continue
            except MediaError as err:
                skipped.append({"path": str(path), "reason": f"unreadable: {err}"})
                continue
            if len(frames) < reference.frames:
                skipped.append({"path": str(path), "reason": f"too_short: {len(frames)} frames, the reference "
                                                             f"has {reference.frames}"})
                continue
            fitted["cut"] += len(frames) > reference.frames
            fitted["resized"] += frames[0].shape[:2] != size
            yield fit_frames(frames[:reference.frames], *size)

    clips = usable()
    first = list(itertools.islice(clips, 2))
    if len(first) < 2:
        return len(first)
    return feed_in_batches(metric, itertools.chain(first, clips), real=False, batch_size=batch_size, device=device)


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["fvd", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
