"""``fvd-stats``: FVD reference statistics of a raw shard folder, computed once and cached.

    flowvid data fvd-stats RAW_DIR [--extractor inception-proxy] [--extractor-args JSON]
                           [--frames T] [--max-samples N] [--out FILE] [--force]

Runs an FVD extractor on the clips (``frames.npy``, uint8) of a raw shard folder and writes their
feature mean and covariance with the key they depend on (extractor, weights hash, frames,
resolution, sample count) to an ``.npz``; ``FVDCallback(reference=FILE)`` and
``FrechetVideoDistance.set_reference(FILE)`` load it and refuse a key that does not fit. Without
``--out`` the file is ``RAW_DIR/fvd_stats/<key>.npz``. An existing file with the key this run would
produce is reused unless ``--force``. Unreadable samples are skipped and counted.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from data_tools.arguments import check_registered_arguments, json_object
from data_tools.report import console, print_summary, progress_bar
from flowvid.data.manifest import load_manifest, video_shape
from flowvid.data.shards import BadSample, SampleSpec, decode_sample, listed_samples, shard_paths
from flowvid.metrics.extractor import build_extractor
from flowvid.metrics.fvd import FrechetVideoDistance, ReferenceStats, reference_file_name
from flowvid.paths import check_output_file
from flowvid.placement import resolve_device
from flowvid.registry import FVD_EXTRACTORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RAW_DIR", help="raw shard folder (from from-videos or make-synthetic)")
    parser.add_argument("--extractor", default="inception-proxy",
                        help="registered FVD extractor: i3d (standard FVD, needs its weights) or inception-proxy")
    parser.add_argument("--extractor-args", type=json_object, default={},
                        help='extractor arguments as JSON, e.g. \'{"weights": "i3d_pretrained_400.pt"}\'')
    parser.add_argument("--frames", type=int, default=None, help="use the first T frames of every clip (default: all)")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most N clips (default: all)")
    parser.add_argument("--out", default=None, help="output .npz (default: RAW_DIR/fvd_stats/<key>.npz)")
    parser.add_argument("--force", action="store_true", help="recompute even when the output already exists")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto",
                        help="auto (the first CUDA GPU, else the CPU), cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    for option, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    device = resolve_device(args.device)
    manifest = load_manifest(args.source)
    frames = args.frames or video_shape(manifest)[0]
    check_registered_arguments(FVD_EXTRACTORS, args.extractor, args.extractor_args, "--extractor-args")
    try:
        metric = FrechetVideoDistance(build_extractor(args.extractor, **args.extractor_args))
    except FileNotFoundError as err:  # extractor weights not given or not installed: one line, not a traceback
        console.print(f"[red]error:[/] {err}")
        return 2
    planned = planned_key(manifest, metric, frames, args.max_samples)
    out = Path(args.out) if args.out else Path(args.source) / "fvd_stats" / reference_file_name(**planned)
    check_output_file(out, "--out", "give the .npz file to write")
    if out.is_file() and not args.force and cached_key(out) == planned:
        console.print(f"[green]cached[/] {out} already holds these statistics (--force recomputes)")
        return 0

    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    with progress_bar() as bar:
        task = bar.add_task("clips", total=planned["num_samples"])
        stats = reference_stats(args.source, metric, frames=frames, max_samples=args.max_samples, batch_size=args.batch_size,
                                device=device, skipped=skipped, on_clip=lambda: bar.advance(task))
    stats.save(out)
    seconds = time.perf_counter() - started
    fields = {"file": str(out), "extractor": stats.extractor, "weights sha256": stats.weights_hash[:12] or "-",
              "frames": stats.frames, "resolution": f"{stats.height}x{stats.width}", "samples": stats.num_samples,
              "feature dim": stats.mu.shape[0], "seconds": seconds, "clips_per_second": stats.num_samples / seconds}
    print_summary(f"fvd-stats {args.source}", fields, skipped)
    if stats.num_samples <= stats.mu.shape[0]:
        console.print(f"[yellow]note[/] {stats.num_samples} samples for {stats.mu.shape[0]} features: the covariance is "
                      "singular; FVD still computes but is noisy and biased upwards")
    return 0


def cached_key(out: Path) -> dict[str, Any]:
    """The key of the statistics already in ``out``; a file that holds none is the user's, not replaced."""
    try:
        return ReferenceStats.load(out).key()
    except ValueError as err:
        raise ValueError(f"{err}; give another --out, or --force to replace it") from None


def planned_key(manifest: dict[str, Any], metric: FrechetVideoDistance, frames: int, max_samples: int | None) -> dict[str, Any]:
    """The key the statistics of this folder will have when no sample is skipped."""
    _, height, width = video_shape(manifest)
    samples = manifest["samples"] if max_samples is None else min(max_samples, manifest["samples"])
    return {"extractor": metric.extractor.name, "weights_hash": metric.extractor.weights_hash,
            "frames": frames, "height": height, "width": width, "num_samples": samples}


def reference_stats(
    source: str | Path,
    metric: FrechetVideoDistance,
    frames: int | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    skipped: list[dict[str, str]] | None = None,
    on_clip: Callable[[], None] | None = None,
) -> ReferenceStats:
    """Feature statistics of the first ``max_samples`` usable clips of a raw shard folder (first ``frames`` frames)."""
    manifest = load_manifest(source)
    if manifest["kind"] != "raw":
        raise ValueError(f"{source} holds {manifest['kind']} shards; fvd-stats reads raw video shards (frames.npy)")
    clip_frames = video_shape(manifest)[0]
    frames = frames or clip_frames
    if not 1 <= frames <= clip_frames:
        raise ValueError(f"--frames must be between 1 and the clips' {clip_frames} frames, got {frames}")
    skipped = [] if skipped is None else skipped
    metric = metric.to(device)
    wanted = manifest["samples"] if max_samples is None else max_samples

    def wanted_clips() -> Iterator[np.ndarray]:
        for clip in itertools.islice(_clips(source, manifest, skipped), wanted):
            if on_clip is not None:
                on_clip()
            yield clip[:frames]

    used = feed_in_batches(metric, wanted_clips(), real=True, batch_size=batch_size, device=device)
    if used < 2:
        raise ValueError(f"{source}: {used} usable clips ({len(skipped)} skipped); FVD statistics need at least 2")
    return metric.real_statistics(source=str(source))


def feed_in_batches(metric: FrechetVideoDistance, clips: Iterable[np.ndarray], real: bool, batch_size: int,
                    device: str | torch.device) -> int:
    """Give ``clips`` (uint8 (T, H, W, 3) each) to ``metric``, ``batch_size`` at a time; returns how many."""
    clips, used = iter(clips), 0
    while batch := list(itertools.islice(clips, batch_size)):
        metric.update(torch.from_numpy(np.stack(batch)).to(device), real=real)
        used += len(batch)
    return used


def _clips(source: str | Path, manifest: dict[str, Any], skipped: list[dict[str, str]]) -> Iterator[np.ndarray]:
    spec = SampleSpec.from_manifest(manifest)
    listed = [shard["samples"] for shard in manifest["shards"]]
    for raw in listed_samples(shard_paths(source, manifest), listed, skipped):
        try:
            yield decode_sample(raw, spec)["video"]
        except BadSample as err:
            skipped.append({"key": raw.get("__key__", "?"), "reason": f"{err.reason}: {err}"})


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["fvd-stats", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
