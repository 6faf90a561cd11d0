"""The built-in samplers, and a sampler written against the bare contract, pass the conformance kit."""

import pytest
import torch

from flowvid.sampling import GuidedText, JacobiSampler, Sampler, SequentialSampler, WindowedSampler
from flowvid.testing import SamplerConformance
from flowvid.text.base import TextEmbedding


class TestSequentialSampler(SamplerConformance):
    sampler_class = SequentialSampler
    tolerance = 1e-5


class TestJacobiSampler(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "first_block_size": 4}
    tolerance = 1e-4


class TestJacobiSamplerWithoutWarmStart(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "block_size": 12, "warm_start": "noise"}
    tolerance = 1e-4


class TestJacobiSamplerWithValueWarmStart(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "first_block_size": 3, "warm_start": "values"}
    tolerance = 1e-4


class TestWindowedSamplerWithinOneWindow(SamplerConformance):
    sampler_class = WindowedSampler
    sampler_kwargs = {"sampler": {"name": "jacobi", "init_args": {"tol": 1e-5}}, "window": 8, "context": 2}
    tolerance = 1e-4


class WholeVideoSampler(Sampler):
    """A plugin written against the bare contract: only ``sample``; ``stream`` is the fallback."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return SequentialSampler().sample(flow, z, text, guidance, prefix)


class TestBareContractSampler(SamplerConformance):
    sampler_class = WholeVideoSampler
    tolerance = 1e-5


class OverwritesTheNoise(Sampler):
    """A slip the kit must name: the sample is written into the caller's noise tensor."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return z.copy_(SequentialSampler().sample(flow, z, text, guidance, prefix))


class InverseOfThePrefix(Sampler):
    """A slip the kit must name: the prefix comes back as a number close to it, not as given."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        x = SequentialSampler().sample(flow, z, text, guidance, prefix)
        return x if prefix is None else torch.cat([x[:, :prefix.shape[1]] * (1 + 1e-6), x[:, prefix.shape[1]:]], 1)


class Approximate(Sampler):
    """A slip the kit must name: samples further from the exact inverse than the sampler promises."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return SequentialSampler().sample(flow, z, text, guidance, prefix) * 1.01


class WithItsOwnEmptyText(Sampler):
    """A slip the kit must name: guides with a text of its own for "no caption", not the one it is given."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        if isinstance(text, GuidedText):
            nothing = TextEmbedding(torch.zeros(1, 1, flow.text_width), torch.zeros(1, 1, dtype=torch.bool))
            text = GuidedText(text.cond, nothing)
        return SequentialSampler().sample(flow, z, text, guidance, prefix)


class StreamsUnguided(SequentialSampler):
    """A slip the kit must name: its frame-by-frame path leaves the guidance out."""

    def stream(self, flow, z, text=None, guidance=0.0, prefix=None):
        yield from super().stream(flow, z, text.cond if isinstance(text, GuidedText) else text, 0.0, prefix)


class GuidesWithoutThePrefix(Sampler):
    """A slip the kit must name: a guided continuation that never saw the prefix, which it only pastes in."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        if guidance > 0 and prefix is not None:
            x = SequentialSampler().sample(flow, z, text, guidance)
            return torch.cat([prefix, x[:, prefix.shape[1]:]], dim=1)
        return SequentialSampler().sample(flow, z, text, guidance, prefix)


class KeepsItsFirstCaption(SequentialSampler):
    """A slip the kit must name: the text states of its first call are kept for every later one."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        self.first_text = getattr(self, "first_text", None) or text
        return super().sample(flow, z, self.first_text, guidance, prefix)


class CastsTheFlow(Sampler):
    """A slip the kit must name: ``flow.to(dtype)`` casts the caller's module in place."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return SequentialSampler().sample(flow.to(torch.float64), z, text, guidance, prefix).float()


def kit_for(sampler_class) -> SamplerConformance:
    return type("Kit", (SamplerConformance,), {"sampler_class": sampler_class, "tolerance": 1e-5})()


@pytest.mark.parametrize("sampler_class, check, message", [
    (OverwritesTheNoise, lambda kit: kit.test_the_callers_inputs_are_left_as_given(0.0, 0),
     r"OverwritesTheNoise.sample changed the caller's noise z in place; work on a copy \(e.g. z.clone\(\)\)"),
    (InverseOfThePrefix, lambda kit: kit.test_prefix_is_reproduced_exactly_and_continued(0.0),
     "the sample's first frames are not the prefix as given"),
    (Approximate, lambda kit: kit.test_agrees_with_sequential_sampler(2.0),
     r"differs from SequentialSampler's at guidance 2.0: relative L2 error 0.01 exceeds the tolerance 1e-05"),
    (WithItsOwnEmptyText, lambda kit: kit.test_agrees_with_sequential_sampler(2.0),
     "the sample differs from SequentialSampler's at guidance 2.0"),
    (StreamsUnguided, lambda kit: kit.test_stream_yields_the_sampled_frames_in_order(2.0),
     "the streamed frames differ from sample's at guidance 2.0"),
    (GuidesWithoutThePrefix, lambda kit: kit.test_prefix_is_reproduced_exactly_and_continued(2.0),
     "the continuation of a prefix differs from SequentialSampler's at guidance 2.0"),
    (KeepsItsFirstCaption, lambda kit: kit.test_same_inputs_give_the_same_sample(),
     "a sampler that had sampled other noise and text gave another sample than a fresh one"),
    (CastsTheFlow, lambda kit: kit.test_the_callers_inputs_are_left_as_given(0.0, 0),
     r"CastsTheFlow.sample changed the caller's flow \(shallow.0.sos"),
])
def test_the_kit_says_what_a_failing_sampler_did_wrong(sampler_class, check, message):
    with pytest.raises(AssertionError, match=message):
        check(kit_for(sampler_class))
