"""Prefix conditioning, the generation tasks (captions, prefixes, noise) and seeds."""

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import GuidedText, JacobiSampler, SequentialSampler
from flowvid.sampling.tasks import TASKS, encode_text, initial_noise, sample_task, task_caption, task_inputs
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding


def make_flow(text_width=None):
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), text_width=text_width)
    perturb_parameters(flow, std=0.05)
    return flow.eval()


@pytest.mark.parametrize("sampler", [SequentialSampler(), JacobiSampler(tol=1e-5)], ids=["sequential", "jacobi"])
def test_a_prefix_taken_from_a_video_continues_that_video(sampler):
    flow = make_flow()
    video = torch.randn(2, 5, 2, 3, 3)
    with torch.no_grad():
        z, _ = flow(video)
    x = sampler.sample(flow, z, prefix=video[:, :2])
    assert torch.equal(x[:, :2], video[:, :2])
    assert ((x - video).norm() / video.norm()).item() < 1e-4  # the cache holds the right history


def test_the_prefix_conditions_the_later_frames():
    flow = make_flow()
    z = torch.randn(1, 3, 2, 3, 3)
    a = SequentialSampler().sample(flow, z, prefix=torch.zeros(1, 1, 2, 3, 3))
    b = SequentialSampler().sample(flow, z, prefix=torch.ones(1, 1, 2, 3, 3))
    assert not torch.allclose(a[:, 1:], b[:, 1:])


@pytest.mark.parametrize("prefix, message", [
    (torch.zeros(2, 4, 2, 3, 3), "nothing to sample"),  # as long as the video
    (torch.zeros(2, 6, 2, 3, 3), "nothing to sample"),  # longer
    (torch.zeros(2, 1, 3, 2, 3), "prefix latent frames of shape"),  # wrong frame size
    (torch.zeros(1, 1, 2, 3, 3), "prefix latent frames of shape"),  # wrong batch
    (torch.zeros(2, 2, 3, 3), "prefix latent frames of shape"),  # not 5-D
    (torch.full((2, 1, 2, 3, 3), float("nan")), "finite"),
])
def test_bad_prefixes_are_rejected_before_sampling(prefix, message):
    with pytest.raises(ValueError, match=message):
        JacobiSampler().sample(make_flow(), torch.randn(2, 4, 2, 3, 3), prefix=prefix)


def test_latents_that_are_not_tensors_are_refused_by_name():
    flow, z = make_flow(), torch.randn(1, 3, 2, 3, 3)
    with pytest.raises(TypeError, match=r"z must be a torch.Tensor of latent frames \(B, T, h, w, c\), got ndarray"):
        JacobiSampler().sample(flow, z.numpy())
    with pytest.raises(TypeError, match="prefix must be a torch.Tensor .*, got list"):
        JacobiSampler().sample(flow, z, prefix=[[0.0]])


def test_a_text_conditioned_flow_needs_text_states():
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), text_width=16)
    with pytest.raises(ValueError, match="this flow is text-conditioned: pass the caption's text states"):
        JacobiSampler().sample(flow, torch.randn(1, 2, 2, 3, 3))


def test_task_captions_carry_the_task_prefix():
    assert task_caption("t2v", "a red circle moves left") == "a red circle moves left"
    assert task_caption("i2v", "a red circle moves left") == "a red circle moves left"
    assert task_caption("extend", "a red circle moves left") == "(extend) a red circle moves left"
    assert task_caption("v2v", "a cat") == "(v2v) a cat"
    assert task_caption("extend", "") == "(extend) "  # guidance drops the caption, not the task
    with pytest.raises(ValueError, match="unknown task"):
        task_caption("t2i", "a cat")


def test_task_inputs_build_prefix_noise_and_captions():
    source = torch.randn(2, 3, 2, 3, 3)
    for task in TASKS:
        given = None if task == "t2v" else source[:, :1] if task == "i2v" else source
        inputs = task_inputs(task, ["a", "b"], 6, (2, 3, 3), seed=0, source=given)
        assert inputs.z.shape == (2, 6, 2, 3, 3)
        assert inputs.captions == [task_caption(task, "a"), task_caption(task, "b")]
        assert inputs.uncond_caption == task_caption(task, "")
        assert (inputs.prefix is None) == (task == "t2v")
        if given is not None:
            assert torch.equal(inputs.prefix, given)  # no augmentation noise asked for
    noisy = task_inputs("extend", ["a", "b"], 6, (2, 3, 3), seed=0, source=source, noise_std=0.1)
    assert 0.05 < (noisy.prefix - source).std().item() < 0.2


@pytest.mark.parametrize("task, source, frames, message", [
    ("t2v", torch.zeros(2, 1, 2, 3, 3), 4, "no source"),
    ("i2v", None, 4, "needs source"),
    ("i2v", torch.zeros(2, 2, 2, 3, 3), 4, "one image"),
    ("extend", torch.zeros(2, 4, 2, 3, 3), 4, "nothing to sample"),
    ("v2v", torch.zeros(2, 2, 3, 3, 3), 4, "source latent frames of shape"),
    ("i2i", None, 4, "unknown task"),
])
def test_bad_task_inputs_are_rejected(task, source, frames, message):
    with pytest.raises(ValueError, match=message):
        task_inputs(task, ["a", "b"], frames, (2, 3, 3), seed=0, source=source)


def test_seeds_that_torch_would_fold_onto_others_are_refused():
    from flowvid.sampling.tasks import SEED_LIMIT, check_seed, initial_noise

    # Why: torch's generator keeps the low 32 bits, so seed s + 2**32 draws the noise of seed s.
    assert torch.equal(initial_noise((4,), 7), initial_noise((4,), 7 + SEED_LIMIT))
    check_seed(0)
    check_seed(SEED_LIMIT - 3, count=3)  # seeds up to 2**32 - 1
    for seed, count in ((-1, 1), (SEED_LIMIT, 1), (SEED_LIMIT - 2, 3)):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to"):
            check_seed(seed, count)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4,294,967,295 .* got -1"):
        task_inputs("t2v", ["a"], 4, (2, 3, 3), seed=-1)


def test_seeds_make_samples_reproducible():
    flow = make_flow()
    sampler = JacobiSampler()

    def sample(seed):
        return sampler.sample(flow, initial_noise((1, 3, 2, 3, 3), seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.allclose(sample(7), sample(8))


class EchoEncoder:
    """Captions to one-token embeddings holding the caption's length."""

    def encode(self, captions):
        tokens = torch.tensor([[float(len(c))] * 8 for c in captions])[:, None, :]
        return TextEmbedding(tokens, torch.tensor([[bool(c)] for c in captions]))


def test_encode_text_adds_the_empty_caption_for_guidance():
    plain = encode_text(EchoEncoder(), ["ab", "abc"])
    assert isinstance(plain, TextEmbedding) and plain.tokens[:, 0, 0].tolist() == [2.0, 3.0]
    guided = encode_text(EchoEncoder(), ["ab", "abc"], guidance=2.0)
    assert isinstance(guided, GuidedText) and guided.uncond.tokens.shape[0] == 1
    assert not guided.uncond.mask.any()
    extend = encode_text(EchoEncoder(), ["(extend) ab"], guidance=2.0, uncond_caption="(extend) ")
    assert extend.uncond.tokens[0, 0, 0].item() == len("(extend) ")
    assert encode_text(None, ["ab"]) is None
    with pytest.raises(ValueError, match="needs a text encoder"):
        encode_text(None, ["ab"], guidance=2.0)


def test_a_task_runs_end_to_end_with_guidance():
    flow = make_flow(text_width=8)
    source = torch.randn(2, 2, 2, 3, 3)
    inputs = task_inputs("extend", ["ab", "abc"], 4, (2, 3, 3), seed=0, source=source)
    sampler = JacobiSampler(tol=1e-4)
    x = sample_task(flow, sampler, inputs, EchoEncoder(), guidance=2.0)
    assert x.shape == (2, 4, 2, 3, 3) and torch.equal(x[:, :2], source)
    assert sampler.last_stats["deep"]["block_frames"][0] == 2
    with pytest.raises(ValueError, match="needs a text encoder"):
        sample_task(flow, sampler, inputs, None, guidance=2.0)
