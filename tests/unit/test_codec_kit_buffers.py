"""The codec kit checks that other weights give another identity for codecs whose weights are buffers too,
as the text kit does for the docs' HashTextEncoder."""

import pytest
import torch

from flowvid.codecs import PixelCodec
from flowvid.testing import CodecConformance


class RotatedPixels(PixelCodec):
    """Pixels turned by a fixed random rotation kept in a buffer (not a parameter), drawn from ``seed``."""

    def __init__(self, seed: int = 0, remember_seed: bool = True):
        super().__init__()
        self.seed, self.remember_seed = seed, remember_seed
        rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("rotation", rotation)

    def config(self):
        return {**super().config(), **({"seed": self.seed} if self.remember_seed else {})}

    def encode(self, video):
        return super().encode(video) @ self.rotation

    def decode(self, latents):
        self.check_latents(latents)
        return super().decode(latents @ self.rotation.T)


class ForgetsTheSeed(CodecConformance):
    video_shape = (3, 4, 4)

    def make_codec(self):
        return RotatedPixels(remember_seed=False)

    def make_codec_with_other_weights(self):
        return RotatedPixels(seed=1, remember_seed=False)


class ForgetsTheSeedWithTheDefaultHook(ForgetsTheSeed):
    make_codec_with_other_weights = CodecConformance.make_codec_with_other_weights


class TestRotatedPixels(CodecConformance):
    video_shape = (3, 4, 4)

    def make_codec(self):
        return RotatedPixels()

    def make_codec_with_other_weights(self):
        return RotatedPixels(seed=1)


@pytest.mark.parametrize("kit", [ForgetsTheSeed, ForgetsTheSeedWithTheDefaultHook])
def test_an_identity_blind_to_buffer_weights_fails_the_kit(kit):
    tests = kit()
    with pytest.raises(AssertionError, match="other weights, the same identity"):
        try:
            tests.test_identity_tells_other_weights_apart(tests.make_codec().eval())
        except pytest.skip.Exception as skipped:  # a skip would pass the codec unchecked
            raise AssertionError(f"the kit skipped the check: {skipped}") from None


def test_a_codec_without_any_weights_is_skipped():
    class TestPixels(CodecConformance):
        def make_codec(self):
            return PixelCodec()

    tests = TestPixels()
    with pytest.raises(pytest.skip.Exception, match="without weights"):
        tests.test_identity_tells_other_weights_apart(tests.make_codec().eval())
