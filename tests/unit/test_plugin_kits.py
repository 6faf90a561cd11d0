"""The sampler and text-encoder kits fail plugins that break their contract where the kits used to
look away. (The block kit's own such tests are in test_flow_blocks.py.)"""

import pytest
import torch
from torch import nn

from flowvid.fingerprint import weights_fingerprint
from flowvid.sampling import GuidedText, SequentialSampler
from flowvid.testing import SamplerConformance, TextEncoderConformance
from flowvid.text.base import TextEmbedding, TextEncoder


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

    def forward(self, captions):
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = [sum(map(ord, word)) % self.vocabulary for word in caption.split()][:self.max_length]
            ids[row, :len(words)] = torch.tensor(words, dtype=torch.long)
            mask[row, :len(words)] = True
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
