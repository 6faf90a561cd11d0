"""Conformance tests for latent codecs.

A codec plugin's test module subclasses the mixin and says how to build its codec::

    from flowvid.testing import CodecConformance

    class TestMyCodec(CodecConformance):
        video_shape = (9, 32, 32)          # (frames, height, width) the codec can encode
        exact = False                      # True when decode(encode(video)) == video

        def make_codec(self):
            return MyCodec(...)

pytest then runs every ``test_*`` method below: latent and video shapes and dtypes (``latent_frames`` and
``usable_frames`` included), determinism, independence of batch elements, causality over frames, the
caller's video and latents left as given, clear errors for bad sizes and dtypes, a stable identity that
tells other weights apart (``make_codec_with_other_weights``), each latent frame decoded alone as in the
whole video (for codecs without frame groups, whose frames are streamed one by one), and (for exact
codecs) the exact round trip.
"""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from flowvid.codecs.base import LatentCodec, same_codec
from flowvid.testing.block_conformance import perturb_parameters


def smooth_video(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)``: moving colour gradients plus noise, so that every codec has something to do."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    y = torch.linspace(0, 1, height)[None, :, None, None]
    x = torch.linspace(0, 1, width)[None, None, :, None]
    phase = torch.rand(batch, 1, 1, 1, 3, generator=generator) * 6.28
    wave = torch.sin(6.0 * x + 4.0 * y + 0.3 * t + phase)  # B, T, H, W, 3
    noise = torch.randn(batch, frames, height, width, 3, generator=generator) * 0.1
    return ((wave + noise) * 100 + 128).clamp(0, 255).to(torch.uint8)


def floating_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of ``module``: fixed weights (a seeded projection), as opposed to counters."""
    return [buffer for buffer in module.buffers() if buffer.is_floating_point()]


def perturb_buffers(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every floating-point buffer off its value, as ``perturb_parameters`` does for parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for buffer in floating_buffers(module):
            buffer.add_((torch.randn(buffer.shape, generator=generator) * std).to(buffer.device, buffer.dtype))


class CodecConformance:
    """Mixin of tests every LatentCodec must pass. Implement ``make_codec``; set ``video_shape``."""

    video_shape: ClassVar[tuple[int, int, int]] = (9, 16, 16)
    exact: ClassVar[bool] = False

    def make_codec(self) -> LatentCodec:
        """Build the codec under test; every call must give the same codec (seed random weights)."""
        raise NotImplementedError

    @pytest.fixture
    def codec(self) -> LatentCodec:
        return self.make_codec().eval()

    def video(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return smooth_video(batch, *self.video_shape, seed=seed)

    def test_encode_gives_float_latents_of_the_announced_shape(self, codec):
        latents = codec.encode(self.video())
        assert latents.shape == (2, *codec.latent_shape(*self.video_shape))
        assert latents.shape[-1] == codec.latent_channels
        # Samplers and the data tools size videos with latent_frames alone.
        assert latents.shape[1] == codec.latent_frames(self.video_shape[0]), (
            f"{self.video_shape[0]} frames encode to {latents.shape[1]} latent frames, but latent_frames() says "
            f"{codec.latent_frames(self.video_shape[0])}")
        assert latents.dtype == torch.float32 and torch.isfinite(latents).all()

    def test_usable_frames_is_the_longest_encodable_start(self, codec):
        """Videos are cut to ``usable_frames(n)`` frames before they are encoded (``flowvid score``,
        ``generate``, the pipeline's prefix): it must be encodable, and the most frames that are."""
        frames = self.video_shape[0]
        for count in range(1, 2 * frames + 2):
            usable = codec.usable_frames(count)
            encodable = [n for n in range(1, count + 1) if self._encodable(codec, n)]
            assert usable == (encodable[-1] if encodable else 0), (
                f"usable_frames({count}) is {usable}; of 1..{count} frames the codec encodes "
                f"{encodable or 'none'}: it must give the most of them (0 if none)")

    @staticmethod
    def _encodable(codec: LatentCodec, frames: int) -> bool:
        try:
            codec.check_video_size(frames, None, None)
        except ValueError:
            return False
        return True

    def test_decode_gives_uint8_video_of_the_input_shape(self, codec):
        video = self.video()
        decoded = codec.decode(codec.encode(video))
        assert decoded.shape == video.shape and decoded.dtype == torch.uint8

    def test_decoding_reads_the_latents(self, codec):
        """Even an untrained lossy codec gives other videos for other latents: a decoder that dropped or
        misplaced what it decodes (all frames alike, or the same video whatever the latents) fails."""
        latents = codec.encode(self.video())
        decoded = codec.decode(latents).float()
        assert decoded.std() > 0, "the decoded video is one flat colour"
        moved = codec.decode(latents + torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))).float()
        assert (moved - decoded).abs().mean() > 0.5, "the decoder gives the same video for other latents"

    def test_round_trip_is_exact_when_announced(self, codec):
        if not self.exact:
            pytest.skip("lossy codec")
        video = self.video()
        assert torch.equal(codec.decode(codec.encode(video)), video)

    def test_encoding_is_deterministic_and_per_video(self, codec):
        video = self.video(batch=3, seed=1)
        together = codec.encode(video)
        assert torch.equal(together, codec.encode(video))
        alone = codec.encode(video[1:2])
        torch.testing.assert_close(alone, together[1:2], rtol=1e-4, atol=1e-4)

    def test_decoding_is_deterministic_and_per_video(self, codec):
        latents = codec.encode(self.video(batch=3, seed=1))
        together = codec.decode(latents)
        assert torch.equal(together, codec.decode(latents))
        alone = codec.decode(latents[1:2]).int()
        # uint8 frames: one level of rounding apart at most, where batched kernels sum in another order.
        assert (alone - together[1:2].int()).abs().max() <= 1, "a video's decoding depends on the others in its batch"

    def test_later_frames_do_not_change_earlier_latent_frames(self, codec):
        video = self.video(seed=2)
        changed = video.clone()
        changed[:, -1] = 255 - changed[:, -1]
        before, after = codec.encode(video), codec.encode(changed)
        torch.testing.assert_close(after[:, :-1], before[:, :-1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after[:, -1], before[:, -1])

    def test_a_codec_without_frame_groups_decodes_each_frame_alone(self, codec):
        """A codec that announces no temporal grouping (``temporal_factor`` 1, no causal first frame) has its
        frames decoded one at a time, as soon as each is sampled (``VideoPipeline.stream``, ``flowvid
        generate --stream``): a latent frame decoded alone must give its frame of the whole decoded video,
        or the streamed frames are not the video's."""
        if codec.temporal_factor != 1 or codec.causal_first_frame:
            pytest.skip("frames are decoded in groups, with the whole video")
        latents = codec.encode(self.video())
        whole = codec.decode(latents).int()
        for t in range(latents.shape[1]):
            alone = codec.decode(latents[:, t:t + 1]).int()
            # uint8 frames: one level of rounding apart at most, where kernels sum in another order.
            assert (alone - whole[:, t:t + 1]).abs().max() <= 1, (
                f"latent frame {t} decoded alone differs from frame {t} of the whole video: the decoder reads "
                "other latent frames, and a codec with temporal_factor 1 is decoded frame by frame when streaming")

    def test_sizes_the_codec_cannot_encode_are_a_clear_error(self, codec):
        frames, height, width = self.video_shape
        if codec.spatial_factor == 1 and codec.temporal_factor == 1 and not codec.causal_first_frame:
            pytest.skip("every size is encodable")
        if codec.spatial_factor > 1:
            with pytest.raises(ValueError, match=f"divisible by {codec.spatial_factor}"):
                codec.encode(smooth_video(1, frames, height + 1, width))
        if codec.temporal_factor > 1:
            with pytest.raises(ValueError, match="frame count"):
                codec.encode(smooth_video(1, frames + 1, height, width))

    def test_float_video_is_a_clear_error(self, codec):
        with pytest.raises(ValueError, match="uint8"):
            codec.encode(self.video().float())

    def test_latents_of_the_wrong_width_are_a_clear_error(self, codec):
        latents = codec.encode(self.video())
        with pytest.raises(ValueError, match=str(codec.latent_channels)):
            codec.decode(latents[..., :-1])

    def test_a_batch_of_no_videos_encodes_and_decodes_to_empty_batches_of_the_same_sizes(self, codec):
        latents = codec.encode(self.video()[:0])
        assert latents.shape == (0, *codec.latent_shape(*self.video_shape)) and latents.dtype == torch.float32
        video = codec.decode(latents)
        assert video.shape == (0, *self.video_shape, 3) and video.dtype == torch.uint8

    def test_latents_of_no_frames_are_a_clear_error(self, codec):
        latents = codec.encode(self.video())
        with pytest.raises(ValueError, match="at least one frame"):
            codec.decode(latents[:, :0])

    def test_encoding_and_decoding_leave_their_input_as_given(self, codec):
        """Callers keep their tensors (a video's frames, latents decoded again or saved to shards)."""
        video = self.video()
        kept_video = video.clone()
        latents = codec.encode(video)
        assert torch.equal(video, kept_video), "encode changed the caller's video in place: work on a copy"
        kept_latents = latents.clone()
        codec.decode(latents)
        assert torch.equal(latents, kept_latents), (
            "decode changed the caller's latents in place (an in-place denormalisation?): work on a copy")

    def test_identity_is_stable_and_json_serialisable(self, codec):
        identity = codec.identity()
        assert {"name", "config_hash", "config"} <= set(identity) <= {"name", "package", "config_hash", "config"}
        assert len(identity["config_hash"]) == 16
        assert identity == self.make_codec().identity()
        assert identity["config"] == json.loads(json.dumps(codec.config(), default=str))
        normalisation = codec.normalisation()
        if normalisation is not None:
            assert len(normalisation["mean"]) == len(normalisation["std"]) == codec.latent_channels

    def make_codec_with_other_weights(self) -> LatentCodec:
        """The codec under test with other weights. Default: ``make_codec()``'s, perturbed in memory.
        Override it where that is not another codec: an identity that fingerprints weight files needs one
        loaded from other files, a codec whose weights are buffers (fixed, not trained) may be one built with
        another seed. A codec without parameters has its floating-point buffers perturbed instead."""
        codec = self.make_codec()
        if any(True for _ in codec.parameters()):
            perturb_parameters(codec, std=0.1, seed=3)
        else:
            perturb_buffers(codec, std=0.1, seed=3)
        return codec

    def test_identity_tells_other_weights_apart(self, codec):
        """Latent shards, checkpoints and exports are matched to the codec by ``identity()``: a codec whose
        weights (parameters or buffers) give other latents must not report the same identity (put a
        weights fingerprint in ``config()``). Skipped only for a codec with neither parameters nor
        floating-point buffers whose test class does not say how to make other weights (``PixelCodec``)."""
        overridden = type(self).make_codec_with_other_weights is not CodecConformance.make_codec_with_other_weights
        if not overridden and not any(True for _ in codec.parameters()) and not floating_buffers(codec):
            pytest.skip("a codec without weights (no parameters, no floating-point buffers)")
        other = self.make_codec_with_other_weights().eval()
        video = self.video()
        assert not torch.allclose(other.encode(video), codec.encode(video)), \
            "make_codec_with_other_weights() encodes the video as make_codec() does"
        assert not same_codec(other.identity(), codec.identity()), \
            "other weights, the same identity: latent shards and checkpoints of one codec would pass for the other's"
