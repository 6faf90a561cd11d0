"""The exact inverse: one token at a time through the deep block, then the shallow blocks per frame."""

from __future__ import annotations

from typing import Iterator

import torch

from flowvid.flows.base import FlowBlock
from flowvid.registry import SAMPLERS
from flowvid.sampling.base import BlockSampler
from flowvid.sampling.inversion import BlockInversion
from flowvid.text.base import TextEmbedding


def invert_slots_sequential(inversion: BlockInversion, count: int) -> None:
    """Make the next ``count`` slots final, one slot per pass, each from the final slots before it."""
    for slot in range(inversion.done, inversion.done + count):
        inversion.x[:, slot:slot + 1] = inversion.propose(1)
        inversion.commit(1)


@torch.no_grad()
def invert_block_sequential(block: FlowBlock, z: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
    """Invert one block exactly, one token at a time with its KV cache. z: (B, N, C) natural order."""
    inversion = BlockInversion(block, z, text)
    invert_slots_sequential(inversion, inversion.num_slots)
    return inversion.result()


@SAMPLERS.register("sequential")
class SequentialSampler(BlockSampler):
    """Exact inversion of a GlobalLocalFlow; the reference the faster samplers are checked against."""

    def deep_frames(self, inversion: BlockInversion, tokens_per_frame: int) -> Iterator[torch.Tensor]:
        while inversion.done < inversion.num_slots:
            frame = inversion.done // tokens_per_frame
            invert_slots_sequential(inversion, tokens_per_frame)
            yield inversion.frame(frame, tokens_per_frame)

    def invert_frames(self, block, frames, index):
        return invert_block_sequential(block, frames)
