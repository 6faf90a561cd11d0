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
import json
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


def main(argv: list[str] | None = None) -> int:
    from run_all import DEMO_CHECKPOINT, held_out_samples, positive_int, require_model, wait_policy

    from flowvid.demo import SEED
    from flowvid.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT)
    parser.add_argument("--data", default="data/shapes/val", help="held-out shards of the shapes videos")
    parser.add_argument("--samples", type=positive_int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED, 1, 2, 3, 4])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    require_model(parser, args.ckpt)
    samples = held_out_samples(parser, args.data, args.samples)
    torch.set_num_threads(args.threads)
    module = load_model(args.ckpt)
    results = adherence_per_seed(module, samples, args.seeds)
    for seed, value in results.items():
        print(f"seed {seed}: caption adherence {value:.4f}")
    print(f"mean over {len(results)} seeds: {statistics.mean(results.values()):.4f}")
    if args.json:
        result = {"args": vars(args), "omp_wait_policy": wait_policy(), "results": results}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
