"""Caption adherence of a trained model over several sampling seeds: how much of a demo's figure is chance.

    python benchmarks/adherence.py [--ckpt demo_out/run/checkpoints/step=00000640.ckpt]
                                   [--data data/shapes/val] [--samples 16] [--seeds 1234 1 2 3 4] [--json OUT]

The held-out captions are sampled as ``make demo`` samples them (Jacobi at tol 1e-3, the model's
guidance, one batch), once per seed, and the attribute probe scores each batch
(``flowvid.data.caption_adherence``: the captioned colour, motion and shape all found). One seed's
figure for 16 captions moves by about ±0.07 from seed to seed; the mean over seeds is the model's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowvid.data.synthetic import caption_adherence


def adherence_per_seed(module, samples: list[dict[str, Any]], seeds: list[int]) -> dict[int, float]:
    """{seed: caption adherence of the samples' captions sampled with that seed}."""
    from flowvid.generate import Request, run

    captions = [s["caption"] for s in samples]
    attributes = [s["meta"]["attributes"] for s in samples]
    results = {}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as folder:
            request = Request(task="t2v", prompts=captions, frames=module.video_shape[0], sampler="jacobi", tol=1e-3,
                              guidance=module.guidance, seed=seed, batch_size=len(captions), fps=8.0, stream=False)
            records = run(module, request, Path(folder))
            videos = [np.load(Path(folder) / f"{record['name']}.npy") for record in records]
        results[seed] = caption_adherence(videos, attributes)
    return results


def check_seeds(parser: argparse.ArgumentParser, seeds: list[int], samples: int) -> None:
    """Stop with one line, before the model loads, on a seed the sampler would refuse (caption i of
    ``samples`` uses seed + i) or a seed given twice (its run would count once in the mean)."""
    from flowvid.sampling.tasks import check_seed

    for seed in seeds:
        try:
            check_seed(seed, samples, name="--seeds")
        except ValueError as error:
            parser.error(str(error))
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        parser.error(f"--seeds: each seed once, got {', '.join(map(str, repeated))} more than once")


def main(argv: list[str] | None = None) -> int:
    from run_all import (DEMO_CHECKPOINT, benchmark_parser, held_out_samples, load_measured_model, positive_int,
                         require_model, save_result)

    from flowvid.demo import SEED

    parser = benchmark_parser(__doc__)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT, help="the trained model: a checkpoint or an export")
    parser.add_argument("--data", default="data/shapes/val", help="held-out shards of the shapes videos")
    parser.add_argument("--samples", type=positive_int, default=16, help="held-out captions to sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED, 1, 2, 3, 4],
                        help="sampling seeds, each a run over all the captions (caption i uses seed + i)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    check_seeds(parser, args.seeds, args.samples)
    require_model(parser, args.ckpt)
    samples = held_out_samples(parser, args.data, args.samples)
    module = load_measured_model(parser, "--ckpt", args.ckpt)
    torch.set_num_threads(args.threads)
    results = adherence_per_seed(module, samples, args.seeds)
    for seed, value in results.items():
        print(f"seed {seed}: caption adherence {value:.4f}")
    print(f"mean over {len(results)} seeds: {statistics.mean(results.values()):.4f}")
    save_result(args.json, args, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
