"""GPU benchmarks: bf16-mixed training MFU of a 0.36B flow, Jacobi vs sequential sampling, ZeRO-2 on one GPU.

    python benchmarks/gpu.py [--parts PART ...] [--json OUT]

Without a CUDA device every part is skipped with a message (the numbers of this file need a GPU; the
CPU numbers come from ``train_throughput.py``, ``sampling.py`` and ``memory.py``). Each result records
the card it was measured on.

* **Training MFU**: the ``base`` preset (24-layer deep block at width 1024, four 2-layer shallow blocks at
  768; 0.36B parameters) on 8 frames of 16 x 16 x 48 latents with 64 text tokens, bf16 autocast,
  fused AdamW. MFU = 6 x parameters x video tokens per second / the bf16 FLOP/s of an 8192 x 8192
  matmul measured on the same card.
  ``training_mfu`` and ``training_mfu_no_text`` (without the text prefix: plain causal attention) list
  the step's slowest kernels; ``training_mfu_chunked`` runs text-prefix attention in chunks of queries,
  as on a CPU, instead of one block-sparse call; ``training_mfu_compiled`` compiles the flow's blocks
  (``compile_flow``).
* **Sampling**: the same flow, exact sequential inverse against ``JacobiSampler`` with whole-frame first
  blocks (its default on a GPU) and with 16-slot ones (its default on a CPU), bf16 network, fp32
  sampling arithmetic, in forward passes of wall time, passes run in a row and relative L2 to the exact
  inverse.
* **Text-prefix attention**: the deep block's attention at that shape, forward and backward, as a GPU
  runs it (one block-sparse FlexAttention call), as a CPU runs it (chunks of queries), as one dense
  masked call, and as plain causal attention without text; outputs and gradients checked against the
  dense call.
* **ZeRO-2 on one GPU**: ``FlowModule`` under Lightning with ``ZeroStrategy(stage=2)`` and
  ``bf16-mixed``, the way ``recipes/distributed/zero2.yaml`` trains, in steps/s and peak memory.

A part that fails records its error and the others still run, and the exit status is then 1;
``--json`` is rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from typing import Callable
from unittest import mock

import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.text.base import TextEmbedding
from run_all import benchmark_parser, write_json
from sampling import passes_in_a_row

SKIPPED = "skipped: no CUDA device (torch.cuda.is_available() is False); these benchmarks need a GPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_flow(device: torch.device, frame_size: tuple[int, int], **overrides) -> GlobalLocalFlow:
    torch.manual_seed(0)
    return GlobalLocalFlow.from_preset("base", frame_size=frame_size, **overrides).to(device)


def random_inputs(flow: GlobalLocalFlow, batch: int, frames: int, text_length: int,
                  device: torch.device) -> tuple[torch.Tensor, TextEmbedding]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, *flow.frame_size, flow.latent_channels, generator=generator)
    tokens = torch.randn(batch, text_length, flow.text_width, generator=generator)
    mask = torch.ones(batch, text_length, dtype=torch.bool)
    return x.to(device), TextEmbedding(tokens, mask).to(device)


def training_mfu(device: torch.device, batch: int = 4, frames: int = 8, frame_size: tuple[int, int] = (16, 16),
                 steps: int = 10, matmul_size: int = 8192, text_length: int = 64, profile: bool = False,
                 compile_flow: bool = False, **overrides) -> dict:
    """bf16-mixed training steps of the ``base`` flow: tokens/s and MFU against a measured bf16 matmul."""
    flow = build_flow(device, frame_size, latent_channels=48, **overrides)
    if compile_flow:  # as FlowModule(compile_flow=True) does; the warm-up steps pay the compilation
        flow.compile_blocks()
    x, text = random_inputs(flow, batch, frames, text_length, device)
    text = text if text_length else None
    optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4,
                                  fused=device.type == "cuda")
    dims = x[0].numel()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z, logdet = flow(x, text)
        loss = 0.5 * z.pow(2).mean() - (logdet / dims).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, steps, device)
    a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_rate = 2.0 * matmul_size**3 / median_seconds(lambda: a @ b, steps, device)
    parameters = sum(p.numel() for p in flow.parameters())
    tokens = x.shape[0] * x.shape[1] * flow.tokens_per_frame
    kernels = top_kernels(step) if profile else None
    return {
        "device": device_name(device), "parameters": parameters, "tokens_per_step": tokens,
        "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
        "bf16_matmul_tflops": matmul_rate / 1e12, "mfu": 6.0 * parameters * tokens / seconds / matmul_rate,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **({"top_kernels": kernels} if kernels else {}),
    }


def in_attention_chunks(run: Callable[[], dict]) -> dict:
    """``run()`` with masked attention in chunks of queries, as on a CPU, instead of one block-sparse call."""
    with mock.patch("flowvid.nn.attention.use_block_sparse", lambda q, mask: False):
        return run()


def top_kernels(step: Callable[[], None], count: int = 15) -> list[str]:
    """The kernels that take most of one step's device time, as ``name: ms (calls)``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    events = [e for e in prof.key_averages() if e.device_time_total > 0] or list(prof.key_averages())
    events.sort(key=lambda e: e.device_time_total or e.cpu_time_total, reverse=True)
    return [f"{e.key[:90]}: {(e.device_time_total or e.cpu_time_total) / 1e3:.2f} ms ({e.count})"
            for e in events[:count]]


@torch.no_grad()
def jacobi_vs_sequential(device: torch.device, frames: int = 4, frame_size: tuple[int, int] = (16, 16),
                         batch: int = 2, tol: float = 1e-2, perturb: float = 0.02, **overrides) -> dict:
    """Sequential and Jacobi inversion of a perturbed ``base`` flow (bf16 network, fp32 sampling math)."""
    from flowvid.sampling import JacobiSampler, SequentialSampler
    from flowvid.testing import perturb_parameters

    flow = build_flow(device, frame_size, latent_channels=12, **overrides).eval()
    perturb_parameters(flow, std=perturb)
    z, text = random_inputs(flow, batch, frames, 16, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        forward = median_seconds(lambda: flow(z, text), 5, device)
        synchronize(device)
        started = time.perf_counter()
        exact = SequentialSampler().sample(flow, z, text)  # one token at a time: long, so timed once
        synchronize(device)
        sequential = time.perf_counter() - started
        jacobi = {}
        # Whole-frame blocks in the first frame and the shallow blocks (the default on a GPU) run fewer
        # passes in a row for more work than 16-slot ones (the default on a CPU).
        for name, first_block_size in (("frame_blocks", flow.tokens_per_frame), ("16_slot_blocks", 16)):
            sampler = JacobiSampler(tol=tol, first_block_size=first_block_size)
            seconds = median_seconds(lambda: sampler.sample(flow, z, text), 3, device, warmup=1)
            x = sampler.sample(flow, z, text)
            jacobi[name] = {
                "first_block_size": first_block_size, "seconds": seconds, "forward_passes": seconds / forward,
                "speedup": sequential / seconds, "relative_l2": ((x - exact).norm() / exact.norm()).item(),
                "deep_passes": sampler.last_stats["deep"]["passes"],
                "passes_in_a_row": passes_in_a_row(sampler.last_stats),
            }
        reencoded, logdet = flow(exact, text)
    return {
        "device": device_name(device), "video": [batch, frames, *frame_size, flow.latent_channels], "tol": tol,
        "forward_s": forward, "sequential_s": sequential, "sequential_forward_passes": sequential / forward,
        "jacobi": jacobi,
        # The exact inverse under a bf16 network, encoded again: how far the round trip lands from z.
        "reencoded_relative_l2": ((reencoded - z).norm() / z.norm()).item(),
        "z_dtype": str(reencoded.dtype), "logdet_dtype": str(logdet.dtype), "sample_dtype": str(exact.dtype),
    }


def text_prefix_attention(device: torch.device, batch: int = 4, heads: int = 16, text_length: int = 64,
                          video_tokens: int = 2048, head_dim: int = 64, repeats: int = 10) -> dict:
    """The deep block's attention at the ``base`` training shape, forward and backward, four ways.

    ``block_sparse`` is what a text-conditioned block runs on a GPU (one FlexAttention call that skips
    hidden blocks of keys), ``chunks`` what it runs on a CPU (chunks of queries over the keys they may
    see), ``one_masked_call`` the mask in a single dense kernel call, ``causal_no_text`` plain causal
    attention over as many tokens, the floor. Captions are padded to ``text_length`` from half its length on.
    """
    from flowvid.nn.attention import (
        BandedMask, attention, banded_attention, block_sparse_attention, prefix_causal_bands, prefix_causal_mask,
    )

    length = text_length + video_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype).requires_grad_()
               for _ in range(3))
    valid = torch.arange(text_length)[None, :] < torch.linspace(text_length // 2, text_length, batch).long()[:, None]
    mask = prefix_causal_mask(length, 0, length, valid.to(device))
    banded = BandedMask(mask, prefix_causal_bands(length, 0, length, text_length))
    kinds = {
        "block_sparse": lambda: block_sparse_attention(q, k, v, mask),
        "chunks": lambda: in_attention_chunks(lambda: banded_attention(q, k, v, banded)),
        "one_masked_call": lambda: attention(q, k, v, mask),
        "causal_no_text": lambda: attention(q, k, v, causal=True),
    }
    if device.type == "cpu":  # FlexAttention has no backward pass on a CPU
        del kinds["block_sparse"]
    result: dict = {"device": device_name(device), "shape": [batch, heads, length, head_dim], "dtype": str(dtype)}
    # Every way must give what the one dense call gives, gradients included, on this device's kernels.
    expected = output_and_gradients(kinds["one_masked_call"], (q, k, v))
    for name in [name for name in ("block_sparse", "chunks") if name in kinds]:
        got = output_and_gradients(kinds[name], (q, k, v))
        result[f"{name}_max_abs_difference"] = max((a - b).abs().max().item() for a, b in zip(got, expected))
    # A dense gradient, as a layer after attention hands back. The broadcast one of ``out.sum()`` crashed
    # the H200 in this loop (an illegal memory access; which of the four ways was not found).
    gradient = torch.randn(q.shape, generator=generator).to(device, dtype)
    for name, attend in kinds.items():
        result[f"{name}_ms"] = 1e3 * median_seconds(lambda: attend().backward(gradient), repeats, device)
    return result


def output_and_gradients(attend: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    for tensor in inputs:
        tensor.grad = None
    out = attend()
    out.float().pow(2).sum().backward()
    return [out.detach().float()] + [tensor.grad.float() for tensor in inputs]


def zero2_training(device: torch.device, steps: int = 20, batch: int = 4, **overrides) -> dict:
    """``FlowModule`` trained by Lightning with DeepSpeed ZeRO-2 on one device (bf16-mixed on a GPU)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "DeepSpeed is not installed (pip install 'flowvid[deepspeed]')"}
    from lightning.pytorch import Callback, Trainer

    from flowvid.codecs import PixelCodec
    from flowvid.lit import FlowModule
    from flowvid.lit.strategies import ZeroStrategy
    from flowvid.text.learned import LearnedTextEncoder

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            synchronize(device)
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    flow = GlobalLocalFlow.from_preset("base", latent_channels=12, frame_size=(16, 16), text_width=64, **overrides)
    module = FlowModule(flow, codec=PixelCodec(patch_size=2), text_encoder=LearnedTextEncoder(width=64, max_length=16),
                        video_shape=(8, 32, 32), noise_std=0.1, warmup_steps=1, schedule_steps=steps)
    generator = torch.Generator().manual_seed(0)
    samples = [{"latents": torch.randn(8, 16, 16, 12, generator=generator), "caption": "a red square moves right"}
               for _ in range(batch * steps)]
    loader = torch.utils.data.DataLoader(samples, batch_size=batch)
    timer = StepTimer()
    gpu = device.type == "cuda"
    trainer = Trainer(accelerator="gpu" if gpu else "cpu", devices=1, strategy=ZeroStrategy(stage=2),
                      precision="bf16-mixed" if gpu else "32-true", max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, loader)
    seconds = statistics.median(timer.times[2:] or timer.times)
    return {
        "device": device_name(device), "parameters": sum(p.numel() for p in flow.parameters()), "batch": batch,
        "step_ms": seconds * 1e3, "steps_per_s": 1.0 / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
    }


def gpu_parts(device: torch.device) -> dict[str, Callable[[], dict]]:
    return {
        "text_prefix_attention": lambda: text_prefix_attention(device),
        "training_mfu": lambda: training_mfu(device, profile=True),
        "training_mfu_chunked": lambda: in_attention_chunks(lambda: training_mfu(device)),
        "training_mfu_compiled": lambda: training_mfu(device, compile_flow=True),
        "training_mfu_no_text": lambda: training_mfu(device, text_length=0, profile=True),
        "sampling": lambda: jacobi_vs_sequential(device),
        "training_mfu_batch16": lambda: training_mfu(device, batch=16),
        "zero2": lambda: zero2_training(device),
    }


def run_all(json_path: str | None = None, only: list[str] | None = None) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": SKIPPED}
    parts = gpu_parts(torch.device("cuda"))
    result: dict = {}
    for name, part in parts.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            result[name] = part()
        except Exception:  # one broken part must not cost the others' numbers
            result[name] = {"error": traceback.format_exc()}
        result[name]["part_s"] = time.perf_counter() - started
        print(name, json.dumps(result[name]), flush=True)
        torch.cuda.empty_cache()
        if json_path:
            write_json(json_path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parts = list(gpu_parts(torch.device("cpu")))
    parser.add_argument("--parts", nargs="+", choices=parts, default=None, metavar="PART",
                        help=f"run only these parts, of {', '.join(parts)} (default: all)")
    args = parser.parse_args(argv)
    result = run_all(args.json, args.parts)
    print(result.get("skipped") or json.dumps(result, indent=2))
    if args.json and "skipped" in result:
        write_json(args.json, result)
    failed = [name for name, part in result.items() if isinstance(part, dict) and "error" in part]
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
