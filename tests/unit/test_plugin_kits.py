"""The kits fail plugins that break their contract where the kits used to look away. (More of the
block kit's such tests are in test_flow_blocks.py.)"""

import pytest
import torch
from torch import nn

from flowvid.codecs import PixelCodec, VideoVAE
from flowvid.fingerprint import weights_fingerprint
from flowvid.flows import AffineBlock
from flowvid.sampling import GuidedText, SequentialSampler
from flowvid.testing import (CodecConformance, FlowBlockConformance, SamplerConformance, TextEncoderConformance,
                             perturb_parameters)
from flowvid.text import LearnedTextEncoder
from flowvid.text.base import TextEmbedding, TextEncoder
from flowvid_plugins.blocks import GatedAffineBlock


class AssumesText(SequentialSampler):
    """Moves the text to the noise's device without asking whether there is any text."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        if isinstance(text, GuidedText):
            text = GuidedText(text.cond.to(z.device), text.uncond.to(z.device))
        else:
            text = text.to(z.device)
        return super().sample(flow, z, text, guidance, prefix)


class SqueezesTheBatch(SequentialSampler):
    """Drops the batch axis of a single video, as ``squeeze(0)`` written for one video's tensor does."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return super().sample(flow, z, text, guidance, prefix).squeeze(0)


@pytest.mark.parametrize("sampler_class, kit_test, breaking_request, error", [
    (AssumesText, "test_inverts_the_flow", {"conditioned": False, "batch": 2}, AttributeError),
    (SqueezesTheBatch, "test_output_shape_and_dtype", {"conditioned": True, "batch": 1}, AssertionError),
])
def test_the_sampler_kit_fails_a_sampler_that_breaks_on_a_request_it_did_not_make(sampler_class, kit_test,
                                                                                  breaking_request, error):
    kit = type("Kit", (SamplerConformance,), {"sampler_class": sampler_class, "tolerance": 1e-5})()
    getattr(kit, kit_test)(conditioned=True, batch=2)  # the only request the kit used to make
    with pytest.raises(error):
        getattr(kit, kit_test)(**breaking_request)


class HashedWordEncoder(TextEncoder):
    """A frozen encoder of random word embeddings (seeded), each word's id a hash of its letters."""

    width, max_length, vocabulary = 8, 12, 64

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(self.vocabulary, self.width).requires_grad_(False)

    def tokenize(self, captions):
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = [sum(map(ord, word)) % self.vocabulary for word in caption.split()][:self.max_length]
            ids[row, :len(words)] = torch.tensor(words, dtype=torch.long)
            mask[row, :len(words)] = True
        return ids, mask

    def forward(self, captions):
        ids, mask = self.tokenize(captions)
        return TextEmbedding(self.embed(ids) * mask[..., None], mask)


class FingerprintedWordEncoder(HashedWordEncoder):
    def identity(self):
        return {**super().identity(), "weights_sha256": weights_fingerprint(self)}


def identity_check(encoder_class):
    """The text kit's identity check, on an encoder seeded 0 against the same class seeded 1."""
    kit = type("Kit", (TextEncoderConformance,), {
        "make_encoder": lambda self: encoder_class(seed=0),
        "make_encoder_with_other_weights": lambda self: encoder_class(seed=1),
    })()
    return lambda: kit.test_identity_tells_other_weights_apart(kit.make_encoder().eval())


def test_the_text_kit_fails_an_identity_blind_to_the_weights():
    with pytest.raises(AssertionError, match="the same identity"):
        identity_check(HashedWordEncoder)()


def test_the_text_kit_passes_an_identity_with_a_weights_fingerprint():
    identity_check(FingerprintedWordEncoder)()


class CaptionBlindBlock(AffineBlock):
    """Built with a text projection (``spec.text_width``), but never reads the caption."""

    def _text_states(self, text, batch):
        return None, None


@pytest.mark.parametrize("block_class", [AffineBlock, GatedAffineBlock])
def test_the_block_kit_passes_blocks_that_read_their_caption(block_class):
    type("Kit", (FlowBlockConformance,), {"block_class": block_class})().test_other_words_give_other_noise_at_every_token()


def test_the_block_kit_fails_a_block_that_ignores_its_caption():
    kit = type("Kit", (FlowBlockConformance,), {"block_class": CaptionBlindBlock})()
    kit.test_padded_text_positions_are_never_read()  # what the kit checked of the text before
    with pytest.raises(AssertionError, match="ignores its caption"):
        kit.test_other_words_give_other_noise_at_every_token()


def text_kit(make_encoder):
    kit = type("Kit", (TextEncoderConformance,), {"make_encoder": lambda self: make_encoder()})()
    return kit, kit.make_encoder().eval()


class MaskAsIds(HashedWordEncoder):
    """Embeds the padding mask where the token ids belong: only a caption's length reaches the states."""

    def forward(self, captions):
        _, mask = self.tokenize(captions)
        return TextEmbedding(self.embed(mask.long()) * mask[..., None], mask)


def test_the_text_kit_fails_an_encoder_that_reads_only_the_caption_lengths():
    kit, encoder = text_kit(MaskAsIds)
    kit.test_shapes_and_dtypes(encoder)
    kit.test_deterministic_and_independent_of_the_batch(encoder)
    with pytest.raises(AssertionError, match="does not read the words"):
        kit.test_the_words_change_the_embedding(encoder)


@pytest.mark.parametrize("make_encoder", [HashedWordEncoder, lambda: LearnedTextEncoder(width=16, depth=1, head_dim=8)])
def test_the_text_kit_passes_encoders_that_read_the_words(make_encoder):
    kit, encoder = text_kit(make_encoder)
    kit.test_the_words_change_the_embedding(encoder)


class TimeSmoothingCodec(PixelCodec):
    """Announces no frame groups, but its decoder averages each latent frame with the one before."""

    def decode(self, latents):
        earlier = torch.cat([latents[:, :1], latents[:, :-1]], dim=1)
        return super().decode((latents + earlier) / 2)


def codec_kit(codec_class, video_shape=(4, 8, 8)):
    kit = type("Kit", (CodecConformance,), {"make_codec": lambda self: codec_class(), "video_shape": video_shape})()
    return kit, kit.make_codec().eval()


def test_the_codec_kit_fails_a_codec_whose_frames_cannot_be_decoded_one_by_one():
    kit, codec = codec_kit(TimeSmoothingCodec)
    kit.test_decoding_reads_the_latents(codec)
    kit.test_decoding_is_deterministic_and_per_video(codec)
    with pytest.raises(AssertionError, match="latent frame 1 decoded alone differs"):
        kit.test_a_codec_without_frame_groups_decodes_each_frame_alone(codec)


def test_the_codec_kit_passes_a_codec_that_decodes_frame_by_frame():
    kit, codec = codec_kit(PixelCodec)
    kit.test_a_codec_without_frame_groups_decodes_each_frame_alone(codec)


class CountsFramesNotGroups(PixelCodec):
    """Groups two frames per latent frame and says so in ``latent_shape``, but its ``latent_frames`` (which
    samplers and the data tools size videos with) counts video frames."""

    def __init__(self):
        super().__init__(temporal_patch=2)

    def latent_shape(self, num_frames, height, width):
        return num_frames // 2, height, width, self.latent_channels

    def latent_frames(self, num_frames):
        return num_frames


class UsesEveryFrame(PixelCodec):
    """Groups two frames per latent frame, but ``usable_frames`` forgets to round down to whole groups."""

    def __init__(self):
        super().__init__(temporal_patch=2)

    def usable_frames(self, num_frames):
        return num_frames


class DenormalisesInPlace(PixelCodec):
    """Normalises its latents, and undoes that on the caller's latents in place when decoding."""

    def encode(self, video):
        return (super().encode(video) - 0.1) / 2

    def decode(self, latents):
        return super().decode(latents.mul_(2).add_(0.1))


class ArchitectureOnlyIdentity(VideoVAE):
    """A trained VAE whose ``config()`` names its architecture only: every training of it looks alike."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(spatial_factor=2, temporal_factor=2, latent_channels=4, width=8, depth=1)
        perturb_parameters(self)

    def config(self):
        return self.architecture()


@pytest.mark.parametrize("codec_class, kit_test, message", [
    (CountsFramesNotGroups, "test_encode_gives_float_latents_of_the_announced_shape",
     r"4 frames encode to 2 latent frames, but latent_frames\(\) says 4"),
    (UsesEveryFrame, "test_usable_frames_is_the_longest_encodable_start",
     r"usable_frames\(1\) is 1; of 1..1 frames the codec encodes none"),
    (DenormalisesInPlace, "test_encoding_and_decoding_leave_their_input_as_given",
     "decode changed the caller's latents in place"),
    (ArchitectureOnlyIdentity, "test_identity_tells_other_weights_apart", "other weights, the same identity"),
])
def test_the_codec_kit_names_what_a_codec_breaks(codec_class, kit_test, message):
    video_shape = (5, 8, 8) if issubclass(codec_class, VideoVAE) else (4, 8, 8)  # a VAE encodes 1 + 2k frames
    kit, codec = codec_kit(codec_class, video_shape)
    with pytest.raises(AssertionError, match=message):
        getattr(kit, kit_test)(codec)


@pytest.mark.parametrize("make_codec", [PixelCodec, lambda: PixelCodec(patch_size=2, temporal_patch=2)])
def test_the_codec_kit_passes_codecs_that_keep_their_word(make_codec):
    kit, codec = codec_kit(make_codec)
    kit.test_usable_frames_is_the_longest_encodable_start(codec)
    kit.test_encoding_and_decoding_leave_their_input_as_given(codec)


class PadsToTheLongestCaption(LearnedTextEncoder):
    """Lets every caption attend to the batch's longest caption's length, padding included: a caption's
    embedding then depends on the captions beside it, though not the longest one's."""

    def forward(self, captions):
        ids, mask, truncated, _ = self.tokenizer(captions, self.max_length)
        self.record_truncation(truncated)
        reach = torch.arange(self.max_length) < mask.sum(dim=1).max()
        h = self.embed(ids) + self.position
        for layer in self.layers:
            h = layer(h, self.no_rotation.cos(), self.no_rotation.sin(), reach.expand(len(captions), 1, 1, -1))
        return TextEmbedding(self.norm(h) * mask[..., None], mask)


class EmptyCaptionAllReal(LearnedTextEncoder):
    """Marks every position of the empty caption real: blocks then read its padding as words."""

    def forward(self, captions):
        tokens, mask = super().forward(captions)
        empty = torch.tensor([not caption.split() for caption in captions])
        return TextEmbedding(tokens, mask | empty[:, None])


def small_learned(encoder_class=LearnedTextEncoder):
    torch.manual_seed(0)
    return encoder_class(width=16, max_length=12, depth=1, head_dim=8)


@pytest.mark.parametrize("encoder_class, kit_test, message", [
    (PadsToTheLongestCaption, "test_deterministic_and_independent_of_the_batch",
     "'a red circle moves left' alone embeds otherwise than in a batch with other captions"),
    (EmptyCaptionAllReal, "test_padding_is_masked_and_zero_and_every_caption_has_a_real_token",
     "the empty caption has 12 real tokens, more than caption 0"),
])
def test_the_text_kit_names_what_an_encoder_breaks(encoder_class, kit_test, message):
    kit, encoder = text_kit(lambda: small_learned(encoder_class))
    kit.test_shapes_and_dtypes(encoder)
    with pytest.raises(AssertionError, match=message):
        getattr(kit, kit_test)(encoder)


def test_the_text_kit_passes_the_learned_encoder_on_these_checks():
    kit, encoder = text_kit(small_learned)
    kit.test_deterministic_and_independent_of_the_batch(encoder)
    kit.test_padding_is_masked_and_zero_and_every_caption_has_a_real_token(encoder)
