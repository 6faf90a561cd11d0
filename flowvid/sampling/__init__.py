"""Samplers: invert a flow from noise to latents."""

from flowvid.sampling.base import Sampler
from flowvid.sampling.sequential import SequentialSampler, invert_block_sequential

__all__ = ["Sampler", "SequentialSampler", "invert_block_sequential"]
