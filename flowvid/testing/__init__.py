"""Conformance test mixins that every plugin (block, codec, text encoder, sampler) must pass."""

import pytest

# The mixins' plain asserts then report the values that failed, as in the plugin's own tests.
pytest.register_assert_rewrite(*(f"flowvid.testing.{kind}_conformance"
                                  for kind in ("block", "codec", "sampler", "text")))

from flowvid.testing.block_conformance import FlowBlockConformance, perturb_parameters  # noqa: E402
from flowvid.testing.codec_conformance import CodecConformance  # noqa: E402
from flowvid.testing.sampler_conformance import SamplerConformance  # noqa: E402
from flowvid.testing.text_conformance import TextEncoderConformance  # noqa: E402

__all__ = ["CodecConformance", "FlowBlockConformance", "SamplerConformance", "TextEncoderConformance",
           "perturb_parameters"]
