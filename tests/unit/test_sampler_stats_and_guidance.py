"""Every sampler keeps statistics of its last call, a plugin's own too; a bool is refused as a guidance weight."""

import json

import pytest
import torch

from flowvid.sampling import GuidedText, JacobiSampler, Sampler, SequentialSampler
from flowvid.testing import SamplerConformance
from flowvid.testing.sampler_conformance import SamplerConformance as Kit


class CountingSampler(Sampler):
    """A plugin written as the docs say: it keeps its statistics by assigning ``last_stats``."""

    def __init__(self, tol: float = 1e-5):
        self.tol = tol
        self.last_stats = {}
        self.calls = 0

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        self.calls += 1
        self.last_stats = {"calls": self.calls, "frames": int(z.shape[1])}
        return JacobiSampler(tol=self.tol).sample(flow, z, text, guidance, prefix)


class TestCountingSampler(SamplerConformance):
    sampler_class = CountingSampler
    sampler_kwargs = {"tol": 1e-5}
    tolerance = 1e-4


def request(batch: int = 2, frames: int = 4):
    kit = Kit()
    kit.frames = frames
    return kit.make_flow(), kit.make_noise(batch), kit.make_text(batch)


def test_a_plugin_sampler_sets_its_own_last_stats():
    flow, z, text = request()
    sampler = CountingSampler()
    assert sampler.last_stats == {}
    sampler.sample(flow, z, text.cond)
    assert sampler.last_stats == {"calls": 1, "frames": 4}


def test_a_sampler_that_keeps_none_has_empty_stats():
    class Plain(Sampler):
        def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
            return SequentialSampler().sample(flow, z, text, guidance, prefix)

    assert Plain().last_stats == {}


def test_sequential_sampler_counts_its_frames_and_passes():
    flow, z, text = request(frames=4)
    sampler = SequentialSampler()
    assert sampler.last_stats == {}
    prefix = z[:, :1].clone()
    sampler.sample(flow, z, text.cond, prefix=prefix)
    stats = sampler.last_stats
    per_frame = flow.tokens_per_frame
    assert stats["frames"] == 3  # the prefix frame is given, not sampled
    assert stats["deep_passes"] == 3 * per_frame  # one token per pass
    # Shallow blocks take that token of every frame in one pass.
    assert stats["shallow_passes"] == {str(index): per_frame for index in range(len(flow.shallow))}
    assert json.loads(json.dumps(stats)) == stats


def test_sequential_stream_counts_as_sample_does():
    flow, z, text = request(frames=3)
    sampler = SequentialSampler()
    sampler.sample(flow, z, text.cond)
    sampled = sampler.last_stats
    list(sampler.stream(flow, z, text.cond))
    streamed = sampler.last_stats
    assert streamed["frames"] == sampled["frames"] == 3 and streamed["deep_passes"] == sampled["deep_passes"]
    # Streamed frames reach the shallow blocks one at a time.
    assert streamed["shallow_passes"] == {key: 3 * value for key, value in sampled["shallow_passes"].items()}


@pytest.mark.parametrize("sampler", [SequentialSampler(), JacobiSampler()])
def test_guidance_true_is_refused_as_the_pipeline_refuses_it(sampler):
    flow, z, text = request()
    with pytest.raises(ValueError, match=r"guidance must be a finite number >= 0, got True \(a bool\)"):
        sampler.sample(flow, z, GuidedText(text.cond, text.uncond), guidance=True)
    with pytest.raises(ValueError, match="got False"):
        sampler.sample(flow, z, text.cond, guidance=False)
    assert torch.isfinite(sampler.sample(flow, z, GuidedText(text.cond, text.uncond), guidance=1)).all()


class CappedJacobi(JacobiSampler):
    """A plugin that extends a built-in as docs/plugins.md shows: its own setting, the rest passed on."""

    def __init__(self, max_iterations: int = 8, **settings):
        super().__init__(max_iterations=max_iterations, **settings)
        self.calls = 0

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        x = super().sample(flow, z, text, guidance, prefix)
        self.calls += 1
        self.last_stats = {**self.call_stats(), "calls": self.calls}
        return x


def test_a_subclass_of_a_built_in_assigns_its_stats_and_keeps_the_built_ins():
    flow, z, text = request(frames=2)
    sampler = CappedJacobi(tol=1e-4)
    sampler.sample(flow, z, text.cond)
    assert sampler.last_stats["calls"] == 1 and sampler.last_stats["deep"]["passes"] >= 1


def test_a_subclass_of_a_built_in_shows_and_checks_the_settings_it_passes_on():
    from flowvid.registry import check_arguments

    sampler = CappedJacobi(tol=1e-3, block_size=4)
    assert repr(sampler).startswith("CappedJacobi(max_iterations=8, tol=0.001, block_size=4, ")
    check_arguments("sampler", CappedJacobi, {"tol": 1e-3, "max_iterations": 2}, "--sampler-args")
    with pytest.raises(ValueError, match=r"takes no argument 'max_iter' \(in --sampler-args\); its arguments are: "
                                         r"max_iterations, tol, block_size"):
        check_arguments("sampler", CappedJacobi, {"max_iter": 4}, "--sampler-args")
