"""Training throughput: tokens/s of a full training step and its model FLOPs utilisation (MFU).

    python benchmarks/train_throughput.py [--widths 128 256] [--rounds 8] [--threads 2]
                                          [--frames 4] [--precision 32-true|bf16-mixed]
                                          [--reference PATH] [--compile] [--json OUT]

A training step is what ``FlowModule`` does to the flow: the forward pass through every block, the
maximum-likelihood loss ``0.5 mean(z^2) - log|det| / D``, the backward pass, gradient clipping at norm 1
and one AdamW step (betas 0.9 / 0.95, weight decay 1e-4; fused, as FlowModule's, while the reference
steps with the default AdamW of its training script). Models are built from
``reference.SharedConfig``: three frame-local shallow blocks of two layers and a text-conditioned deep
block, all of one width, on videos of 4 frames of 8 x 8 latents of 8 channels with 16 text tokens.

FLOP conventions (both printed):

* **MFU** = model FLOPs per second / measured matmul FLOP/s, with model FLOPs = 6 x parameters x
  video tokens per step (2 in the forward and 4 in the backward pass per parameter and token; text
  tokens and attention not counted, the usual LLM convention).
* **HFU** counts what the step executes: every matmul (counted by ``torch.utils.flop_counter``, text
  tokens included) plus attention, ``12 x queries x keys x width`` per layer for forward and backward,
  over the keys the kernels visit (``attention_flops``).

The denominator is the FLOP/s of a 2048 x 2048 matmul measured in the same run, one matmul per round
between the training steps, so that the load of a shared machine hits both alike; it runs in the
precision of the network's matmuls: fp32, or bf16 under ``--precision bf16-mixed`` (the step then runs
under ``torch.autocast`` in bf16, as Lightning's ``bf16-mixed`` does; on CPUs with AVX512-BF16 or AMX). With
``--reference`` the reference implementation runs the same configuration in the same rounds (its order
alternating with ours); ratios are taken per round and their median reported. The GPU counterpart
(bf16-mixed, a 0.36B flow) is ``gpu.py``.

The step runs under the OpenMP wait policy of the environment (``make bench`` and the Makefile set
``OMP_WAIT_POLICY=PASSIVE``; set it yourself before a run by hand), which the output and the JSON
record: ``run_all.py`` compares the policies, so this script must not pick one of its own.
"""

from __future__ import annotations

import platform
import statistics
import time
from copy import deepcopy
from dataclasses import replace
from types import ModuleType
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from flowvid.nn.attention import attention_bands, prefix_causal_mask
from flowvid.placement import precision_context
from reference import SharedConfig, build_reference, load_reference, reference_loss, reference_video
from run_all import benchmark_parser, multiple_of, positive_int, save_result, wait_policy

MATMUL_SIZE = 2048
#: Lightning's precision names and the dtype of the network's matmuls in each.
MATMUL_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def flow_loss(flow, x: torch.Tensor, text) -> torch.Tensor:
    """FlowModule's maximum-likelihood loss: ``0.5 mean(z^2) - mean(log|det|) / D``."""
    z, logdet = flow(x, text)
    return 0.5 * z.pow(2).flatten(1).mean(1).mean() - (logdet / x[0].numel()).mean()


def make_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], fused: bool = True,
              precision: str = "32-true") -> Callable[[], float]:
    """One training step of ``model`` (as FlowModule takes it): loss, backward, clip, AdamW.

    ``fused`` picks AdamW's fused kernel, which FlowModule uses; the reference's training script uses
    the default, a loop of small kernels per parameter. ``precision="bf16-mixed"`` runs the loss under
    bf16 autocast (the weights, gradients and optimiser stay fp32, as with Lightning's).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=fused)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(precision, torch.device("cpu")):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return value.item()

    return step


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def matmul_benchmark(size: int = MATMUL_SIZE, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], float]:
    """A square matmul in ``dtype`` into a preallocated output, and its FLOPs."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops(parameters: int, config: SharedConfig) -> float:
    """6 x parameters x video tokens of one step."""
    return 6.0 * parameters * config.batch * config.tokens


def attention_flops(config: SharedConfig) -> float:
    """Attention products of one step (forward + backward): ``12 x queries x keys x width`` per layer,
    with the keys the kernels visit: a frame's full square in the frame-local blocks, the bands of
    ``banded_attention`` (or the full square, when it does not split) in the text-conditioned deep block."""
    per_frame = config.frame_size[0] * config.frame_size[1]
    shallow_layers = config.shallow_blocks * config.shallow_depth
    shallow = shallow_layers * config.batch * config.frames * per_frame**2
    length = config.tokens + config.text_length
    mask = prefix_causal_mask(length, 0, length, torch.ones(1, config.text_length, dtype=torch.bool))
    bands = attention_bands(mask) or [(0, length, 0, length)]
    products = sum((end - first) * (key_end - key_first) for first, end, key_first, key_end in bands)
    deep = config.deep_depth * config.batch * products
    return 12.0 * config.width * (shallow + deep)


def counted_matmul_flops(step: Callable[[], float]) -> float:
    """Matmul FLOPs of one step as executed (forward and backward), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def compiled_copy(flow: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``flow`` with every block's forward compiled, as ``FlowModule(compile_flow=True)`` does."""
    copy = deepcopy(flow)
    copy.compile_blocks()
    return copy


def measure_width(config: SharedConfig, rounds: int, reference: ModuleType | None, precision: str = "32-true",
                  compile_flow: bool = False) -> dict:
    """Interleaved rounds of (our step, the step of ``reference``'s model if given, one matmul); medians and
    per-round ratios.

    ``compile_flow`` adds a third step: the same flow with its blocks compiled (compilation happens in
    the warm-up step and is timed apart)."""
    torch.manual_seed(0)
    flow = config.build_flow()
    x, text = config.inputs()
    steps = {"flowvid": make_step(flow, lambda: flow_loss(flow, x, text), precision=precision)}
    parameters = {"flowvid": parameter_count(flow)}
    if compile_flow:
        compiled = compiled_copy(flow)
        steps["flowvid-compiled"] = make_step(compiled, lambda: flow_loss(compiled, x, text), precision=precision)
        parameters["flowvid-compiled"] = parameters["flowvid"]
    if reference:
        model = build_reference(reference, config)
        video = reference_video(x)
        steps["reference"] = make_step(model, lambda: reference_loss(model, video, text), fused=False,
                                       precision=precision)
        parameters["reference"] = parameter_count(model)
    matmul, matmul_flops = matmul_benchmark(dtype=MATMUL_DTYPES[precision])
    executed = counted_matmul_flops(steps["flowvid"]) + attention_flops(config)
    warm_up_s = {name: timed(step) for name, step in steps.items()}  # first-touch allocations, kernels, compiling
    matmul()
    times: dict[str, list[float]] = {name: [] for name in [*steps, "matmul"]}
    for index in range(rounds):
        order = list(steps) if index % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(timed(steps[name]))
        times["matmul"].append(timed(matmul))
    matmul_rates = [matmul_flops / t for t in times["matmul"]]
    tokens = config.batch * config.tokens
    result = {
        "config": config.label(), "width": config.width, "precision": precision, "parameters": parameters["flowvid"],
        "tokens_per_step": tokens, "model_flops_per_step": model_flops(parameters["flowvid"], config),
        "executed_flops_per_step": executed, "matmul_gflops": statistics.median(matmul_rates) / 1e9,
        "rounds": rounds, "implementations": {},
    }
    for name in steps:
        step_times = times[name]
        flops = model_flops(parameters[name], config)
        result["implementations"][name] = {
            "parameters": parameters[name],
            "step_ms": statistics.median(step_times) * 1e3,
            "tokens_per_s": tokens / statistics.median(step_times),
            "mfu": statistics.median(flops / t / rate for t, rate in zip(step_times, matmul_rates)),
            "hfu": statistics.median(executed / t / rate for t, rate in zip(step_times, matmul_rates)),
        }
    if "reference" in steps:
        ratios = [r / o for o, r in zip(times["flowvid"], times["reference"])]
        result["speedup_over_reference"] = statistics.median(ratios)
        result["speedup_per_round"] = [round(r, 3) for r in ratios]
    if compile_flow:
        result["compile_s"] = warm_up_s["flowvid-compiled"] - warm_up_s["flowvid"]
        result["compiled_speedup_over_eager"] = statistics.median(
            e / c for e, c in zip(times["flowvid"], times["flowvid-compiled"]))
        if "reference" in steps:
            result["compiled_speedup_over_reference"] = statistics.median(
                r / c for c, r in zip(times["flowvid-compiled"], times["reference"]))
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| width | parameters | implementation | step (ms) | tokens/s | MFU (6PT) | HFU (executed) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, row in result["implementations"].items():
            speedup = {"flowvid": result.get("speedup_over_reference"),
                       "flowvid-compiled": result.get("compiled_speedup_over_reference")}.get(name)
            speedup = f"{speedup:.2f}x" if speedup else ""
            hfu = f"{row['hfu']:.0%}" if name.startswith("flowvid") else ""
            lines.append(f"| {result['width']} | {row['parameters'] / 1e6:.2f}M | {name} | {row['step_ms']:.0f} "
                         f"| {row['tokens_per_s']:.0f} | {row['mfu']:.0%} | {hfu} | {speedup} |")
    lines.append("")
    lines.append(", ".join(f"width {r['width']}: {r['precision']} matmul {r['matmul_gflops']:.1f} GFLOP/s"
                           for r in results))
    for r in results:
        if "compile_s" in r:
            lines.append(f"width {r['width']}: compiled {r['compiled_speedup_over_eager']:.2f}x eager, "
                         f"compilation {r['compile_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--widths", type=multiple_of(64, "the attention head width"), nargs="+", default=[128, 256],
                        help="deep block widths, multiples of 64 (the attention head width)")
    parser.add_argument("--deep-depth", type=positive_int, default=4, help="layers of the deep block")
    parser.add_argument("--batch", type=positive_int, default=8, help="videos per training step")
    parser.add_argument("--frames", type=positive_int, default=4, help="latent frames per video")
    parser.add_argument("--rounds", type=positive_int, default=8, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--precision", choices=list(MATMUL_DTYPES), default="32-true",
                        help="bf16-mixed: the step under bf16 autocast, MFU against the bf16 matmul")
    parser.add_argument("--reference", default=None, help="checkout of apple/ml-starflow to compare against")
    parser.add_argument("--compile", action="store_true",
                        help="also time the flow with its blocks compiled (FlowModule's compile_flow)")
    args = parser.parse_args(argv)
    reference = None
    if args.reference:
        try:
            reference = load_reference(args.reference)
        except FileNotFoundError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    print(f"# training throughput: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.precision}, OMP_WAIT_POLICY: {wait_policy()}", flush=True)
    results = []
    for width in args.widths:
        config = replace(SharedConfig(), width=width, deep_depth=args.deep_depth, batch=args.batch,
                         frames=args.frames)
        results.append(measure_width(config, args.rounds, reference, args.precision, args.compile))
        print(f"  width {width} done", flush=True)
    print(markdown(results))
    save_result(args.json, args, {"threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
