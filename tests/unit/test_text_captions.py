"""What every text encoder takes as captions: a list of strings, possibly empty."""

import pytest
import torch

pytest.importorskip("transformers")
from test_text_plugins import save_tiny_t5  # noqa: E402

from flowvid.text import LearnedTextEncoder  # noqa: E402
from flowvid_plugins.text_encoders import T5TextEncoder  # noqa: E402


@pytest.fixture(scope="module", params=["learned", "t5"])
def encoder(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "learned":
        return LearnedTextEncoder(width=16, max_length=8, depth=1, head_dim=8).eval()
    return T5TextEncoder(save_tiny_t5(tmp_path_factory.mktemp("t5")), max_length=8)


def test_a_single_string_is_refused_not_read_as_one_caption_per_character(encoder):
    with pytest.raises(ValueError, match=r"expected a list of captions, got the string 'a red circle'; pass \[caption\]"):
        encoder.encode("a red circle")


@pytest.mark.parametrize("caption", [None, 3, b"a red circle"])
def test_a_caption_that_is_not_a_string_is_named(encoder, caption):
    with pytest.raises(ValueError, match=f"caption 1 is {type(caption).__name__} .*, not a string"):
        encoder.encode(["a red circle", caption])


def test_no_captions_give_an_empty_batch(encoder):
    embedding = encoder.encode([])
    assert embedding.tokens.shape == (0, 8, encoder.width) and embedding.mask.shape == (0, 8)
    assert embedding.tokens.dtype == torch.float32 and embedding.mask.dtype == torch.bool
