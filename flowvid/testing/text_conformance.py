"""Conformance tests for text encoders.

A text-encoder plugin's test module subclasses the mixin and says how to build its encoder::

    from flowvid.testing import TextEncoderConformance

    class TestMyEncoder(TextEncoderConformance):
        def make_encoder(self):
            return MyEncoder(...)

pytest then runs every ``test_*`` method below: shapes and dtypes, masked and zeroed padding, at
least one real token per caption (so attention over the text never meets an all-masked row) and no more
for the empty caption than for any other, embeddings that depend on the words (not only on how many there
are), determinism, each caption alone embedded as in a batch, the empty caption, counted truncation,
gradients (flowing into a trainable encoder, absent from a frozen one), and an identity that tells a
frozen encoder's weights from other ones (shards that cache its embeddings are matched to it by identity).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch

from flowvid.testing.block_conformance import perturb_parameters
from flowvid.text.base import TextEncoder, same_text_encoder

CAPTIONS = ["a red circle moves left", "a blue square moves up and a green triangle moves down", ""]


class TextEncoderConformance:
    """Mixin of tests every TextEncoder must pass. Implement ``make_encoder``."""

    captions: ClassVar[list[str]] = CAPTIONS

    def make_encoder(self) -> TextEncoder:
        """Build the encoder under test (random weights seeded)."""
        raise NotImplementedError

    def make_encoder_with_other_weights(self) -> TextEncoder:
        """The encoder under test with other weights. Default: ``make_encoder()``'s, perturbed in memory.
        Override it where that is not another encoder: an identity that fingerprints weight files needs
        one loaded from other files, an encoder without weights one with another seed or tokenizer."""
        encoder = self.make_encoder()
        perturb_parameters(encoder, std=0.1, seed=3)
        return encoder

    @pytest.fixture
    def encoder(self) -> TextEncoder:
        return self.make_encoder().eval()

    def test_shapes_and_dtypes(self, encoder):
        tokens, mask = encoder.encode(self.captions)
        assert tokens.shape == (len(self.captions), encoder.max_length, encoder.width)
        assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool
        assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()

    def test_padding_is_masked_and_zero_and_every_caption_has_a_real_token(self, encoder):
        tokens, mask = encoder.encode(self.captions)
        assert (tokens[~mask] == 0).all()
        assert mask.any(dim=1).all()
        lengths = mask.sum(dim=1)
        assert lengths[1] > lengths[0]  # the longer caption has more tokens
        assert (mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all()  # real tokens come first
        empty = [row for row, caption in enumerate(self.captions) if not caption.split()]
        for row in empty:  # blocks read every real token: padding called real is read as words
            assert lengths[row] <= lengths.min(), (
                f"the empty caption has {int(lengths[row])} real tokens, more than caption "
                f"{int(lengths.argmin())} ({int(lengths.min())}): its mask marks padding as real")

    def test_deterministic_and_independent_of_the_batch(self, encoder):
        """Every caption alone embeds as in the batch (shards embed captions in batches of any make-up): an
        encoder that pads to the batch's longest caption and reads the padding fails for the shorter ones."""
        first, second = encoder.encode(self.captions), encoder.encode(self.captions)
        assert torch.equal(first.tokens, second.tokens) and torch.equal(first.mask, second.mask)
        for row, caption in enumerate(self.captions):
            alone = encoder.encode([caption])
            torch.testing.assert_close(alone.tokens, first.tokens[row:row + 1], rtol=1e-4, atol=1e-4, msg=lambda m: (
                f"{caption!r} alone embeds otherwise than in a batch with other captions: {m}"))
            assert torch.equal(alone.mask, first.mask[row:row + 1]), f"{caption!r} alone gets another mask"

    def test_a_frozen_encoder_gives_the_same_embeddings_in_training_mode(self, encoder):
        """Cached in shards and computed when sampling, a frozen encoder's embeddings must not change in
        training (dropout left on would draw other ones every step)."""
        if encoder.trainable:
            pytest.skip("a trainable encoder may use dropout in training")
        expected = encoder.encode(self.captions).tokens
        encoder.train()
        assert torch.equal(encoder.encode(self.captions).tokens, expected)
        assert torch.equal(encoder.encode(self.captions).tokens, expected)

    def test_the_words_change_the_embedding(self, encoder):
        """The same words in another order (the same length, and the same tokens for any tokenizer) must
        embed otherwise. An encoder that reads only how long a caption is (every word unknown to its
        vocabulary, or the mask fed in as token ids) passes the checks of shapes, padding and lengths."""
        words = self.captions[0].split()
        if len(set(words)) < 2:
            pytest.skip("the first caption needs two different words")
        reordered = " ".join(reversed(words))
        tokens = encoder.encode([self.captions[0], reordered]).tokens
        assert not torch.allclose(tokens[0], tokens[1]), (
            f"{self.captions[0]!r} and {reordered!r} embed alike: the encoder does not read the words "
            "(are they all unknown to its vocabulary?)")

    def test_empty_caption_is_one_fixed_unconditional_embedding(self, encoder):
        empty = encoder.encode(["", self.captions[0], ""])
        assert torch.equal(empty.mask[0], empty.mask[2])
        torch.testing.assert_close(empty.tokens[0], empty.tokens[2])
        assert not torch.allclose(empty.tokens[0], empty.tokens[1])

    def test_overlong_captions_are_truncated_and_counted(self, encoder):
        before = encoder.truncated_count
        long_caption = " ".join(["a red circle moves left and"] * encoder.max_length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embedding = encoder.encode([long_caption, self.captions[0]])
        assert embedding.mask[0].all() and not embedding.mask[1].all()
        assert encoder.truncated_count == before + 1

    def test_gradients_reach_a_trainable_encoder_and_never_a_frozen_one(self, encoder):
        tokens, _ = encoder.encode(self.captions)
        trainable = [p for p in encoder.parameters() if p.requires_grad]
        if encoder.trainable:
            tokens.square().sum().backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
            encoder.zero_grad()
        else:
            assert not tokens.requires_grad and not trainable

    def test_identity_names_width_and_length(self, encoder):
        identity = encoder.identity()
        assert identity["width"] == str(encoder.width) and identity["max_length"] == str(encoder.max_length)
        assert identity == self.make_encoder().identity()

    def test_identity_tells_other_weights_apart(self, encoder):
        """Embeddings cached in shards are matched to the encoder by ``identity()``: an encoder that embeds
        captions otherwise (other weights, seed, tokenizer) must not report the same identity."""
        if encoder.trainable:
            pytest.skip("a trainable encoder's embeddings are never cached: its weights travel in checkpoints")
        other = self.make_encoder_with_other_weights().eval()
        assert not torch.allclose(other.encode(self.captions).tokens, encoder.encode(self.captions).tokens), \
            "make_encoder_with_other_weights() embeds the captions as make_encoder() does"
        assert not same_text_encoder(other.identity(), encoder.identity()), \
            "other weights, the same identity: shards would hand one encoder's cached embeddings to the other"
