"""bf16 against fp32 attention kernels on the CPU, by sequence length: where bf16 attention pays.

    python benchmarks/attention_kernels.py [--threads 1] [--lengths 16 64 128 192 272 384 512 1040 2080]

For every length T, causal attention over (8192 / T) x 4 heads x T tokens x 64 (the same number of
tokens at every length), forward and backward, on bf16 inputs: once with the bf16 kernel, once cast
to fp32 and back (the casts are timed too), as ``flowvid.nn.attention.attention`` does below
``CPU_BF16_MIN_KEYS`` keys. The ratio is bf16 time / fp32 time: above 1, fp32 is faster.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from run_all import benchmark_parser, positive_int, save_result, wait_policy

TOKENS = 8192
HEADS = 4
HEAD_DIM = 64


def bf16_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fp32_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)


def seconds_per_call(run: Callable[[], object], work: int) -> float:
    for _ in range(2):
        run()
    calls = max(2, int(3e7 / work))
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls


def measure(length: int, tokens: int = TOKENS) -> dict:
    batch = max(1, tokens // length)
    q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    work = batch * HEADS * length * length
    row = {"length": length, "batch": batch}
    for name, kernel in (("bf16", bf16_kernel), ("fp32", fp32_kernel)):
        row[f"{name}_forward_backward_ms"] = 1e3 * seconds_per_call(lambda: kernel(q, k, v).sum().backward(), work)
        with torch.no_grad():
            row[f"{name}_forward_ms"] = 1e3 * seconds_per_call(lambda: kernel(q, k, v), work)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="sequence lengths T to time",
                        default=[16, 64, 128, 192, 272, 384, 512, 1040, 2080])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# attention kernels: torch {torch.__version__}, {args.threads} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY: {wait_policy()}")
    print("| T | batch | fwd+bwd bf16 (ms) | fwd+bwd fp32 (ms) | bf16 / fp32 | forward bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for length in args.lengths:
        row = measure(length)
        rows.append(row)
        print(f"| {length} | {row['batch']} | {row['bf16_forward_backward_ms']:.1f} | "
              f"{row['fp32_forward_backward_ms']:.1f} | "
              f"{row['bf16_forward_backward_ms'] / row['fp32_forward_backward_ms']:.2f} | "
              f"{row['bf16_forward_ms'] / row['fp32_forward_ms']:.2f} |", flush=True)
    save_result(args.json, args, {"threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
