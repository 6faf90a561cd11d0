"""Text at the edges: cached states against live ones, padding, truncation, unicode, vocabularies."""

import warnings

import pytest
import torch

from flowvid.codecs.pixel import PixelCodec
from flowvid.export import CheckpointMismatchError, check_outside_parts
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.sampling import encode_text
from flowvid.testing import perturb_parameters
from flowvid.text import LearnedTextEncoder, WordTokenizer, cache_embeddings, embedding_from_cache
from flowvid.text.base import TextEmbedding
from flowvid.text.tokenizer import split_words

WIDTH, LENGTH = 16, 6
CAPTIONS = ["a red circle moves left", "", "a red circle moves left and a blue square moves up", "caf\u00e9"]


def frozen_encoder() -> LearnedTextEncoder:
    """Stands in for a frozen pretrained encoder: fixed weights whose states can be cached."""
    torch.manual_seed(0)
    encoder = LearnedTextEncoder(width=WIDTH, max_length=LENGTH, depth=1, head_dim=16).requires_grad_(False).eval()
    encoder.trainable = False
    return encoder


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long caption's truncation warning
        return function(*args, **kwargs)


def test_cached_states_are_exactly_the_states_the_encoder_gives_live():
    """Shards hold float16 states; training without a cache and sampling encode live. A caption must
    condition the flow alike either way: empty, truncated and unicode captions included."""
    encoder = frozen_encoder()
    tokens, mask = quietly(cache_embeddings, encoder, CAPTIONS, batch_size=3)
    cached = embedding_from_cache(tokens.astype("float32"), mask)  # as the shard reader hands them over
    live = quietly(encoder.encode, CAPTIONS)
    assert live.mask[2].all()  # the long caption was truncated, in both
    assert torch.equal(cached.mask, live.mask)
    assert torch.equal(cached.tokens, live.tokens)


def test_training_from_a_cache_conditions_the_flow_as_sampling_does():
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=WIDTH)
    module = FlowModule(flow, PixelCodec(patch_size=2), frozen_encoder(), video_shape=(3, 4, 6), text_dropout=0.0)
    captions = CAPTIONS[:2]
    tokens, mask = cache_embeddings(module.text_encoder, captions)
    batch = {"latents": torch.randn(2, 3, 2, 3, 12), "caption": captions,
             "text_tokens": torch.from_numpy(tokens).float(), "text_mask": torch.from_numpy(mask)}
    _, trained_on = module.training_inputs(batch)
    sampled_with = encode_text(module.text_encoder, captions)
    assert torch.equal(trained_on.tokens, sampled_with.tokens) and torch.equal(trained_on.mask, sampled_with.mask)


def test_a_trainable_encoder_keeps_its_float32_states():
    torch.manual_seed(0)
    encoder = LearnedTextEncoder(width=WIDTH, max_length=LENGTH, depth=1, head_dim=16)
    states = encoder.encode(CAPTIONS[:1]).tokens
    assert not torch.equal(states, states.half().float())  # not rounded: it is never cached
    assert states.requires_grad


def test_states_at_padded_positions_change_nothing():
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), text_width=8)
    perturb_parameters(flow, std=0.05)
    x = torch.randn(2, 3, 2, 3, 3)
    mask = torch.arange(5) < torch.tensor([[2], [4]])
    tokens = torch.randn(2, 5, 8) * mask[..., None]
    noisy_padding = tokens.clone()
    noisy_padding[~mask] = 100 * torch.randn_like(noisy_padding[~mask])
    with torch.no_grad():
        z, logdet = flow(x, TextEmbedding(tokens, mask))
        z_noisy, logdet_noisy = flow(x, TextEmbedding(noisy_padding, mask))
    assert torch.equal(z, z_noisy) and torch.equal(logdet, logdet_noisy)


@pytest.mark.parametrize("variant", ["cafe\u0301 red", "CAF\u00c9 RED", "caf\u00e9 \uff32\uff25\uff24"])
def test_text_that_looks_the_same_tokenizes_the_same(variant):
    """A combining accent (NFD, as macOS file names hold text), capitals or full-width letters."""
    tokenizer = WordTokenizer(["caf\u00e9", "red"])
    ids, _, _, unknown = tokenizer(["caf\u00e9 red", variant], max_length=4)
    assert unknown == 0 and torch.equal(ids[0], ids[1])


def test_an_accented_word_is_one_word_not_pieces():
    assert split_words("na\u00efve caf\u00e9s") == ["na\u00efve", "caf\u00e9s"]
    assert split_words("Noise Level 500:\n(extend) a_b") == ["noise", "level", "5", "0", "0", ":", "(", "extend", ")",
                                                            "a", "_", "b"]


def test_a_model_built_with_another_vocabulary_is_refused_when_loaded():
    """The tokenizer's vocabulary comes from the config; one of the same size loads the same weights and
    maps words to other ids, so the identity written with the checkpoint tells them apart."""
    trained = LearnedTextEncoder(width=WIDTH, depth=1, head_dim=16, vocabulary=["cow", "pig"])
    rebuilt = LearnedTextEncoder(width=WIDTH, depth=1, head_dim=16, vocabulary=["cow", "hen"])
    assert len(trained.tokenizer) == len(rebuilt.tokenizer)
    holder = torch.nn.Module()
    holder.text_encoder = rebuilt
    with pytest.raises(CheckpointMismatchError, match="vocabulary_sha256"):
        check_outside_parts(holder, {"text_encoder": trained.identity()}, {}, where="checkpoint x")
