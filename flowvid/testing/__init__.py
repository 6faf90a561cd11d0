"""Conformance test mixins that every plugin (block, codec, text encoder, sampler) must pass."""

from flowvid.testing.block_conformance import FlowBlockConformance, perturb_parameters

__all__ = ["FlowBlockConformance", "perturb_parameters"]
