"""Streaming: how soon the first final frame comes, against sampling the whole video first.

    python benchmarks/streaming.py [--ckpt demo_out/run/checkpoints/step=00000640.ckpt]
                                   [--frames 8 32] [--rounds 3] [--threads 2] [--json OUT]

For each length one caption is generated as one video, Jacobi at tol 1e-3 (``flowvid generate``'s
fp32 setting), rounds alternating: once by a pipeline call (sample, then denoise and decode the whole
video) and once by ``VideoPipeline.stream`` (each frame sampled, denoised and decoded as soon as it
can be). The table gives medians: when the first and the last frame arrive, and the call's time.
Lengths beyond the training length slide a window (``WindowedSampler``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch

CAPTION = "a red circle moves left"


def arrival_times(frames: Iterable[object], clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds from the start until each item of ``frames`` arrives (the iteration starts the clock)."""
    start = clock()
    return [clock() - start for _ in frames]


def measure(pipe, frames: int, rounds: int, seed: int = 0) -> dict:
    whole, first, last = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        pipe(CAPTION, frames=frames, seed=seed)
        whole.append(time.perf_counter() - started)
        times = arrival_times(pipe.stream(CAPTION, frames=frames, seed=seed))
        first.append(times[0])
        last.append(times[-1])
    return {"frames": frames, "whole_seconds": statistics.median(whole), "first_frame_seconds": statistics.median(first),
            "stream_seconds": statistics.median(last)}


def markdown(rows: list[dict]) -> str:
    lines = ["| frames | whole video (s) | streamed: first frame (s) | streamed: last frame (s) | first frame / whole |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['frames']} | {r['whole_seconds']:.2f} | {r['first_frame_seconds']:.2f} | {r['stream_seconds']:.2f} "
              f"| {r['first_frame_seconds'] / r['whole_seconds']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from run_all import DEMO_CHECKPOINT, benchmark_parser, load_measured_model, positive_int, save_result

    from flowvid.pipeline import VideoPipeline
    from flowvid.sampling import JacobiSampler

    parser = benchmark_parser(__doc__)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT, help="the trained model: a checkpoint or an export")
    parser.add_argument("--frames", type=positive_int, nargs="+", default=[8, 32], help="video lengths, in frames")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    model = load_measured_model(parser, "--ckpt", args.ckpt)
    torch.set_num_threads(args.threads)
    pipe = VideoPipeline(model, JacobiSampler(tol=1e-3))
    pipe(CAPTION, seed=0)  # warm up
    rows = [measure(pipe, frames, args.rounds) for frames in args.frames]
    print(markdown(rows))
    save_result(args.json, args, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
