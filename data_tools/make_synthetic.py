"""``make-synthetic``: the built-in dataset of captioned moving shapes, made locally, deterministic by seed.

    flowvid data make-synthetic --out DIR --num-videos N [--val-videos V] [--frames 8] [--size 16]
        [--fps 8] [--seed 0] [--shard-samples 64] [--max-objects 2] [--backgrounds plain textured]

Writes ``DIR/train`` and ``DIR/val``; validation holds only (shape, colour, motion) combinations that
training never shows. The same options give the same bytes. A synthetic dataset already there is
written again; one that another tool made (or a ``manifest.json`` of yours) is refused, not replaced.
A clip of more than 64 MiB (frames x size x size x 3 bytes), or a dataset whose frames alone would not
fit on the disk, is refused before anything is drawn.
"""

from __future__ import annotations

import argparse
import sys
import time

from data_tools.report import print_summary, progress_bar
from flowvid.cli import exit_statuses
from flowvid.data.synthetic import BACKGROUNDS, MAX_CLIP_BYTES, checked_recipe, write_checked_recipe


EXIT_STATUS = exit_statuses("the dataset is written")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; gets train/ and val/ shard folders")
    parser.add_argument("--num-videos", type=int, required=True, help="training videos")
    parser.add_argument("--val-videos", type=int, default=None,
                        help="validation videos (default: an eighth of --num-videos, rounded down, and 1 at least)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (2 or more: one frame shows no motion)")
    parser.add_argument("--size", type=int, default=16,
                        help=f"frame height and width in pixels (8 or more; a clip, frames x size x size x 3 "
                             f"bytes, may hold {MAX_CLIP_BYTES // 2**20} MiB at most)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate recorded with the videos")
    parser.add_argument("--seed", type=int, default=0, help="0 or more: the same seed gives the same bytes")
    parser.add_argument("--shard-samples", type=int, default=64, help="most videos per shard")
    parser.add_argument("--max-objects", type=int, default=2, help="objects per video: 1 to this many (1 or 2)")
    parser.add_argument("--backgrounds", nargs="+", default=list(BACKGROUNDS), choices=BACKGROUNDS,
                        help="backgrounds to draw from")


def run(args: argparse.Namespace) -> int:
    # Refused before the progress bar shows:
    recipe = checked_recipe(args.out, args.num_videos, args.frames, args.size, fps=args.fps, seed=args.seed,
                            val_videos=args.val_videos, shard_samples=args.shard_samples,
                            max_objects=args.max_objects, backgrounds=args.backgrounds, name_of=option_name)
    videos = recipe["num_videos"] + recipe["val_videos"]
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("videos", total=videos)
        manifests = write_checked_recipe(args.out, recipe, on_video=lambda: bar.advance(task))
    seconds = time.perf_counter() - started
    fields = {f"{split} videos": m["samples"] for split, m in manifests.items()}
    fields |= {f"{split} shards": m["num_shards"] for split, m in manifests.items()}
    fields |= {"seconds": seconds, "videos_per_second": videos / seconds}
    print_summary(f"make-synthetic -> {args.out}", fields)
    return 0


def option_name(argument: str) -> str:
    """The option that gives a ``write_synthetic_dataset`` argument: ``num_videos`` -> ``--num-videos``."""
    return "--" + argument.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["make-synthetic", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
