"""The exact inverse: one token at a time through the deep block, then the shallow blocks per frame."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class SequentialRun:
    """One sampling call: the frames sampled and the passes of one token position each (through the deep
    block, and through each shallow block, where one pass takes that position of every frame at once)."""

    frames: int = 0
    deep_passes: int = 0
    shallow_passes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "deep_passes": self.deep_passes,
                "shallow_passes": {str(index): passes for index, passes in sorted(self.shallow_passes.items())}}


@SAMPLERS.register("sequential")
class SequentialSampler(BlockSampler):
    """Exact inversion of a GlobalLocalFlow; the reference the faster samplers are checked against.

    After every call ``last_stats`` holds the frames it sampled (a prefix's not counted) and its passes
    (``deep_passes``, and ``shallow_passes`` per shallow block, by index).
    """

    call: SequentialRun | None = None

    def call_stats(self) -> dict:
        return self.call.to_dict() if self.call is not None else {}

    def new_call(self) -> SequentialRun:
        return SequentialRun()

    def deep_frames(self, inversion: BlockInversion, tokens_per_frame: int) -> Iterator[torch.Tensor]:
        run = self.call
        while inversion.done < inversion.num_slots:
            frame = inversion.done // tokens_per_frame
            invert_slots_sequential(inversion, tokens_per_frame)
            run.frames += 1
            run.deep_passes += tokens_per_frame
            yield inversion.frame(frame, tokens_per_frame)

    def invert_frames(self, block, frames, index):
        self.call.shallow_passes[index] = self.call.shallow_passes.get(index, 0) + frames.shape[1]
        return invert_block_sequential(block, frames)
