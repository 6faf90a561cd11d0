"""The reference implementation (apple/ml-starflow) configured like a flowvid flow, for side-by-side timing.

    python benchmarks/reference.py --reference PATH [--fit-steps 250] [--rounds 5] [--json OUT]

The reference is never part of flowvid: ``PATH`` is a checkout of it (the folder holding
``transformer_flow.py`` and ``misc/``), given on the command line. Both implementations are built from
one ``SharedConfig`` so that they do the same arithmetic: the same shallow/deep split, widths, depths,
head size, MLP ratio, text length and width, the same frame-local shallow blocks with alternating
directions and the same SOS token, soft clip, softplus scale and final RMSNorm; their parameter counts
are equal. ``train_throughput.py --reference PATH`` times their training steps.

Run as a script, this file compares Jacobi sampling. Our flow is fitted to the moving-shapes videos
(``sampling.fit_to_shapes``) and its weights are copied into the reference model (the names map one to
one and the query and key rows go to the reference's rotary layout, ``flowvid.convert``), so both invert
nearly the same function: the video part is identical, the text part differs (the reference rotates
text positions and reads the text causally; flowvid does neither). Each implementation's Jacobi output
is compared with its own exact sequential inverse, and all timings of one round are taken back to
back: our forward pass, our Jacobi, the reference's Jacobi, the reference's forward pass.

The reference's Jacobi calls ``torch.distributed.all_reduce`` unconditionally, so
``single_process_group`` starts a one-process gloo group first.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn

from flowvid.flows import GlobalLocalFlow
from flowvid.text.base import TextEmbedding
from run_all import benchmark_parser, positive_float, positive_int, save_result, wait_policy


@dataclass(frozen=True)
class SharedConfig:
    """One flow configuration that both implementations can build.

    ``shallow_blocks`` frame-local blocks of ``shallow_depth`` layers, then a text-conditioned deep block
    of ``deep_depth`` layers, all of width ``width``; videos of ``frames`` x ``frame_size`` x
    ``channels`` latents; ``text_length`` text tokens of width ``text_width``.
    """

    width: int = 128
    deep_depth: int = 4
    shallow_blocks: int = 3
    shallow_depth: int = 2
    head_dim: int = 64
    channels: int = 8
    frame_size: tuple[int, int] = (8, 8)
    frames: int = 4
    text_length: int = 16
    text_width: int = 64
    batch: int = 8

    @property
    def tokens(self) -> int:
        """Video tokens per sample (text tokens not counted)."""
        return self.frames * self.frame_size[0] * self.frame_size[1]

    def label(self) -> str:
        h, w = self.frame_size
        return (f"width {self.width}, {self.shallow_blocks}x{self.shallow_depth} shallow + {self.deep_depth} deep "
                f"layers, batch {self.batch} x {self.frames}x{h}x{w}x{self.channels} + {self.text_length} text tokens")

    def build_flow(self) -> GlobalLocalFlow:
        return GlobalLocalFlow(
            latent_channels=self.channels, frame_size=self.frame_size, num_shallow=self.shallow_blocks,
            shallow_width=self.width, shallow_depth=self.shallow_depth, deep_width=self.width,
            deep_depth=self.deep_depth, head_dim=self.head_dim, text_width=self.text_width,
        )

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, TextEmbedding]:
        """Latents (B, T, h, w, c) and fully valid text states (B, L, D), the same for both models."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.frames, *self.frame_size, self.channels, generator=generator)
        tokens = torch.randn(self.batch, self.text_length, self.text_width, generator=generator)
        return x, TextEmbedding(tokens, torch.ones(self.batch, self.text_length, dtype=torch.bool))


def check_reference(path: str | os.PathLike) -> Path:
    """The whole path of a checkout of the reference implementation; a FileNotFoundError saying what is
    missing when ``path`` is none."""
    folder = Path(path).resolve()
    if not (folder / "transformer_flow.py").is_file() or not (folder / "misc").is_dir():
        raise FileNotFoundError(f"{folder} is not a checkout of the reference implementation: expected "
                                "transformer_flow.py and misc/ in it")
    return folder


def load_reference(path: str | os.PathLike) -> ModuleType:
    """Import ``transformer_flow`` from a checkout of the reference implementation."""
    folder = check_reference(path)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("transformer_flow")


def build_reference(module: ModuleType, config: SharedConfig) -> nn.Module:
    """The reference's STARFlow-V model with the configuration's sizes.

    With ``seq_order='L2R'`` its bottom blocks alternate flip / identity starting from a flip and its
    top block uses the identity when the block count is even, which is flowvid's order for an odd
    number of shallow blocks. ``pt_seq_len=32`` puts spatial positions on flowvid's rotary scale.
    """
    h, w = config.frame_size
    if h != w:
        raise ValueError(f"the reference takes square frames, got {config.frame_size}")
    return module.Model(
        in_channels=config.channels, img_size=h, patch_size=1, pt_seq_len=32, channels=config.width,
        num_blocks=config.shallow_blocks + 1,
        layers_per_block=[config.shallow_depth] * config.shallow_blocks + [config.deep_depth],
        head_dim=config.head_dim, rope=True, sos=True, txt_size=config.text_length, txt_dim=config.text_width,
        cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R",
        temporal_causal=1, shallow_block_local=True,
    )


def reference_video(x: torch.Tensor) -> torch.Tensor:
    """flowvid latents (B, T, h, w, c) in the reference's video layout (B, T, c, h, w)."""
    return x.permute(0, 1, 4, 2, 3).contiguous()


def reference_loss(model: nn.Module, x: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
    """The reference's maximum-likelihood loss of one batch (the quantity its training step minimises)."""
    z, _, _, logdets = model(x, text.tokens)
    return model.get_loss(z, logdets)["loss"]


def single_process_group() -> None:
    """A one-process gloo group: the reference's Jacobi all-reduces its stopping test unconditionally."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)


@torch.no_grad()
def reference_jacobi(model: nn.Module, z: torch.Tensor, text: TextEmbedding, block_size: int,
                     threshold: float, max_iterations: int = 32) -> torch.Tensor:
    """The reference's Jacobi sampling of noise ``z`` in its own layout (B, T, c, h, w).

    ``threshold`` bounds its stopping test, ``mean((new - old)^2) / mean(new^2)``: the square of
    flowvid's relative change.
    """
    single_process_group()
    return model.reverse(z, text.tokens, guidance=0.0, jacobi=True, jacobi_block_size=block_size,
                         jacobi_th=threshold, jacobi_max_iter=max_iterations)


def copy_weights(flow: GlobalLocalFlow, model: nn.Module) -> None:
    """Make the reference model's parameters those of ``flow`` (strict: every parameter is set), with the
    query and key rows in the reference's rotary layout (``flowvid.convert.rotary_layout``), so that the
    video part of both models is the same function."""
    from flowvid.convert import from_reference

    state, ours = model.state_dict(), flow.state_dict()
    names = from_reference(state, flow.deep.spec.head_dim).names
    if set(names) != set(ours):
        raise ValueError(f"parameter names differ: {sorted(set(names) ^ set(ours))[:6]}")
    # Importing is its own inverse: importing our weights under the reference's names lays them out as it does.
    theirs = from_reference({names[name]: tensor for name, tensor in ours.items()}, flow.deep.spec.head_dim).flow
    with torch.no_grad():
        for name, reference_name in names.items():
            state[reference_name].copy_(theirs[name])


def relative_l2(x: torch.Tensor, exact: torch.Tensor) -> float:
    return ((x - exact).norm() / exact.norm()).item()


def compare_jacobi(reference: ModuleType, fit_steps: int, rounds: int, tols: list[float], threshold: float,
                   reference_block_size: int) -> dict:
    """Our Jacobi sampler (at each tolerance) and the reference's (the module ``load_reference`` gives) on
    the same fitted weights and noise."""
    from sampling import fit_to_shapes

    from flowvid.sampling import JacobiSampler, SequentialSampler

    config = SharedConfig(channels=12, batch=2)  # the shapes videos: 16 x 16 pixels, patch 2 -> 8 x 8 x 12
    torch.manual_seed(0)
    flow = config.build_flow()
    fit_to_shapes(flow, fit_steps, config.frames)
    flow.eval()
    model = build_reference(reference, config).eval()
    copy_weights(flow, model)
    _, text = config.inputs()
    text = TextEmbedding(torch.zeros_like(text.tokens), text.mask)  # the flow was fitted without captions
    z = torch.randn(config.batch, config.frames, *config.frame_size, config.channels,
                    generator=torch.Generator().manual_seed(1))
    z_reference = reference_video(z)
    single_process_group()
    samplers = {tol: JacobiSampler(tol=tol) for tol in tols}
    runs = {
        "forward": lambda: flow(exact, text),
        **{tol: (lambda sampler=sampler: sampler.sample(flow, z, text)) for tol, sampler in samplers.items()},
        "reference": lambda: reference_jacobi(model, z_reference, text, reference_block_size, threshold),
        "reference_forward": lambda: model(exact_reference, text.tokens),
    }
    with torch.no_grad():
        exact = SequentialSampler().sample(flow, z, text)
        exact_reference = model.reverse(z_reference, text.tokens, jacobi=False)
        times: dict = {name: [] for name in runs}
        outputs: dict = {}
        for _ in range(rounds):  # one round: every run back to back, so the machine's load hits all alike
            for name, run in runs.items():
                started = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - started)
    reference_seconds = times["reference"]
    rows = [{
        "tol": tol, "seconds": statistics.median(times[tol]),
        "forward_passes": statistics.median(t / f for t, f in zip(times[tol], times["forward"])),
        "relative_l2": relative_l2(outputs[tol], exact),
        "speedup_over_reference": statistics.median(r / t for t, r in zip(times[tol], reference_seconds)),
        "passes": {"deep": samplers[tol].last_stats["deep"]["passes"],
                   "shallow": [s["passes"] for s in samplers[tol].last_stats["shallow"].values()]},
    } for tol in tols]
    return {
        "config": config.label(), "fit_steps": fit_steps, "rounds": rounds, "flowvid": rows,
        "reference": {
            "threshold": threshold, "block_size": reference_block_size, "seconds": statistics.median(reference_seconds),
            "forward_passes": statistics.median(r / f for r, f in zip(reference_seconds, times["reference_forward"])),
            "relative_l2": relative_l2(outputs["reference"], exact_reference),
        },
    }


def markdown(result: dict) -> str:
    theirs = result["reference"]
    lines = [
        f"{result['config']}; fitted {result['fit_steps']} steps to the shapes videos; "
        f"median of {result['rounds']} rounds",
        "",
        "| sampler | setting | time (s) | forward passes of wall time | rel. L2 to its exact inverse | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| flowvid JacobiSampler | tol {row['tol']:g} (relative change) | {row['seconds']:.3f} "
              f"| {row['forward_passes']:.2f} | {row['relative_l2']:.1e} | {row['speedup_over_reference']:.2f}x |"
              for row in result["flowvid"]]
    lines.append(f"| reference Jacobi | threshold {theirs['threshold']:g} (squared relative change), blocks of "
                 f"{theirs['block_size']} | {theirs['seconds']:.3f} | {theirs['forward_passes']:.2f} "
                 f"| {theirs['relative_l2']:.1e} | 1 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--reference", required=True, help="checkout of apple/ml-starflow")
    parser.add_argument("--fit-steps", type=positive_int, default=250,
                        help="maximum-likelihood steps on the shapes videos (unfitted, the flow is the identity)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds; medians are reported")
    parser.add_argument("--tol", type=positive_float, nargs="+", default=[0.0316, 0.1],
                        help="our tolerances on the relative change (0.0316: the square root of the reference's)")
    parser.add_argument("--threshold", type=positive_float, default=1e-3,
                        help="the reference's threshold on the squared relative change (its scripts' value)")
    parser.add_argument("--reference-block-size", type=positive_int, default=32,
                        help="slots per Jacobi block of the reference, as its own code sets them")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    try:
        reference = load_reference(args.reference)  # before minutes of fitting, not after
    except FileNotFoundError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    print(f"# Jacobi sampling, flowvid vs reference: torch {torch.__version__}, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY: {wait_policy()}", flush=True)
    result = compare_jacobi(reference, args.fit_steps, args.rounds, args.tol, args.threshold,
                            args.reference_block_size)
    print(markdown(result))
    save_result(args.json, args, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
