"""Starting test processes as torchrun would: a free port, and each process's environment."""

import os
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun gives a process, so that flowvid and Lightning join its group and launch nothing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      NODE_RANK="0", WORLD_SIZE=str(world_size))
