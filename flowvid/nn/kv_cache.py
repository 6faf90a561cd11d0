"""A preallocated key/value cache for incremental (and Jacobi) inversion of causal blocks."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to ``capacity`` positions.

    Positions are written block by block: every layer writes its keys and values for the block at
    ``[length, length + n)``, then ``advance(n)`` makes them visible to later blocks. ``rewind(n)``
    forgets the last ``n`` positions, which Jacobi iterations use to overwrite a block in place.
    ``key_valid`` marks padded text positions that no query may attend to; ``prefix`` counts the
    leading positions that hold text rather than tokens. ``select`` copies some batch rows into a
    cache of their own and ``store`` writes a run of positions back, so that a pass can run on part
    of the batch.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch, capacity, device=device, dtype=torch.bool)
        self.capacity = capacity
        self.length = 0
        self.prefix = 0

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a block's keys/values (B, H, n, D) and return all keys/values up to its end."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions requested, capacity {self.capacity}")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def select(self, rows: torch.Tensor, capacity: int) -> "KVCache":
        """A cache of batch ``rows`` holding copies of their first ``length`` positions, room for ``capacity``."""
        num_layers, _, heads, _, head_dim = self.keys.shape
        part = KVCache(num_layers, len(rows), heads, head_dim, capacity, self.keys.device, self.keys.dtype)
        part.keys[:, :, :, :self.length] = self.keys[:, rows, :, :self.length]
        part.values[:, :, :, :self.length] = self.values[:, rows, :, :self.length]
        part.key_valid = self.key_valid[rows, :capacity]
        part.length, part.prefix = self.length, self.prefix
        return part

    def store(self, part: "KVCache", rows: torch.Tensor, start: int, end: int) -> None:
        """Write positions ``[start, end)`` of ``part`` (made by ``select(rows, ...)``) back into ``rows``."""
        self.keys[:, rows, :, start:end] = part.keys[:, :, :, start:end]
        self.values[:, rows, :, start:end] = part.values[:, :, :, start:end]

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind {n} positions of a cache holding {self.length}")
        self.length -= n

    def reset(self, length: int = 0) -> None:
        self.length = length
