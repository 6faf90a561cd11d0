"""Sampling speed: sequential vs Jacobi inversion, in forward passes of the same video.

    python benchmarks/sampling.py [--config demo|large] [--frames 4] [--perturb 0.02 | --train-steps 250]
                                  [--threads 1] [--precision 32-true|bf16-mixed] [--tolerances 0.07 0.1]
                                  [--json OUT]
    python benchmarks/sampling.py --checkpoint demo_out/run/checkpoints/step=00000640.ckpt

A forward (encoding) pass over the video is the floor: Jacobi needs at least one parallel pass. For
every sampler the table gives its wall time in forward passes (every sampler, the sequential one
included, is timed ``--repeats`` times in alternation with a forward pass, so that both see the same
load from other processes, and the fastest of each counts; the process's first, slower forward pass is
a warm-up that no row is measured against), its work in forward passes
(slot evaluations of every block, weighted by the block's parameter count: the same number on any
machine), its relative L2 distance to the exact sequential inverse (per frame of each video in the
JSON, ``relative_l2_per_frame``), its noise residual (the relative L2 distance from the noise to the
sample encoded again: a sample is the exact inverse of that nearby noise), and the passes Jacobi spent
per block kind (the first frame has no earlier frame to warm-start from, so its iterations are listed
apart).

Weights: a freshly built flow is the identity, so the flow is either perturbed (``--perturb STD``,
every parameter moved by N(0, STD^2)) or fitted for a few steps to the synthetic moving-shapes videos
(``--train-steps N``, 16x16 pixels patchified 2x2 into 8x8x12 latents, or 32x32 for ``large``), which
gives the temporally coherent samples that a trained video model makes. ``--checkpoint`` measures a
trained model instead (a checkpoint or an export; a text-conditioned flow samples for the empty
caption), over its full video length.

``--precision bf16-mixed`` runs the Jacobi samplers and the forward pass they are timed against under
bf16 autocast (the affine steps and residuals stay fp32); the exact sequential inverse they are
compared with stays fp32, and a last column gives their wall time in fp32 forward passes too.
Wall-clock numbers depend on the machine and its load, and on the OpenMP wait policy when there is more
than one thread (the output and the JSON record it); the command is the reference.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from flowvid.codecs import PixelCodec
from flowvid.data.synthetic import TRAIN_COMBINATIONS, render_video, sample_attributes
from flowvid.flows import GlobalLocalFlow
from flowvid.placement import precision_context
from flowvid.sampling import JacobiSampler, Sampler, SequentialSampler
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding
from run_all import (benchmark_parser, load_measured_model, non_negative_int, positive_float, positive_int, save_result,
                     wait_policy)

CONFIGS: dict[str, dict] = {
    # The "demo" preset at the demo recipe's latent size (16x16 pixels, patch 2).
    "demo": dict(preset="demo", latent_channels=12, frame_size=(8, 8)),
    # Four times the tokens per frame, twice the deep block's width and depth.
    "large": dict(preset="demo", latent_channels=12, frame_size=(16, 16), deep_width=384, deep_depth=12,
                  shallow_width=192),
}


@dataclass(frozen=True)
class Variant:
    label: str
    sampler: Callable[[], Sampler]


def variants(extra_tolerances: tuple[float, ...] = ()) -> list[Variant]:
    """The samplers measured, the defaults first; then Jacobi at each of ``extra_tolerances``."""
    return [
        Variant("jacobi (defaults: tol 1e-2, affine warm start)", lambda: JacobiSampler()),
        Variant("jacobi tol 3e-2", lambda: JacobiSampler(tol=3e-2)),
        Variant("jacobi tol 1e-3", lambda: JacobiSampler(tol=1e-3)),
        Variant("jacobi, values warm start", lambda: JacobiSampler(warm_start="values")),
        Variant("jacobi, no warm start", lambda: JacobiSampler(warm_start="noise")),
        Variant("jacobi, first blocks of one frame", lambda: JacobiSampler(first_block_size=10**9)),
        Variant("jacobi, later blocks of 16 slots", lambda: JacobiSampler(block_size=16)),
        # The reference's settings: blocks of 32 then 128 slots, previous-frame values, threshold
        # 1e-3 on the *squared* relative change (= 0.0316 on the relative change).
        Variant("jacobi, reference settings", lambda: JacobiSampler(tol=0.0316, first_block_size=32, block_size=128,
                                                                    warm_start="values")),
        *(Variant(f"jacobi tol {tol:g}", lambda tol=tol: JacobiSampler(tol=tol)) for tol in extra_tolerances),
    ]


def build_flow(config: str) -> GlobalLocalFlow:
    settings = dict(CONFIGS[config])
    torch.manual_seed(0)
    return GlobalLocalFlow.from_preset(settings.pop("preset"), text_width=None, **settings)


def shapes_latents(count: int, frames: int, pixels: int, seed: int = 0) -> torch.Tensor:
    """Synthetic moving-shapes videos as patchified pixel latents (count, frames, pixels/2, pixels/2, 12)."""
    rng = np.random.default_rng(seed)
    videos = [render_video(sample_attributes(rng, TRAIN_COMBINATIONS), frames, pixels, seed=int(rng.integers(2**31)))
              for _ in range(count)]
    return PixelCodec(patch_size=2).encode(torch.from_numpy(np.stack(videos)))


def fit_to_shapes(flow: GlobalLocalFlow, steps: int, frames: int, noise_std: float = 0.1, batch: int = 4) -> None:
    """A few steps of maximum likelihood on noise-augmented shapes latents (the demo recipe's optimiser)."""
    data = shapes_latents(256, frames, 2 * flow.frame_size[0])
    optimizer = torch.optim.AdamW(flow.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    flow.train()
    for step in range(steps):
        clips = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = flow.nll(clips + noise_std * torch.randn(clips.shape, generator=generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  fit step {step}: nll {loss.item():.3f} nats/dim", flush=True)
    flow.eval()


def timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def time_against_forward(run: Callable[[], torch.Tensor], forward: Callable[[], object],
                         repeats: int) -> tuple[float, float, torch.Tensor]:
    """Fastest time of ``run`` and of a forward pass, measured in alternation so that both see the
    same load from other processes; and ``run``'s result."""
    run_times, forward_times = [], []
    for _ in range(repeats):
        forward_times.append(timed(forward)[0])
        seconds, result = timed(run)
        run_times.append(seconds)
    return min(run_times), min(forward_times), result


def work_in_forward_passes(flow: GlobalLocalFlow, stats: dict) -> float:
    """Slot evaluations of all blocks in forward passes, each block weighted by its parameter count
    (its matrix-multiply cost per token): a wall-clock-free measure of the cost."""
    shallow = stats["shallow"]
    weights = [sum(p.numel() for p in block.parameters()) for block in flow.blocks]
    passes = [shallow[str(i)]["passes"] for i in range(len(flow.shallow))] + [stats["deep"]["passes"]]
    return sum(w * p for w, p in zip(weights, passes)) / sum(weights)


def passes_in_a_row(stats: dict) -> dict[str, int]:
    """Passes of the deep block and of all shallow blocks, each waiting on the one before: what sets
    the time where a narrow pass costs as much as a wide one (a GPU), whatever the work."""
    shallow = sum(sum(block["iterations"]) for block in stats["shallow"].values())
    return {"deep": sum(stats["deep"]["iterations"]), "shallow": shallow}


def noise_residual(flow: GlobalLocalFlow, x: torch.Tensor, z: torch.Tensor, text: TextEmbedding | None) -> float:
    """``||flow(x) - z|| / ||z||``, encoded in fp32: how far the noise whose exact inverse ``x`` is lies from ``z``."""
    encoded, _ = flow(x.float(), text)
    return ((encoded.reshape(z.shape) - z).norm() / z.norm()).item()


def per_frame_relative_l2(x: torch.Tensor, reference: torch.Tensor) -> list[list[float]]:
    """Relative L2 distance of every frame of every video (B lists of T): where the error grows."""
    difference = (x - reference).flatten(2).norm(dim=2) / reference.flatten(2).norm(dim=2)
    return [[round(value, 6) for value in video] for video in difference.tolist()]


def first_and_later_iterations(stats: dict) -> tuple[float, float]:
    """Mean iterations per deep block in the first frame and after it."""
    deep = stats["deep"]
    first = [i for i, frame in zip(deep["iterations"], deep["block_frames"]) if frame == 0]
    later = [i for i, frame in zip(deep["iterations"], deep["block_frames"]) if frame > 0]
    return float(np.mean(first)) if first else 0.0, float(np.mean(later)) if later else 0.0


def trained_flow(checkpoint: str, batch: int, module=None) -> tuple[GlobalLocalFlow, TextEmbedding | None, int]:
    """The flow of a trained model (``module``, or the one ``checkpoint`` holds), the empty caption's text
    states for ``batch`` videos, and its latent frames."""
    from flowvid.loading import load_model

    module = load_model(checkpoint) if module is None else module
    text = module.encode_text([""] * batch) if module.text_encoder is not None else None
    return module.flow, text, module.latent_shape[0]


@torch.no_grad()
def measure(config: str, frames: int, batch: int, perturb: float, train_steps: int, repeats: int,
            checkpoint: str | None = None, precision: str = "32-true", tolerances: tuple[float, ...] = (),
            model=None) -> dict:
    """``model``: the trained model of ``checkpoint``, when it is loaded already."""
    text = None
    if checkpoint:
        flow, text, frames = trained_flow(checkpoint, batch, model)
        config, weights = "trained", f"trained, {checkpoint}"
    else:
        flow = build_flow(config)
        if train_steps:
            with torch.enable_grad():
                fit_to_shapes(flow, train_steps, frames)
            weights = f"fitted {train_steps} steps to shapes"
        else:
            perturb_parameters(flow, std=perturb)
            weights = f"perturbed, std {perturb}"
    z = torch.randn(batch, frames, *flow.frame_size, flow.latent_channels, generator=torch.Generator().manual_seed(1))
    forward = lambda: flow(z, text)  # noqa: E731 - the same amount of work as encoding the sampled video

    def in_precision(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def wrapped() -> torch.Tensor:
            with precision_context(precision, z.device):
                return run()
        return wrapped

    for warm_up in (forward, in_precision(forward)):  # a process's first pass pays for allocations and kernel choice
        warm_up()
    seconds, forward_seconds, reference = time_against_forward(lambda: SequentialSampler().sample(flow, z, text),
                                                               forward, repeats)
    rows = [{"sampler": "sequential", "seconds": seconds, "forward_passes": seconds / forward_seconds,
             "work": 1.0, "relative_l2": 0.0, "noise_residual": noise_residual(flow, reference, z, text)}]
    print(f"  sequential: {seconds:.3f} s", flush=True)
    for variant in variants(tolerances):
        sampler = variant.sampler()
        seconds, forward_seconds, x = time_against_forward(in_precision(lambda: sampler.sample(flow, z, text)),
                                                           in_precision(forward), repeats)
        stats = sampler.last_stats
        first, later = first_and_later_iterations(stats)
        rows.append({
            "sampler": variant.label, "seconds": seconds, "forward_passes": seconds / forward_seconds,
            "work": work_in_forward_passes(flow, stats),
            "relative_l2": ((x - reference).norm() / reference.norm()).item(),
            "relative_l2_per_frame": per_frame_relative_l2(x, reference),
            "noise_residual": noise_residual(flow, x, z, text),
            "deep_passes": stats["deep"]["passes"],
            "shallow_passes": float(np.mean([s["passes"] for s in stats["shallow"].values()])),
            "first_frame_iterations": first, "later_iterations": later,
            "passes_in_a_row": passes_in_a_row(stats),
            "unconverged_blocks": stats["deep"]["unconverged_blocks"],
        })
        print(f"  {variant.label}: {seconds:.3f} s", flush=True)
    parameters = sum(p.numel() for p in flow.parameters())
    forward_seconds = min(timed(forward)[0] for _ in range(3))
    precision_forward_seconds = (forward_seconds if precision == "32-true"
                                 else min(timed(in_precision(forward))[0] for _ in range(3)))
    for row in rows:
        row["fp32_forward_passes"] = row["seconds"] / forward_seconds
    return {"config": config, "parameters": parameters, "weights": weights, "video": [batch, frames, *flow.frame_size,
            flow.latent_channels], "precision": precision, "forward_seconds": forward_seconds,
            "precision_forward_seconds": precision_forward_seconds, "rows": rows}


def markdown(result: dict) -> str:
    b, t, h, w, c = result["video"]
    mixed = result["precision"] != "32-true"
    forward = f"one forward pass about {result['forward_seconds'] * 1e3:.0f} ms"
    if mixed:
        forward += f" in fp32, {result['precision_forward_seconds'] * 1e3:.0f} ms in {result['precision']}"
    lines = [
        f"**{result['config']}** ({result['parameters'] / 1e6:.2f}M parameters, {result['weights']}), "
        f"video {b}x{t}x{h}x{w}x{c}, {forward}; Jacobi in {result['precision']}",
        "",
        "| sampler | time (s) | wall time in forward passes | work in forward passes | rel. L2 to sequential "
        "| noise residual | deep passes | shallow passes | iterations/block, first frame | iterations/block, later "
        "| passes in a row, deep + shallow |" + (" wall time in fp32 forward passes |" if mixed else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else ""),
    ]
    for row in result["rows"]:
        fp32 = f" {row['fp32_forward_passes']:.2f} |" if mixed else ""
        if row["sampler"] == "sequential":
            lines.append(f"| sequential (exact, fp32) | {row['seconds']:.2f} | {row['forward_passes']:.1f} "
                         f"| 1 (in {t * h * w} passes of one token) | 0 | {row['noise_residual']:.1e} | | | | | |" + fp32)
            continue
        lines.append(
            f"| {row['sampler']} | {row['seconds']:.3f} | {row['forward_passes']:.2f} | {row['work']:.2f} "
            f"| {row['relative_l2']:.1e} | {row['noise_residual']:.1e} | {row['deep_passes']:.2f} | {row['shallow_passes']:.2f} "
            f"| {row['first_frame_iterations']:.1f} | {row['later_iterations']:.1f} "
            f"| {row['passes_in_a_row']['deep']} + {row['passes_in_a_row']['shallow']} |" + fp32
        )
    return "\n".join(lines)


#: The options that say how the measured flow is built, which a trained model given by --checkpoint replaces.
BUILT_MODEL_OPTIONS = ("config", "frames", "perturb", "train_steps")


def check_nothing_built_is_asked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with ``--checkpoint``, the options of a built flow: the trained model is measured as it is,
    over its full video length, and its JSON would record settings that were never used."""
    given = [f"--{name.replace('_', '-')}" for name in BUILT_MODEL_OPTIONS
             if getattr(args, name) != parser.get_default(name)]
    if given:
        parser.error(f"{', '.join(given)} describe the flow built when no --checkpoint is given; the checkpoint's "
                     "model is measured as it was trained, over its full video length: leave them out")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo",
                        help="size of the flow (not with --checkpoint)")
    parser.add_argument("--frames", type=positive_int, default=4,
                        help="latent frames of the video (not with --checkpoint)")
    parser.add_argument("--batch", type=positive_int, default=2, help="videos sampled at once")
    parser.add_argument("--perturb", type=positive_float, default=0.02,
                        help="std of the weight perturbation (unperturbed, the flow is the identity; not with "
                             "--checkpoint)")
    parser.add_argument("--train-steps", type=non_negative_int, default=0,
                        help="fit the flow to shapes videos for this many steps instead of perturbing it (not "
                             "with --checkpoint)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per sampler; the fastest counts")
    parser.add_argument("--checkpoint", default=None, help="measure this trained model (checkpoint or export)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true",
                        help="precision of the Jacobi samplers and their forward pass")
    parser.add_argument("--tolerances", type=positive_float, nargs="*", default=[],
                        help="also measure Jacobi (default settings) at these tolerances")
    args = parser.parse_args(argv)
    if args.checkpoint:
        check_nothing_built_is_asked(parser, args)
    model = load_measured_model(parser, "--checkpoint", args.checkpoint) if args.checkpoint else None
    torch.set_num_threads(args.threads)
    print(f"# sampling benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.precision}, OMP_WAIT_POLICY: {wait_policy()}", flush=True)
    result = measure(args.config, args.frames, args.batch, args.perturb, args.train_steps, args.repeats,
                     args.checkpoint, args.precision, tuple(args.tolerances), model)
    print(markdown(result))
    save_result(args.json, args, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
