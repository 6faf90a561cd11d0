"""A preallocated key/value cache for incremental (and Jacobi) inversion of causal blocks."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to ``capacity`` positions.

    Positions are written block by block: every layer writes its keys and values for the block at
    ``[length, length + n)``, then ``advance(n)`` makes them visible to later blocks; writing a block again
    before ``advance`` overwrites it in place (Jacobi iterations). ``rewind(n)`` forgets the last ``n`` token
    positions and ``reset`` all of them; neither forgets the text.
    ``key_valid`` marks padded text positions that no query may attend to; ``prefix`` counts the
    leading positions that hold text rather than tokens. ``rows(index)`` is the cache as some batch
    rows see it, so that a pass can run on part of the batch.
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
        end = self._end_of(keys)
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def _end_of(self, keys: torch.Tensor) -> int:
        """The position after a block of ``keys`` written at ``length``; an error past the capacity."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions requested, capacity {self.capacity}")
        return end

    def rows(self, index: torch.Tensor, keep: bool = True) -> "CacheRows":
        """The cache as batch rows ``index`` see it: a pass over them writes their keys/values here (with
        ``keep=False``: nowhere), and reads gather their rows one layer at a time, never the whole cache."""
        return CacheRows(self, index, keep)

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.length - self.prefix:
            raise ValueError(f"cannot rewind {n} positions of a cache holding {self.length - self.prefix} token "
                             f"positions after {self.prefix} of text")
        self.length -= n

    def reset(self, length: int | None = None) -> None:
        """Keep the first ``length`` positions, text included (None: the text only); it cannot grow the
        cache, whose later positions hold no keys yet (``advance`` makes written positions visible)."""
        length = self.prefix if length is None else length
        if not self.prefix <= length <= self.length:
            raise ValueError(f"cannot reset a cache holding {self.length} positions to {length}: keep between "
                             f"the {self.prefix} of text and the {self.length} it holds")
        self.length = length


class CacheRows(KVCache):
    """Some batch rows of a ``KVCache`` (made by ``KVCache.rows``); it holds no keys or values of its own."""

    def __init__(self, cache: KVCache, index: torch.Tensor, keep: bool):
        self.cache, self.index, self.keep = cache, index, keep
        self.key_valid = cache.key_valid[index]
        self.capacity, self.length, self.prefix = cache.capacity, cache.length, cache.prefix

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._end_of(keys)
        stored_keys, stored_values = self.cache.keys[layer], self.cache.values[layer]
        keys, values = keys.to(stored_keys.dtype), values.to(stored_values.dtype)
        if not self.keep:
            return (torch.cat([stored_keys[self.index, :, :self.length], keys], dim=2),
                    torch.cat([stored_values[self.index, :, :self.length], values], dim=2))
        stored_keys[self.index, :, self.length:end] = keys
        stored_values[self.index, :, self.length:end] = values
        return stored_keys[self.index, :, :end], stored_values[self.index, :, :end]
