"""The kits fail plugins that break their contract where the kits used to look away. (More of the
block kit's such tests are in test_flow_blocks.py.)"""

import pytest
import torch
from torch import nn

from flowvid.codecs import PixelCodec
from flowvid.fingerprint import weights_fingerprint
from flowvid.flows import AffineBlock
from flowvid.sampling import GuidedText, SequentialSampler
from flowvid.testing import CodecConformance, FlowBlockConformance, SamplerConformance, TextEncoderConformance
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


def codec_kit(codec_class):
    kit = type("Kit", (CodecConformance,), {"make_codec": lambda self: codec_class(), "video_shape": (4, 8, 8)})()
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
