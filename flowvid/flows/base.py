"""The FlowBlock contract and the BlockSpec from which blocks are built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flowvid.flows.permutations import Permutation
from flowvid.nn.kv_cache import KVCache
from flowvid.text.base import TextEmbedding


@dataclass(frozen=True)
class BlockSpec:
    """The runtime sizes of one block, filled in by the flow that owns it.

    Block classes take a ``BlockSpec`` as their first constructor argument, so that a recipe can
    swap a block class (by registered name or ``class_path`` + ``init_args``) without knowing sizes.
    ``permutation`` is the registered name of the block's token order; a ``frame_local`` block is handed
    one frame at a time (a GlobalLocalFlow's shallow blocks: ``flip`` and ``identity`` in turn).
    """

    channels: int
    frame_size: tuple[int, int]
    width: int
    depth: int
    head_dim: int = 64
    permutation: str = "identity"
    text_width: int | None = None
    frame_local: bool = False

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_size[0] * self.frame_size[1]


class FlowBlock(nn.Module):
    """One invertible autoregressive flow block on token sequences ``(B, N, C)``.

    ``forward`` maps data to noise and returns the per-element log-determinant ``(B, N, C)`` in fp32.
    The inverse is driven by a sampler (``flowvid/sampling/inversion.py``), in the order of the block's
    ``permutation``, which is the one ``spec.permutation`` names:

    1. ``cache = block.start_inverse(batch, num_tokens, text)``
    2. for a run of slots ``[cache position, + n)``: ``mu, sigma = block.affine(inputs, cache)``, where
       ``inputs`` are the shifted tokens (``block.shift``: slot s sees token s - 1, slot 0
       ``block.start_token``); then ``x = mu + sigma * z``.
    3. ``cache.advance(k)`` makes the first ``k <= n`` slots of the run final. Before that, Jacobi calls
       ``affine`` on the run again, from better inputs: each call overwrites what the last one wrote, so
       state carried from slot to slot belongs in what ``affine`` writes at each position, never in
       something every call updates.
    4. ``block.affine(inputs[videos], cache.rows(videos))`` passes over some videos of the batch (those
       still converging) and writes their rows only; ``cache.rows(videos, keep=False)`` keeps nothing.
    """

    spec: BlockSpec
    permutation: Permutation

    def forward(self, x: torch.Tensor, text: TextEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def start_inverse(self, batch: int, num_tokens: int, text: TextEmbedding | None = None,
                      dtype: torch.dtype | None = None) -> KVCache:
        raise NotImplementedError

    def start_token(self, batch: int) -> torch.Tensor:
        """The learned input of slot 0, (B, 1, C) in fp32."""
        raise NotImplementedError

    def shift(self, x_permuted: torch.Tensor) -> torch.Tensor:
        """Inputs of every slot: ``[start_token, x_0, ..., x_{N-2}]``."""
        start = self.start_token(x_permuted.shape[0]).to(x_permuted.dtype)
        return torch.cat([start, x_permuted[:, :-1]], dim=1)

    def affine(self, inputs: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


BlockFactory = Callable[[BlockSpec], FlowBlock]
