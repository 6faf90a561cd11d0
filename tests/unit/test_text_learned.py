"""The learned text encoder, its tokenizer, the prompt template and the embedding cache."""

import numpy as np
import pytest
import torch

from flowvid.data.synthetic import ALL_COMBINATIONS, caption_of
from flowvid.registry import TEXT_ENCODERS
from flowvid.text import LearnedTextEncoder, TASK_PREFIXES, WordTokenizer, build_prompt, cache_embeddings
from flowvid.text.tokenizer import SHAPES_WORDS, split_words
from flowvid.testing.text_conformance import TextEncoderConformance


class TestLearnedTextEncoder(TextEncoderConformance):
    def make_encoder(self):
        torch.manual_seed(0)
        return LearnedTextEncoder(width=32, max_length=16, depth=1, head_dim=16)


def test_registered_as_learned():
    assert TEXT_ENCODERS.get("learned") is LearnedTextEncoder


def test_the_default_vocabulary_covers_every_synthetic_caption_and_prompt():
    tokenizer = WordTokenizer(SHAPES_WORDS)
    for shape, colour, motion in ALL_COMBINATIONS:
        caption = caption_of({"objects": [{"shape": shape, "colour": colour, "motion": motion}] * 2})
        prompt = build_prompt(caption, fps=16, noise_level=0.5, aspect_ratio=(848, 480), task_prefix="(v2v) ")
        _, _, _, unknown = tokenizer([prompt], max_length=64)
        assert unknown == 0, prompt


@pytest.mark.parametrize("settings, message", [
    ({"max_length": -1}, "max_length must be an integer >= 1, got -1"), ({"width": 0}, "width"),
    ({"depth": 1.5}, "depth"), ({"head_dim": 7}, "head_dim must be even"),
])
def test_sizes_that_cannot_work_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=f"LearnedTextEncoder {message}"):
        LearnedTextEncoder(**settings)


def test_tokenizer_spells_numbers_and_marks_unknown_words():
    assert split_words("Noise Level 500:\n16:9") == ["noise", "level", "5", "0", "0", ":", "1", "6", ":", "9"]
    tokenizer = WordTokenizer(["red"])
    ids, mask, truncated, unknown = tokenizer(["red zebra", ""], max_length=3)
    assert ids[0, :2].tolist() == [tokenizer.ids["red"], tokenizer.unk_id] and unknown == 1
    assert ids[1, 0] == tokenizer.null_id and mask[1].tolist() == [True, False, False]
    assert truncated == 0


def test_vocabulary_ids_do_not_depend_on_word_order():
    assert WordTokenizer(["red", "blue"]).vocabulary == WordTokenizer(["blue", "red", "red"]).vocabulary


def test_vocabulary_entries_must_be_single_words():
    with pytest.raises(ValueError, match="single words"):
        WordTokenizer(["red circle"])


def test_unknown_words_are_counted_by_the_encoder():
    encoder = LearnedTextEncoder(width=16, max_length=8, depth=1, head_dim=16, vocabulary=["cat"])
    encoder(["a cat moves", "a dog"])
    assert encoder.unknown_count == 2  # "moves" and "dog"


def test_truncation_warns_once_and_keeps_counting():
    encoder = LearnedTextEncoder(width=16, max_length=2, depth=1, head_dim=16)
    with pytest.warns(UserWarning, match="truncated"):
        encoder(["a red circle"])
    encoder(["a red circle", "a blue square"])
    assert encoder.truncated_count == 3


def test_prompt_template_follows_the_training_layout():
    prompt = build_prompt("a red circle moves left", fps=16, noise_level=0.5, aspect_ratio="16:9",
                          task_prefix=TASK_PREFIXES["extend"])
    assert prompt == ("Noise Level 500:\nA video with 16 fps:\n(extend) a red circle moves left\n"
                      "\n in a 16:9 aspect ratio.\n")
    assert build_prompt("", fps=None) == "An image:\n\n"
    assert "in a 16:9 aspect" in build_prompt("x", fps=8.0, aspect_ratio=(1920, 1080))
    assert "with 7.5 fps" in build_prompt("x", fps=7.5)


def test_a_learned_encoder_cannot_be_cached():
    with pytest.raises(ValueError, match="cannot be cached"):
        cache_embeddings(LearnedTextEncoder(width=16, max_length=4, depth=1, head_dim=16), ["a"])


def test_cache_stores_float16_states_and_bool_masks():
    torch.manual_seed(0)
    encoder = LearnedTextEncoder(width=16, max_length=6, depth=1, head_dim=16).requires_grad_(False)
    encoder.trainable = False  # stands in for a frozen encoder
    captions = ["a red circle moves left", "", "a blue square"]
    tokens, mask = cache_embeddings(encoder, captions, batch_size=2)
    assert tokens.dtype == np.float16 and tokens.shape == (3, 6, 16)
    assert mask.dtype == np.bool_ and mask.sum(1).tolist() == [5, 1, 3]
    direct = encoder.encode(captions)
    torch.testing.assert_close(torch.from_numpy(tokens).float(), direct.tokens, atol=2e-2, rtol=1e-2)
