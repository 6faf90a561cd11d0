"""Starting test processes as torchrun would: a free port, each process's environment, and a gloo group."""

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun gives a process, so that flowvid and Lightning join its group and launch nothing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      NODE_RANK="0", WORLD_SIZE=str(world_size))


def run_in_gloo_group(work: Callable[[int, Path], Any], out_dir: Path, world_size: int = 2) -> list[Any]:
    """``work(rank, out_dir)`` in ``world_size`` forked processes of one gloo group, started as torchrun
    starts them (one thread each); what each returned, in rank order."""
    mp.start_processes(_join_and_run, args=(work, world_size, free_port(), str(out_dir)), nprocs=world_size,
                       join=True, start_method="fork")  # forked: ``work`` may be any function, not only importable ones
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _join_and_run(rank: int, work: Callable[[int, Path], Any], world_size: int, port: int, out_dir: str) -> None:
    set_torchrun_environment(rank, world_size, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(work(rank, Path(out_dir)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
