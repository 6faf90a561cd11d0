"""Conformance test mixins that every plugin (block, codec, text encoder, sampler) must pass."""

from flowvid.testing.block_conformance import FlowBlockConformance, perturb_parameters
from flowvid.testing.codec_conformance import CodecConformance
from flowvid.testing.sampler_conformance import SamplerConformance
from flowvid.testing.text_conformance import TextEncoderConformance

__all__ = ["CodecConformance", "FlowBlockConformance", "SamplerConformance", "TextEncoderConformance",
           "perturb_parameters"]
