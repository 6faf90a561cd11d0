"""Samplers: invert a flow from noise to latents."""

from flowvid.sampling.base import BlockSampler, GuidedText, Sampler, SamplingRequest, build_sampler, check_request
from flowvid.sampling.inversion import BlockInversion
from flowvid.sampling.jacobi import JacobiSampler, JacobiStats
from flowvid.sampling.rollout import WindowedSampler, windows
from flowvid.sampling.sequential import SequentialSampler, invert_block_sequential

__all__ = ["BlockInversion", "BlockSampler", "GuidedText", "JacobiSampler", "JacobiStats", "Sampler",
           "SamplingRequest", "SequentialSampler", "build_sampler", "WindowedSampler", "check_request", "invert_block_sequential",
           "windows"]
