"""Where a loaded model runs and in what precision: ``--device`` and ``--precision`` of generate and score.

The precisions are Lightning's names for what training uses: ``32-true`` (fp32 throughout) and
``bf16-mixed`` (fp32 weights, the network's matmuls in bf16 under ``torch.autocast``; the affine
steps, log-determinants and Jacobi residuals stay fp32 either way). ``auto`` picks the first CUDA GPU
if there is one, and bf16-mixed on a GPU that supports bf16; fp32 on a CPU, where bf16 is fast only
on CPUs with AVX512-BF16 or AMX (docs/benchmarks.md, bf16 on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform

import torch

from flowvid.caller_warnings import warn_caller

PRECISIONS = ("auto", "32-true", "bf16-mixed")


def add_placement_arguments(parser: argparse.ArgumentParser, precision: str) -> None:
    """``--device`` (default ``auto``) and ``--precision`` (default ``precision``) of a command."""
    add_device_argument(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default=precision,
                        help=f"32-true, bf16-mixed or auto, bf16-mixed on a GPU that supports it "
                             f"(default: {precision})")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``) of a command, with or without ``--precision``."""
    parser.add_argument("--device", default="auto", help="auto (the first CUDA GPU, else the CPU), cpu, cuda or cuda:N")


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` of a process that torchrun started (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``.

    torchrun sets both: one without the other is a launch gone wrong, which would otherwise run as rank 0
    of a world whose other processes never come (half the prompts sampled, or a wait for them)."""
    present = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if len(present) == 1:
        [given], [missing] = present, {"RANK", "WORLD_SIZE"} - set(present)
        raise ValueError(f"{given}={os.environ[given]!r} is set but {missing} is not: start the processes with "
                         f"torchrun, which sets both, or unset {given} to run one process")
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ValueError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "must be integers") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be at least 0 and below WORLD_SIZE={world}")
    return rank, world


def join_launch_group() -> tuple[int, int]:
    """``launch_rank()``, and under torchrun a gloo process group of its processes (set up from torchrun's
    environment) for commands whose processes share their bookkeeping; the GPUs stay each process's own."""
    rank, world_size = launch_rank()
    if world_size > 1 and not torch.distributed.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: start the processes with torchrun, which "
                             "sets them all, or unset RANK and WORLD_SIZE to run one process")
        torch.distributed.init_process_group("gloo")
    return rank, world_size


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device that exists here; ValueError otherwise, naming
    ``setting`` as the caller wrote it (``--device`` on the command line, ``device`` in Python).

    Under torchrun ``auto`` and ``cuda`` mean the process's own GPU, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{own_gpu_index()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{setting} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{setting} {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{setting} {name!r}: no CUDA device is visible here (torch.cuda.is_available() is "
                             f"False); use {setting} 'cpu'")
        if (device.index or 0) >= count:
            raise ValueError(f"{setting} {name!r}: only {count} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{count - 1})")
    return device


def own_gpu_index() -> int:
    """``LOCAL_RANK``, refused where this machine has fewer GPUs than torchrun started processes on it."""
    rank = local_rank()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < count <= rank:  # with no GPU at all, resolve_device names that instead
        raise ValueError(f"LOCAL_RANK={rank} but this machine has {count} GPU(s): start at most {count} processes "
                         f"per machine (torchrun --nproc-per-node {count})")
    return rank


def local_rank() -> int:
    """torchrun's ``LOCAL_RANK``: the index of the process's own GPU on its machine."""
    value = os.environ["LOCAL_RANK"]
    if not value.isdecimal():
        raise ValueError(f"LOCAL_RANK={value!r} must be a GPU index (0, 1, ...): torchrun sets it; unset it to run "
                         "one process")
    return int(value)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        # oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) only asks for AVX-512, on which
        # it runs bf16 emulated: Skylake to Ice Lake Xeons have AVX-512 without AVX512-BF16.
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: its BF16 extension


def resolve_precision(name: str, device: torch.device, setting: str = "--precision") -> str:
    """``32-true`` or ``bf16-mixed``; ``auto`` is bf16-mixed on a CUDA device that supports bf16. ``setting``
    is what the caller calls it in an error (``precision`` in Python)."""
    if name not in PRECISIONS:
        raise ValueError(f"{setting} {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" and cuda_supports_bf16(device) else "32-true"
    warn_if_bf16_is_emulated(name, device)
    return name


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` (not the current GPU, which torch's check asks about) computes in bf16 natively.
    torch counts emulated bf16 as supported unless told not to, and on a GPU before Ampere that is slower
    than fp32."""
    if device.index is None:  # plain ``cuda`` is the current GPU
        return torch.cuda.is_bf16_supported(including_emulation=False)
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def warn_if_bf16_is_emulated(precision: str, device: torch.device) -> None:
    """bf16 (``bf16-mixed``, or training's ``bf16-true``) on a CPU or GPU without native bf16 works, but
    slower than fp32: say so."""
    if not precision.startswith("bf16"):
        return
    if device.type == "cpu" and not cpu_has_native_bf16():
        warn_caller(f"this CPU has no native bf16 (AVX512-BF16 or AMX): {precision} runs emulated and slower "
                    "than 32-true")
    elif device.type == "cuda" and not cuda_supports_bf16(device):
        warn_caller(f"GPU {device} has no native bf16 (it came with Ampere, compute capability 8.0): "
                    f"{precision} runs emulated and slower than 32-true")


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``bf16-mixed``; nothing for ``32-true``."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
