"""Fine-tuning cost: a training step that updates every weight of the flow against one through LoRA.

    python benchmarks/finetune.py [--widths 192 384] [--rank 16] [--rounds 6] [--threads 2] [--json OUT]

Both variants start from the same flow (the demo preset at the demo recipe's latent size, the deep
block at each ``--widths``) and take the same step: forward, the maximum-likelihood loss, backward and
fused AdamW over what trains. Under LoRA the flow's weights are frozen, so the backward pass skips
their gradients (about a third of a step's matmuls) and AdamW keeps state for the adapters only.
Rounds alternate the two variants; the table gives medians, the trainable parameters and the AdamW
state (two fp32 moments per trainable parameter).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.nn.lora import add_lora
from flowvid.testing import perturb_parameters
from run_all import benchmark_parser, multiple_of, positive_int, save_result, wait_policy

VIDEO = (8, 8, 8, 12)  # latent frames, height, width, channels of the demo recipe


def build_flow(deep_width: int, rank: int | None) -> GlobalLocalFlow:
    """The demo preset with a deep block of ``deep_width``; with ``rank``, adapted (weights frozen)."""
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("demo", latent_channels=VIDEO[3], frame_size=VIDEO[1:3], text_width=None,
                                       deep_width=deep_width)
    perturb_parameters(flow, std=0.02)
    if rank is not None:
        flow.requires_grad_(False)
        add_lora(flow, rank)
    return flow.train()


def training_step(flow: GlobalLocalFlow, batch: int) -> Callable[[], float]:
    """One step of maximum likelihood on fixed noise; returns the loss."""
    x = torch.randn(batch, *VIDEO, generator=torch.Generator().manual_seed(0))
    trainable = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = flow.nll(x).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measure_width(deep_width: int, rank: int, rounds: int, batch: int) -> dict:
    variants = {"full": build_flow(deep_width, None), f"lora r{rank}": build_flow(deep_width, rank)}
    steps = {name: training_step(flow, batch) for name, flow in variants.items()}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            started = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - started)
    rows = {}
    for name, flow in variants.items():
        trainable = sum(p.numel() for p in flow.parameters() if p.requires_grad)
        rows[name] = {
            "step_ms": 1e3 * statistics.median(times[name]),
            "parameters": sum(p.numel() for p in flow.parameters()),
            "trainable": trainable,
            "adamw_state_mib": 2 * 4 * trainable / 2**20,
        }
    full = rows["full"]["step_ms"]
    for row in rows.values():
        row["speed_up"] = full / row["step_ms"]
    return rows


def markdown(results: dict[int, dict]) -> str:
    lines = ["| deep width | variant | parameters | trainable | AdamW state (MiB) | step (ms) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for width, rows in results.items():
        for name, row in rows.items():
            lines.append(f"| {width} | {name} | {row['parameters'] / 1e6:.2f}M | {row['trainable'] / 1e6:.3f}M | "
                         f"{row['adamw_state_mib']:.1f} | {row['step_ms']:.0f} | {row['speed_up']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--widths", type=multiple_of(32, "the demo preset's attention head width"), nargs="+",
                        default=[192, 384], help="deep block widths, multiples of 32 (the attention head width)")
    parser.add_argument("--rank", type=positive_int, default=16, help="rank of the LoRA adapters")
    parser.add_argument("--rounds", type=positive_int, default=6, help="alternating rounds; medians are reported")
    parser.add_argument("--batch", type=positive_int, default=4, help="videos per training step")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {width: measure_width(width, args.rank, args.rounds, args.batch) for width in args.widths}
    print(f"# fine-tuning step: full vs LoRA rank {args.rank}, batch {args.batch} x {VIDEO}, "
          f"{torch.get_num_threads()} thread(s), OMP_WAIT_POLICY: {wait_policy()}\n")
    print(markdown(results))
    save_result(args.json, args, {"threads": torch.get_num_threads(),
                                  "results": {str(width): rows for width, rows in results.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
