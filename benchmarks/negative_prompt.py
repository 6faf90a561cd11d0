"""What a negative prompt does to the demo model's text-to-video samples, read by the attribute probe.

    python benchmarks/negative_prompt.py [--ckpt demo_out/run/checkpoints/step=00000640.ckpt]
                                         [--data data/shapes/val] [--samples 16] [--guidance 1 3] [--json OUT]

Each held-out caption ("a red circle moves left") is sampled as ``flowvid generate`` samples it (Jacobi
at tol 1e-3, the demo's seeds), with the empty caption in guidance's unconditional branch and with three
negative prompts: the same object moving the opposite way, the same shape and motion in another colour,
and an object that shares nothing with the caption. The probe (``flowvid.data.estimate_attributes``)
then reports how often the captioned colour is found, and with it the captioned motion and shape.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowvid.data.synthetic import COLOURS, SHAPES, estimate_attributes

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
NEGATIVES = ("none", "opposite motion", "other colour", "nothing shared")


def negative_caption(kind: str, obj: dict[str, str]) -> str:
    """The negative prompt of ``kind`` for a captioned object ({colour, shape, motion})."""
    other_colour = next(c for c in COLOURS if c != obj["colour"])
    other_shape = next(s for s in SHAPES if s != obj["shape"])
    return {
        "none": "",
        "opposite motion": f"a {obj['colour']} {obj['shape']} moves {OPPOSITE[obj['motion']]}",
        "other colour": f"a {other_colour} {obj['shape']} moves {obj['motion']}",
        "nothing shared": f"a {other_colour} {other_shape} moves {OPPOSITE[obj['motion']]}",
    }[kind]


def attributes_found(video: np.ndarray, obj: dict[str, str]) -> dict[str, bool]:
    """Whether the probe finds the object's colour, and with it its motion, its shape, and all three."""
    found = {o["colour"]: o for o in estimate_attributes(video)["objects"]}.get(obj["colour"])
    motion = found is not None and found["motion"] == obj["motion"]
    shape = found is not None and found["shape"] == obj["shape"]
    return {"colour": found is not None, "motion": motion, "shape": shape, "all": motion and shape}


def measure(module, samples: list[dict[str, Any]], guidance: float, kinds=NEGATIVES, seed: int = 0) -> dict:
    """{kind: {attribute: fraction of samples}} for one guidance weight."""
    from flowvid.generate import Request, run

    results = {}
    for kind in kinds:
        hits = []
        with tempfile.TemporaryDirectory() as folder:
            for index, sample in enumerate(samples):
                [obj] = sample["meta"]["attributes"]["objects"]
                request = Request(task="t2v", prompts=[sample["caption"]], frames=module.video_shape[0],
                                  sampler="jacobi", tol=1e-3, guidance=guidance, seed=seed + index, batch_size=1,
                                  fps=8.0, stream=False, negative_prompt=negative_caption(kind, obj))
                out = Path(folder) / str(index)
                [record] = run(module, request, out)
                hits.append(attributes_found(np.load(out / f"{record['name']}.npy"), obj))
        results[kind] = {name: sum(h[name] for h in hits) / len(hits) for name in hits[0]}
    return results


def markdown(results: dict[float, dict]) -> str:
    lines = ["| guidance | negative prompt | colour | motion | shape | all three |", "|---|---|---|---|---|---|"]
    for guidance, per_kind in results.items():
        for kind, row in per_kind.items():
            lines.append(f"| {guidance:g} | {kind} | {row['colour']:.2f} | {row['motion']:.2f} | {row['shape']:.2f} "
                         f"| {row['all']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from run_all import (DEMO_CHECKPOINT, benchmark_parser, held_out_samples, load_measured_model, positive_float,
                         positive_int, require_model, save_result)

    from flowvid.demo import SEED

    parser = benchmark_parser(__doc__)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT, help="the trained model: a checkpoint or an export")
    parser.add_argument("--data", default="data/shapes/val", help="held-out shards of the shapes videos")
    parser.add_argument("--samples", type=positive_int, default=16, help="held-out captions to sample")
    parser.add_argument("--guidance", type=positive_float, nargs="+", default=[1.0, 3.0],
                        help="guidance weights; a negative prompt steers only with guidance > 0")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    require_model(parser, args.ckpt)
    samples = [s for s in held_out_samples(parser, args.data, args.samples)
               if len(s["meta"]["attributes"]["objects"]) == 1]  # the probe reads one captioned object
    module = load_measured_model(parser, "--ckpt", args.ckpt)
    torch.set_num_threads(args.threads)
    results = {guidance: measure(module, samples, guidance, seed=SEED) for guidance in args.guidance}
    print(markdown(results))
    save_result(args.json, args, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
