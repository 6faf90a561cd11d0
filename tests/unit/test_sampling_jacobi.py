"""JacobiSampler: tolerance-driven agreement with the exact sampler, warm starts, statistics, settings."""

import warnings

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import JacobiSampler, SequentialSampler
from flowvid.sampling.inversion import BlockInversion
from flowvid.sampling.jacobi import JacobiStats
from flowvid.testing import perturb_parameters


def make_flow(frame_size=(4, 4), std=0.05):
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=frame_size)
    perturb_parameters(flow, std=std)
    return flow.eval()


def relative_error(x, reference):
    return ((x - reference).norm() / reference.norm()).item()


def test_error_to_the_exact_inverse_follows_the_tolerance():
    flow = make_flow()
    z = torch.randn(2, 3, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    reference = SequentialSampler().sample(flow, z)
    errors = {}
    for tol in (1e-1, 1e-2, 1e-3, 1e-4):
        errors[tol] = relative_error(JacobiSampler(tol=tol).sample(flow, z), reference)
        assert errors[tol] <= tol
    assert errors[1e-1] > 10 * errors[1e-4]  # the tolerance, not exactness after N passes, stops the loop
    assert errors[1e-1] > errors[1e-2] > errors[1e-3]


def test_statistics_describe_every_block_of_the_last_call():
    flow = make_flow()
    z = torch.randn(2, 3, 4, 4, 3)
    sampler = JacobiSampler(first_block_size=8)
    sampler.sample(flow, z)
    deep = sampler.last_stats["deep"]
    assert deep["block_sizes"] == [8, 8, 16, 16] and deep["block_frames"] == [0, 0, 1, 2]
    assert set(deep["iterations_per_frame"]) == {"0", "1", "2"}
    assert sum(deep["iterations_per_frame"].values()) == sum(deep["iterations"])
    assert all(1 <= i <= 32 for i in deep["iterations"]) and deep["passes"] >= 1
    assert set(sampler.last_stats["shallow"]) == {"0", "1"}
    assert sum(sampler.last_stats["shallow"]["0"]["block_sizes"]) == 16  # one frame, all frames at once

    sampler.sample(flow, z, prefix=torch.randn(2, 2, 4, 4, 3))
    assert sampler.last_stats["deep"]["block_frames"] == [2]  # the new call's blocks only


def test_a_video_sampled_in_a_batch_is_the_video_sampled_alone():
    flow = make_flow()
    # Noise of different scales takes different numbers of passes to converge.
    z = torch.randn(3, 3, 4, 4, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0, 0.3])[:, None,
                                                                                                        None, None, None]
    sampler = JacobiSampler(tol=1e-2)
    batch = sampler.sample(flow, z)
    deep = sampler.last_stats["deep"]
    assert any(s < i for s, i in zip(deep["sample_iterations"], deep["iterations"]))  # videos did stop apart
    assert all(s <= i for s, i in zip(deep["sample_iterations"], deep["iterations"]))
    for video in range(3):
        torch.testing.assert_close(batch[video:video + 1], sampler.sample(flow, z[video:video + 1]),
                                   rtol=1e-5, atol=1e-5)


def test_work_counts_only_the_videos_still_iterating():
    flow = make_flow()
    z = torch.randn(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.3, 3.0])[:, None, None,
                                                                                                      None, None]
    sampler = JacobiSampler(tol=1e-2)
    passes_alone = []
    for video in range(2):
        sampler.sample(flow, z[video:video + 1])
        passes_alone.append(sampler.last_stats["deep"]["passes"])
    sampler.sample(flow, z)
    assert sampler.last_stats["deep"]["passes"] == pytest.approx(sum(passes_alone) / 2, abs=1e-4)  # 4 digits each


def solve_first_block(flow, z, guess=None, tol=1e-4):
    """One Jacobi block of 16 slots of the deep block: the inversion and its statistics."""
    sampler = JacobiSampler(tol=tol, warm_start="noise")
    sampler.call = sampler.new_call()
    inversion = BlockInversion(flow.deep, z)
    if guess is not None:
        inversion.x[:, :len(guess[0])] = guess
    stats = JacobiStats(tokens_per_frame=16)
    sampler._solve(inversion, 16, stats, guessed=True)
    return inversion, stats


def test_each_pass_commits_its_exact_first_slot_and_the_next_starts_after_it():
    flow = make_flow(std=0.1)
    z = torch.randn(1, 32, 3, generator=torch.Generator().manual_seed(0))
    inversion, stats = solve_first_block(flow, z)
    passes = stats.iterations[0]
    assert 2 < passes < 16  # converged on the tolerance, before every slot was exact by count alone
    assert stats.slot_evaluations == [sum(16 - k for k in range(passes))]  # each pass one slot shorter

    whole = BlockInversion(flow.deep, z)
    for _ in range(passes):  # the same passes, each over the whole block
        whole.x[:, :16] = whole.propose(16)
    torch.testing.assert_close(inversion.x[:, :16], whole.x[:, :16], rtol=1e-5, atol=1e-6)


def test_slots_after_a_run_the_pass_barely_moved_are_final():
    flow = make_flow(std=0.1)
    x = torch.randn(1, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, _ = flow.deep(x)
    exact = flow.deep.permutation.forward(x)[:, :16]
    inversion, stats = solve_first_block(flow, z, guess=exact[:, :10])  # the first ten slots already right
    # The first pass moves none of them, so it makes eleven slots final; later passes cover the other five.
    assert stats.slot_evaluations[0] <= 16 + 5 * (stats.iterations[0] - 1)
    assert relative_error(inversion.x[:, :16], exact) < 1e-3


def test_blocks_still_moving_at_max_iterations_are_counted():
    flow = make_flow(std=0.1)
    z = torch.randn(1, 2, 4, 4, 3)
    sampler = JacobiSampler(tol=1e-6, max_iterations=1, warm_start="noise")
    with pytest.warns(UserWarning, match="raise max_iterations or tol") as caught:
        x = sampler.sample(flow, z)
    assert len(caught) == 1  # once per call, not once per block
    assert torch.isfinite(x).all()
    assert sampler.last_stats["deep"]["unconverged_blocks"] > 0
    assert sampler.last_stats["deep"]["iterations"] == [1] * len(sampler.last_stats["deep"]["iterations"])


@pytest.mark.parametrize("warm_start", ["values", "affine"])
def test_warm_start_from_the_previous_frame_saves_passes_on_a_still_video(warm_start):
    flow = make_flow(std=0.03)
    still = torch.randn(1, 1, 4, 4, 3).expand(1, 4, 4, 4, 3).contiguous()
    with torch.no_grad():
        z, _ = flow(still)

    def later_iterations(sampler):
        x = sampler.sample(flow, z)
        assert relative_error(x, still) < 1e-2
        deep = sampler.last_stats["deep"]
        return [i for i, f in zip(deep["iterations"], deep["block_frames"]) if f > 0]

    warm = later_iterations(JacobiSampler(tol=1e-3, warm_start=warm_start))
    cold = later_iterations(JacobiSampler(tol=1e-3, warm_start="noise"))
    assert sum(warm) < sum(cold)
    if warm_start == "values":  # every later frame repeats the first: the guess is already the answer
        assert warm == [1, 1, 1]


def test_network_in_bf16_keeps_the_sampling_math_in_fp32():
    flow = make_flow()
    z = torch.randn(2, 2, 4, 4, 3)
    reference = SequentialSampler().sample(flow, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = JacobiSampler(tol=1e-3).sample(flow, z)
    assert x.dtype == torch.float32
    assert relative_error(x, reference) < 3e-2
    # The affine updates ran in fp32: samples rounded to bf16 anywhere would all lie on bf16's grid.
    assert (x.bfloat16().float() != x).float().mean() > 0.9


def test_first_blocks_are_one_frame_on_a_gpu_and_16_slots_on_a_cpu_unless_set():
    per_frame = 256
    assert JacobiSampler().first_block_size_on(torch.device("cpu"), per_frame) == 16
    assert JacobiSampler().first_block_size_on(torch.device("cuda"), per_frame) == per_frame
    assert JacobiSampler(first_block_size=4).first_block_size_on(torch.device("cuda"), per_frame) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"tol": 0.0}, "tol"), ({"tol": -1e-3}, "tol"), ({"tol": float("inf")}, "tol"), ({"tol": 1.0}, "tol"),
    ({"tol": float("nan")}, "tol"), ({"tol": "1e-3"}, r"tol must be a number in \(0, 1\).*'1e-3'"),
    ({"block_size": 0}, "block_size"), ({"first_block_size": -4}, "first_block_size"),
    ({"block_size": 2.5}, "block_size"), ({"max_iterations": 0}, "max_iterations"),
    ({"first_block_size": "16"}, "first_block_size"), ({"max_iterations": None}, "max_iterations"),
    ({"block_size": True}, "block_size"),
    ({"warm_start": "previous"}, "warm_start"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JacobiSampler(**kwargs)


def test_unconverged_blocks_under_bf16_autocast_name_the_rounding_floor():
    flow = make_flow(std=0.1)
    z = torch.randn(1, 2, 4, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="tol >= 1e-2"):
        JacobiSampler(tol=1e-6, max_iterations=1, warm_start="noise").sample(flow, z)


def test_converged_sampling_does_not_warn():
    flow = make_flow(std=0.03)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JacobiSampler(tol=1e-3).sample(flow, torch.randn(1, 2, 4, 4, 3))


def test_streamed_frames_reach_the_shallow_blocks_guessed_from_the_frame_before():
    flow = make_flow(std=0.03)
    still = torch.randn(1, 1, 4, 4, 3).expand(2, 4, 4, 4, 3).contiguous()
    with torch.no_grad():
        z, _ = flow(still)
    reference = SequentialSampler().sample(flow, z)
    sampler = JacobiSampler(tol=1e-3, first_block_size=8, warm_start="values")
    streamed = torch.stack(list(sampler.stream(flow, z)), dim=1)
    assert relative_error(streamed, reference) < 1e-2
    shallow = sampler.last_stats["shallow"]["0"]
    # The first frame in blocks of 8 slots, cold; the others as one block each, guessed: here already right.
    assert shallow["block_sizes"] == [8, 8, 16, 16, 16]
    assert shallow["iterations"][2:] == [1, 1, 1]
    sampler.sample(flow, z)  # a whole video: every frame at once, as before
    assert sampler.last_stats["shallow"]["0"]["block_sizes"] == [8, 8]


def test_streams_interleaved_on_one_sampler_each_keep_their_own_warm_starts_and_statistics():
    flow = make_flow()
    generator = torch.Generator().manual_seed(0)
    za, zb = torch.randn(1, 4, 4, 4, 3, generator=generator), 2 * torch.randn(1, 4, 4, 4, 3, generator=generator)
    sampler = JacobiSampler(tol=1e-2)
    alone_b = torch.stack(list(sampler.stream(flow, zb)), 1)
    alone_a = torch.stack(list(sampler.stream(flow, za)), 1)
    stats_a = sampler.last_stats
    stream_a, stream_b = sampler.stream(flow, za), sampler.stream(flow, zb)
    frames_a, frames_b = [], []
    for _ in range(4):  # one frame of each in turn, as a server streaming two requests would
        frames_b.append(next(stream_b))
        frames_a.append(next(stream_a))
    assert torch.equal(torch.stack(frames_a, 1), alone_a) and torch.equal(torch.stack(frames_b, 1), alone_b)
    assert sampler.last_stats == stats_a  # the stream that ran last
