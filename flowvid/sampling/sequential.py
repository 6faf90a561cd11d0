"""The exact inverse: token by token through the deep block, then the shallow blocks per frame."""

from __future__ import annotations

import torch

from flowvid.flows.base import FlowBlock
from flowvid.registry import SAMPLERS
from flowvid.sampling.base import Sampler
from flowvid.text.base import TextEmbedding


@torch.no_grad()
def invert_block_sequential(block: FlowBlock, z: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
    """Invert one block exactly, one token at a time with its KV cache. z: (B, N, C) natural order."""
    batch, num_tokens, _ = z.shape
    zp = block.permutation.forward(z.float())
    cache = block.start_inverse(batch, num_tokens, text)
    xp = torch.empty_like(zp)
    inputs = block.start_token(batch)
    for slot in range(num_tokens):
        mu, sigma = block.affine(inputs, cache)
        xp[:, slot] = mu[:, 0] + sigma[:, 0] * zp[:, slot]
        cache.advance(1)
        inputs = xp[:, slot:slot + 1]
    return block.permutation.inverse(xp)


@SAMPLERS.register("sequential")
class SequentialSampler(Sampler):
    """Exact inversion of a GlobalLocalFlow; the reference the faster samplers are checked against."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        if guidance or prefix is not None:
            raise NotImplementedError("guidance and prefixes are handled by the task-aware samplers")
        flow.check_input(z, text)
        batch, frames = z.shape[:2]
        per_frame, channels = flow.tokens_per_frame, flow.latent_channels
        tokens = invert_block_sequential(flow.deep, z.reshape(batch, frames * per_frame, channels), text)
        tokens = tokens.reshape(batch * frames, per_frame, channels)
        for block in reversed(flow.shallow):  # every frame of the batch at once
            tokens = invert_block_sequential(block, tokens)
        return tokens.view_as(z)
