"""``fvd-stats``: FVD reference statistics of a raw shard folder, computed once and cached.

    flowvid data fvd-stats RAW_DIR [--extractor inception-proxy] [--extractor-args JSON]
                           [--frames T] [--max-samples N] [--out FILE] [--force]

Runs an FVD extractor on the clips (``frames.npy``, uint8) of a raw shard folder and writes their
feature mean and covariance with the key they depend on (extractor, its settings, weights hash,
frames, resolution, sample count) and the clips' frame rate to an ``.npz``; ``FVDCallback(reference=FILE)`` and
``FrechetVideoDistance.set_reference(FILE)`` load it and refuse a key that does not fit. ``--out``
names the file, which must end in ``.npz``; without it the file is ``RAW_DIR/fvd_stats/<key>.npz``,
named by the samples it holds. An existing file computed from the same request (the same shards;
extractor, settings, weights, frames, resolution, samples asked for) is reused unless ``--force``.
Unreadable samples are skipped and counted; a broken shard counts every sample it lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from data_tools.arguments import check_registered_arguments
from data_tools.report import console, print_summary, progress_bar, samples_skipped
from flowvid.checks import json_object
from flowvid.cli import exit_statuses
from flowvid.data.manifest import load_manifest, video_shape
from flowvid.data.shards import (
    FVD_STATS_FOLDER,
    BadSample,
    SampleSpec,
    decode_sample,
    keys_held_earlier,
    listed_samples,
    listed_sha256,
    shard_folder_files,
    shard_paths,
)
from flowvid.metrics.extractor import build_extractor, extractor_help
from flowvid.metrics.fvd import FrechetVideoDistance, ReferenceStats, reference_file_name
from flowvid.paths import check_output_file, check_output_is_no_input
from flowvid.placement import add_device_argument, resolve_device
from flowvid.registry import FVD_EXTRACTORS


EXIT_STATUS = exit_statuses("the statistics are written or already kept")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RAW_DIR", help="raw shard folder (from from-videos or make-synthetic)")
    parser.add_argument("--extractor", default="inception-proxy", help=f"{extractor_help()}; default: inception-proxy")
    parser.add_argument("--extractor-args", type=json_object, default={}, metavar="JSON",
                        help='extractor arguments as JSON, e.g. \'{"weights": "i3d_pretrained_400.pt"}\'')
    parser.add_argument("--frames", type=int, default=None, help="use the first T >= 1 frames of every clip (default: all)")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most N >= 2 clips (default: all)")
    parser.add_argument("--out", default=None,
                        help="output file, ending in .npz (default: RAW_DIR/fvd_stats/<key>.npz)")
    parser.add_argument("--force", action="store_true", help="recompute even when the output already exists")
    parser.add_argument("--batch-size", type=int, default=8, help="clips run through the extractor together")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    for option, value in (("--batch-size", args.batch_size), ("--frames", args.frames)):
        if value is not None and value < 1:  # --frames 0 must not mean "all frames"
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.max_samples is not None and args.max_samples < 2:
        raise ValueError(f"--max-samples must be >= 2 (a covariance needs 2 clips), got {args.max_samples}")
    device = resolve_device(args.device)
    manifest = load_manifest(args.source)
    check_raw_shards(manifest, Path(args.source), "fvd-stats")
    frames = checked_frames(manifest, args.frames)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out, args.source, manifest)
    check_registered_arguments(FVD_EXTRACTORS, args.extractor, args.extractor_args, "--extractor-args")
    # Missing extractor weights raise FileNotFoundError, which `flowvid data` prints in one line.
    metric = FrechetVideoDistance(build_extractor(args.extractor, **args.extractor_args))
    planned = planned_key(manifest, metric, frames, args.max_samples)
    if out is None:
        default = Path(args.source) / FVD_STATS_FOLDER / reference_file_name(**planned)
        check_output_file(default, "--out", "give the .npz file to write")
    started = time.perf_counter()
    skipped: list[dict[str, Any]] = []
    kept = kept_statistics(args.source, manifest, metric, planned, frames=frames, max_samples=args.max_samples,
                           out=out, force=args.force, batch_size=args.batch_size, device=device, skipped=skipped,
                           show_progress=True)
    if kept.computed is None:
        console.print(f"[green]cached[/] {kept.path} already holds these statistics (--force recomputes)")
        return 0
    stats, out = kept.computed, kept.path
    seconds = time.perf_counter() - started
    fields = {"file": str(out), "extractor": stats.extractor, "extractor settings": stats.extractor_settings or "-",
              "weights sha256": stats.weights_hash[:12] or "-", "frames": stats.frames,
              "resolution": f"{stats.height}x{stats.width}", "samples": stats.num_samples,
              "feature dim": stats.mu.shape[0], "seconds": seconds, "clips_per_second": stats.num_samples / seconds}
    print_summary(f"fvd-stats {args.source}", fields, skipped)
    note_few_samples(stats.num_samples, stats.mu.shape[0], "samples")
    # Whole, on its own line: the table clips long cells to the terminal's width, and --reference needs the name.
    print(f"wrote {out}")
    return 0


@dataclasses.dataclass
class KeptStatistics:
    """The statistics of a folder: where they are kept, and the statistics themselves when this run computed
    them (None: read from ``path``)."""

    path: Path | None  # None: computed, but they could not be kept
    computed: ReferenceStats | None


def kept_statistics(source: str | Path, manifest: dict[str, Any], metric: FrechetVideoDistance,
                    planned: dict[str, Any], *, frames: int, max_samples: int | None, out: Path | None = None,
                    force: bool = False, batch_size: int = 8, device: str | torch.device = "cpu",
                    skipped: list[dict[str, Any]] | None = None, show_progress: bool = False,
                    keeping_is_optional: bool = False) -> KeptStatistics:
    """The statistics ``planned`` describes (``planned_key``): the file that already holds them (``out``, else
    one in ``source``'s ``fvd_stats/``) unless ``force``, else computed and saved there. ``manifest`` is
    ``source``'s, read once by the caller, so that the key, the cache check and the clips read all
    describe the same shards. With ``keeping_is_optional``, a file that cannot be written is a note, not
    an error: they are computed again next time."""
    folder = Path(source) / FVD_STATS_FOLDER
    shards = shards_sha256(manifest)
    cached = None if force else cached_statistics(out, folder, planned, shards)
    if cached is not None:
        return KeptStatistics(cached, None)
    with progress_bar(show_progress) as bar:
        task = bar.add_task("clips", total=planned["num_samples"])
        stats = reference_stats(source, metric, frames=frames, max_samples=max_samples, batch_size=batch_size,
                                device=device, skipped=skipped, on_clip=lambda: bar.advance(task),
                                manifest=manifest)
    path = out or folder / stats.file_name()  # named by the samples it holds, which skips make fewer
    try:
        stats.save(path)
    except OSError as err:  # a folder the user may read but not write
        if not keeping_is_optional:
            raise
        console.print(f"[yellow]note[/] cannot keep the statistics of {source} for the next run: "
                      f"{err.strerror or err}")
        return KeptStatistics(None, stats)
    return KeptStatistics(path, stats)


def check_raw_shards(manifest: dict[str, Any], folder: Path, command: str) -> None:
    """Refuse, before any work, a shard folder that holds no video frames (latent shards) for ``command``."""
    if manifest["kind"] != "raw":
        raise ValueError(f"{folder} holds {manifest['kind']} shards; {command} reads raw video shards (frames.npy), "
                         "such as from-videos or make-synthetic write")


def check_out(out: Path, source: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse an ``--out`` that cannot hold the statistics of ``source``, before any clip is read."""
    check_output_file(out, "--out", "give the .npz file to write")
    check_output_is_no_input(out, shard_folder_files(source, manifest), "statistics")
    if out.suffix != ".npz":
        # The file would be written under the name given, and looked for as NAME.npz by whoever knows numpy's savez.
        raise ValueError(f"--out {out} does not end in .npz; give the .npz file to write, e.g. {out}.npz")


def note_few_samples(count: int, features: int, what: str) -> None:
    """Say so when ``count`` feature vectors of ``features`` dimensions cannot give a full-rank covariance."""
    if count <= features:
        console.print(f"[yellow]note[/] {count} {what} for {features} features: the covariance is singular; FVD "
                      "still computes but is noisy and biased upwards")


def cached_statistics(out: Path | None, folder: Path, planned: dict[str, Any], shards: str) -> Path | None:
    """The file that already holds what this run would compute from the shards whose ``shards_sha256`` is
    ``shards``: ``out``, or in ``folder`` one under any sample count, since a run that skipped samples names
    its file by the count it got."""
    if out is not None:
        return out if out.is_file() and answers(cached_stats(out), planned, shards) else None
    name = reference_file_name(**{**planned, "num_samples": 0})
    any_count = glob.escape(name.removesuffix("_n0.npz")) + "_n*.npz"
    for candidate in sorted(folder.glob(any_count)):
        try:
            stats = ReferenceStats.load(candidate)
        except ValueError:  # damaged: computed again, and replaced when the new file takes its name
            continue
        if answers(stats, planned, shards):
            return candidate
    return None


def answers(stats: ReferenceStats, planned: dict[str, Any], shards: str) -> bool:
    """Whether ``stats`` came from the run ``planned`` describes (its key, with the samples it asked for) on
    the shards whose ``shards_sha256`` is ``shards``."""
    return {**stats.key(), "num_samples": stats.requested_samples} == planned and stats.shards_sha256 == shards


def shards_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the shards' own hashes, in order: it changes when the clips, or their order, do."""
    listed = "\n".join(shard["sha256"] for shard in manifest["shards"])
    return hashlib.sha256(listed.encode()).hexdigest()


def cached_stats(out: Path) -> ReferenceStats:
    """The statistics already in ``out``; a file that holds none is the user's, not replaced."""
    try:
        return ReferenceStats.load(out)
    except ValueError as err:
        raise ValueError(f"{err}; give another --out, or --force to replace it") from None


def planned_key(manifest: dict[str, Any], metric: FrechetVideoDistance, frames: int, max_samples: int | None) -> dict[str, Any]:
    """The key the statistics of this folder will have when no sample is skipped."""
    _, height, width = video_shape(manifest)
    return {**metric.extractor.identity(), "frames": frames, "height": height, "width": width,
            "num_samples": requested_samples(manifest, max_samples)}


def requested_samples(manifest: dict[str, Any], max_samples: int | None) -> int:
    return manifest["samples"] if max_samples is None else min(max_samples, manifest["samples"])


def reference_stats(
    source: str | Path,
    metric: FrechetVideoDistance,
    frames: int | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    skipped: list[dict[str, Any]] | None = None,
    on_clip: Callable[[], None] | None = None,
    manifest: dict[str, Any] | None = None,
) -> ReferenceStats:
    """Feature statistics of the first ``max_samples`` usable clips of a raw shard folder (first ``frames`` frames);
    ``manifest`` is the folder's when the caller has read it already."""
    manifest = load_manifest(source) if manifest is None else manifest
    check_raw_shards(manifest, Path(source), "fvd-stats")
    frames = checked_frames(manifest, frames)
    skipped = [] if skipped is None else skipped
    metric = metric.to(device)
    wanted = requested_samples(manifest, max_samples)

    def wanted_clips() -> Iterator[np.ndarray]:
        for clip in itertools.islice(_clips(source, manifest, skipped), wanted):
            if on_clip is not None:
                on_clip()
            yield clip[:frames]

    used = feed_in_batches(metric, wanted_clips(), real=True, batch_size=batch_size, device=device)
    if used < 2:
        raise ValueError(f"{source}: {used} usable clips ({samples_skipped(skipped)} skipped); "
                         "FVD statistics need at least 2")
    return dataclasses.replace(metric.real_statistics(source=str(source)), requested_samples=wanted,
                               shards_sha256=shards_sha256(manifest), fps=manifest["video"].get("fps"))


def checked_frames(manifest: dict[str, Any], frames: int | None) -> int:
    """The frames to use of a folder's clips: ``frames``, refused when its clips have fewer, or all of them."""
    clip_frames = video_shape(manifest)[0]
    frames = clip_frames if frames is None else frames
    if not 1 <= frames <= clip_frames:
        raise ValueError(f"--frames must be between 1 and the clips' {clip_frames} frames, got {frames}")
    return frames


def feed_in_batches(metric: FrechetVideoDistance, clips: Iterable[np.ndarray], real: bool, batch_size: int,
                    device: str | torch.device) -> int:
    """Give ``clips`` (uint8 (T, H, W, 3) each) to ``metric``, ``batch_size`` at a time; returns how many."""
    clips, used = iter(clips), 0
    while batch := list(itertools.islice(clips, batch_size)):
        metric.update(torch.from_numpy(np.stack(batch)).to(device), real=real)
        used += len(batch)
    return used


def _clips(source: str | Path, manifest: dict[str, Any], skipped: list[dict[str, Any]]) -> Iterator[np.ndarray]:
    """The clips of a folder; a broken shard, or one whose bytes differ from the manifest's sha256, is one skip
    that counts the ``samples`` it lost (``listed_samples``)."""
    spec = SampleSpec.from_manifest(manifest)
    listed = [shard["samples"] for shard in manifest["shards"]]
    shards = shard_paths(source, manifest)
    for raw in listed_samples(shards, listed, skipped, keys_held_earlier(shards), listed_sha256(manifest)):
        try:
            yield decode_sample(raw, spec)["video"]
        except BadSample as err:
            skipped.append({"key": raw.get("__key__", "?"), "reason": f"{err.reason}: {err}"})


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["fvd-stats", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
