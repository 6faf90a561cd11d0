"""PixelCodec: conformance, layout of the latent channels, identities and their mismatch error."""

import pytest
import torch

from flowvid.codecs import CodecMismatchError, PixelCodec, check_codec_identity
from flowvid.registry import CODECS
from flowvid.testing.codec_conformance import CodecConformance


class TestPixelCodec(CodecConformance):
    video_shape = (4, 6, 8)
    exact = True

    def make_codec(self):
        return PixelCodec()


class TestPatchifiedPixelCodec(CodecConformance):
    video_shape = (4, 8, 12)
    exact = True

    def make_codec(self):
        return PixelCodec(patch_size=2, temporal_patch=2)


def test_every_uint8_value_survives_the_round_trip():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16, 1).expand(1, 2, 16, 16, 3).contiguous()
    codec = PixelCodec(patch_size=4)
    latents = codec.encode(values)
    assert latents.min() == -1.0 and latents.max() == 1.0
    assert torch.equal(codec.decode(latents), values)


def test_a_latent_vector_holds_one_patch_ordered_frame_row_column_colour():
    video = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    latents = PixelCodec(patch_size=2, temporal_patch=2).encode(video)
    assert latents.shape == (1, 1, 2, 2, 24)
    patch = video[0, :, 2:4, 0:2, :]  # both frames, rows 2-3, columns 0-1
    torch.testing.assert_close(latents[0, 0, 1, 0], patch.reshape(-1).float() / 127.5 - 1)


def test_decode_clamps_and_rounds():
    latents = torch.tensor([-3.0, -1.0, 0.0, 0.999, 5.0]).reshape(1, 1, 1, 5, 1).expand(1, 1, 1, 5, 3)
    decoded = PixelCodec().decode(latents.contiguous())
    assert decoded[0, 0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_identity_names_the_codec_and_hashes_its_config():
    plain, patched = PixelCodec().identity(), PixelCodec(patch_size=2).identity()
    assert plain["name"] == patched["name"] == "pixel"
    assert plain["config_hash"] != patched["config_hash"]
    assert CODECS.get("pixel") is PixelCodec


def test_a_codec_mismatch_is_a_clear_error_that_names_the_settings_that_differ():
    with pytest.raises(CodecMismatchError, match=r"shards in data/x was made with codec 'pixel' \(config \w{16}\), "
                       r"but this model uses 'pixel' \(config \w{16}\): they differ in patch_size \(2 there, 1 here\)$"):
        check_codec_identity(PixelCodec().identity(), PixelCodec(patch_size=2).identity(), "shards in data/x")


def test_identities_recorded_before_they_carried_the_config_are_still_checked_by_hash():
    # The hash is the one every earlier checkpoint and manifest recorded for this codec.
    assert PixelCodec().identity()["config_hash"] == "50fb07c8512f93ec"
    recorded = {"name": "pixel", "config_hash": "50fb07c8512f93ec"}
    check_codec_identity(PixelCodec().identity(), recorded, "the checkpoint")
    with pytest.raises(CodecMismatchError, match=r"but this model uses 'pixel' \(config \w{16}\)$"):
        check_codec_identity(PixelCodec(patch_size=2).identity(), recorded, "the checkpoint")


def test_nonpositive_patch_sizes_are_rejected():
    with pytest.raises(ValueError, match="patch"):
        PixelCodec(patch_size=0)


@pytest.mark.parametrize("patch_size", [0, 2.0, "2", True])
def test_a_patch_size_that_is_not_a_positive_integer_is_refused(patch_size):
    # 2.0 failed in torch.zeros and "2" in a comparison, far from the argument that was wrong.
    with pytest.raises(ValueError, match="patch sizes must be integers >= 1"):
        PixelCodec(patch_size=patch_size)


@pytest.mark.parametrize("temporal, message", [(1, "a frame count of at least 1, got 0"),
                                               (2, "a frame count of a positive multiple of 2, got 0")])
def test_a_video_of_no_frames_is_refused_saying_what_count_would_do(temporal, message):
    with pytest.raises(ValueError, match=message):
        PixelCodec(patch_size=2, temporal_patch=temporal).latent_frames(0)
