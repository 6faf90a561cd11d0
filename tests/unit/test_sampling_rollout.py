"""Long videos: the sliding window re-encodes its context and keeps the first window a plain sample."""

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import JacobiSampler, SequentialSampler, WindowedSampler, windows
from flowvid.testing import perturb_parameters


def make_flow():
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3))
    perturb_parameters(flow, std=0.05)
    return flow.eval()


def test_windows_overlap_by_the_context():
    assert windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert windows(9, 4, 1) == [(0, 4), (3, 7), (6, 9)]
    assert windows(3, 4, 2) == [(0, 3)]
    assert windows(8, 4, 0) == [(0, 4), (4, 8)]


def test_a_prefix_that_fills_the_window_is_continued_from_its_last_context_frames():
    assert windows(10, 4, 2, given=3) == [(0, 4), (2, 6), (4, 8), (6, 10)]  # fits: all in the first window
    assert windows(10, 4, 2, given=4) == [(2, 6), (4, 8), (6, 10)]
    assert windows(10, 4, 1, given=6) == [(5, 9), (8, 10)]


@pytest.mark.parametrize("inner", [SequentialSampler(), JacobiSampler(tol=1e-3)], ids=["sequential", "jacobi"])
def test_rollout_has_the_requested_length_and_its_first_window_is_a_plain_sample(inner):
    flow = make_flow()
    z = torch.randn(2, 7, 2, 3, 3)
    x = WindowedSampler(inner, window=3, context=1).sample(flow, z)
    assert x.shape == z.shape and torch.isfinite(x).all()
    assert torch.equal(x[:, :3], inner.sample(flow, z[:, :3]))


def test_each_window_continues_from_its_re_encoded_context():
    flow = make_flow()
    z = torch.randn(1, 6, 2, 3, 3)
    inner = SequentialSampler()
    x = WindowedSampler(inner, window=4, context=2).sample(flow, z)
    second = inner.sample(flow, z[:, 2:6], prefix=x[:, 2:4])
    assert torch.equal(x[:, 4:], second[:, 2:])
    assert not torch.allclose(x[:, 4:], inner.sample(flow, z)[:, 4:])  # a window, not the whole video in view


def test_rollout_keeps_a_given_prefix_and_streams_the_same_frames():
    flow = make_flow()
    z = torch.randn(1, 6, 2, 3, 3)
    prefix = torch.randn(1, 1, 2, 3, 3)
    sampler = WindowedSampler("sequential", window=3, context=1)
    x = sampler.sample(flow, z, prefix=prefix)
    assert torch.equal(x[:, :1], prefix)
    frames = list(sampler.stream(flow, z, prefix=prefix))
    assert len(frames) == 5
    torch.testing.assert_close(torch.stack(frames, dim=1), x[:, 1:])
    assert len(sampler.last_stats["windows"]) == len(windows(6, 3, 1))


@pytest.mark.parametrize("context", [0, 1, 2])
def test_streaming_a_long_video_gives_the_frames_of_sample(context):
    flow = make_flow()
    z = torch.randn(2, 8, 2, 3, 3)
    sampler = WindowedSampler("sequential", window=3, context=context)
    frames = list(sampler.stream(flow, z))
    assert len(frames) == 8
    torch.testing.assert_close(torch.stack(frames, dim=1), sampler.sample(flow, z))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 0}, "window"), ({"window": 4, "context": 4}, "context"), ({"window": 4, "context": -1}, "context"),
])
def test_bad_window_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowedSampler("sequential", **kwargs)


@pytest.mark.parametrize("args, message", [
    ((10, 3, 3), "context"), ((10, 0, 0), "window"), ((10, 3, -1), "context"), ((5, 3, 1, 9), "given"),
    ((0, 3, 1), "frames"),
])
def test_windows_refuse_spans_that_would_never_end_or_skip_frames(args, message):
    with pytest.raises(ValueError, match=message):
        windows(*args)


@pytest.mark.parametrize("given", [3, 5], ids=["as-long-as-the-window", "longer"])
def test_a_prefix_that_fills_the_window_is_extended_to_the_requested_length(given):
    flow = make_flow()
    z = torch.randn(1, 8, 2, 3, 3)
    prefix = torch.randn(1, given, 2, 3, 3)
    inner = SequentialSampler()
    sampler = WindowedSampler(inner, window=3, context=1)
    x = sampler.sample(flow, z, prefix=prefix)
    assert x.shape == z.shape and torch.isfinite(x).all()
    assert torch.equal(x[:, :given], prefix)  # the whole prefix, exactly as given
    # The first sampled frames see only the last context frame of the prefix, as a later window would.
    first = inner.sample(flow, z[:, given - 1:given + 2], prefix=prefix[:, -1:])
    assert torch.equal(x[:, given:given + 2], first[:, 1:])
    torch.testing.assert_close(torch.stack(list(sampler.stream(flow, z, prefix=prefix)), dim=1), x[:, given:])


def test_a_prefix_must_leave_frames_to_sample_and_hold_at_least_one():
    sampler = WindowedSampler("sequential", window=3, context=1)
    with pytest.raises(ValueError, match="leaves nothing to sample"):
        sampler.sample(make_flow(), torch.randn(1, 8, 2, 3, 3), prefix=torch.randn(1, 8, 2, 3, 3))
    with pytest.raises(ValueError, match="a prefix of 0 frames is no prefix"):
        sampler.sample(make_flow(), torch.randn(1, 8, 2, 3, 3), prefix=torch.randn(1, 0, 2, 3, 3))


class LosesTheSecondVideo(SequentialSampler):
    """The first window's second video comes out NaN, as too strong a guidance can make it."""

    def __init__(self):
        self.calls = 0

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        x = super().sample(flow, z, text, guidance, prefix)
        self.calls += 1
        return torch.cat([x[:1], torch.full_like(x[1:], float("nan"))]) if self.calls == 1 else x

    def stream(self, flow, z, text=None, guidance=0.0, prefix=None):
        yield from self.sample(flow, z, text, guidance, prefix)[:, 0 if prefix is None else prefix.shape[1]:].unbind(1)


@pytest.mark.parametrize("streamed", [False, True], ids=["sample", "stream"])
def test_a_video_lost_in_one_window_stays_lost_and_the_others_go_on(streamed):
    flow, z = make_flow(), torch.randn(2, 5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    rollout = WindowedSampler(LosesTheSecondVideo(), window=3, context=1)
    x = torch.stack(list(rollout.stream(flow, z)), 1) if streamed else rollout.sample(flow, z)
    alone = WindowedSampler(SequentialSampler(), window=3, context=1).sample(flow, z[:1])
    assert x.shape == z.shape and torch.isnan(x[1]).all()
    torch.testing.assert_close(x[:1], alone)


def test_interleaved_calls_each_keep_their_own_window_statistics():
    flow = make_flow()
    sampler = WindowedSampler("sequential", window=3, context=1)
    short, long = torch.randn(1, 5, 2, 3, 3), torch.randn(1, 9, 2, 3, 3)
    stream = sampler.stream(flow, long)
    next(stream)
    sampler.sample(flow, short)
    kept = sampler.last_stats
    assert len(kept["windows"]) == len(windows(5, 3, 1))
    list(stream)
    assert len(sampler.last_stats["windows"]) == len(windows(9, 3, 1))
    assert len(kept["windows"]) == len(windows(5, 3, 1))  # what was handed out does not change


def test_a_prefix_of_another_float_type_comes_back_as_float32_like_every_sample():
    flow = make_flow()
    z = torch.randn(1, 5, 2, 3, 3)
    prefix = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    x = WindowedSampler("sequential", window=3, context=1).sample(flow, z, prefix=prefix)
    assert x.dtype == torch.float32 and torch.equal(x[:, :2], prefix.float())


def test_a_stream_taken_frame_by_frame_has_the_statistics_of_every_window_it_gave():
    flow = make_flow()
    z = torch.randn(1, 7, 2, 3, 3)
    sampler = WindowedSampler(JacobiSampler(tol=1e-3), window=3, context=1)
    stream = sampler.stream(flow, z)
    frames = [next(stream) for _ in range(7)]  # exactly the frames asked for: the stream is not run to its end
    assert len(frames) == 7
    assert len(sampler.last_stats["windows"]) == len(windows(7, 3, 1))
    assert sampler.last_stats["windows"][-1] == sampler.sampler.last_stats
