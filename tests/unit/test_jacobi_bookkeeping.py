"""JacobiSampler's bookkeeping: what it commits, where a block ends, what a slot's first guess is.

These change the samples only on a model far enough from the identity that videos settle at
different rates, or only the passes spent, so each is pinned by its own property.
"""

import pytest
import torch

from flowvid.sampling import JacobiSampler
from flowvid.sampling.inversion import BlockInversion
from flowvid.sampling.jacobi import JacobiStats

from test_sampling_jacobi import make_flow, relative_error  # noqa: E402


def test_a_video_sampled_in_a_batch_is_the_video_sampled_alone_when_videos_settle_apart():
    """Far from the identity, videos of noise of different scales settle different numbers of slots per
    pass: the passes may only start after the slots final for every video still moving."""
    flow = make_flow(std=0.2)
    scales = torch.tensor([1.0, 3.0, 0.3])[:, None, None, None, None]
    z = torch.randn(3, 3, 4, 4, 3, generator=torch.Generator().manual_seed(0)) * scales
    sampler = JacobiSampler(tol=1e-2)
    batch = sampler.sample(flow, z)
    deep = sampler.last_stats["deep"]
    assert any(s < i for s, i in zip(deep["sample_iterations"], deep["iterations"]))  # videos did stop apart
    for video in range(3):
        alone = sampler.sample(flow, z[video:video + 1])
        # Rounding in batch-size-dependent kernels leaves about 1e-5; passes that skip slots not yet
        # final for one of the videos leave up to about tol.
        assert relative_error(batch[video:video + 1], alone) < 1e-4


def solved_frames(flow, frames: int, sampler: JacobiSampler) -> BlockInversion:
    """The deep block's inversion of a three-frame video with its first ``frames`` frames solved."""
    per_frame = flow.tokens_per_frame
    z = torch.randn(2, 3 * per_frame, 3, generator=torch.Generator().manual_seed(1))
    inversion = BlockInversion(flow.deep, z)
    sampler.call = sampler.new_call()
    stats = JacobiStats(per_frame)
    while inversion.done < frames * per_frame:
        sampler._solve(inversion, sampler._next_size(inversion, per_frame), stats)
    return inversion


@pytest.mark.parametrize("frame", [1, 2])
@torch.no_grad()
def test_the_affine_warm_start_of_a_frame_is_the_frame_befores_parameters_on_its_own_noise(frame):
    """Every slot of a later frame starts from (mu, sigma) of the same position one frame earlier, the
    second frame included; its first guess is that affine map applied to the slot's own noise."""
    flow = make_flow(std=0.2)
    per_frame = flow.tokens_per_frame
    sampler = JacobiSampler(tol=1e-4)
    inversion = solved_frames(flow, frame, sampler)
    sampler._guess(inversion, per_frame)
    this, before = slice(frame * per_frame, (frame + 1) * per_frame), slice((frame - 1) * per_frame, frame * per_frame)
    torch.testing.assert_close(inversion.mu[:, this], inversion.mu[:, before], rtol=0, atol=0)
    torch.testing.assert_close(inversion.sigma[:, this], inversion.sigma[:, before], rtol=0, atol=0)
    guess = inversion.mu[:, this] + inversion.sigma[:, this] * inversion.z[:, this]
    torch.testing.assert_close(inversion.x[:, this], guess)


@torch.no_grad()
def test_in_the_first_frame_the_affine_warm_start_is_the_row_before():
    """No earlier frame: a slot borrows (mu, sigma) from one row (frame width) earlier."""
    flow = make_flow(std=0.2)
    width = flow.deep.spec.frame_size[1]
    sampler = JacobiSampler(tol=1e-4, first_block_size=8)
    inversion = solved_frames(flow, 0, sampler)
    sampler._solve(inversion, 8, JacobiStats(flow.tokens_per_frame))
    sampler._guess(inversion, 8)
    torch.testing.assert_close(inversion.mu[:, 8:16], inversion.mu[:, 8 - width:16 - width], rtol=0, atol=0)
    torch.testing.assert_close(inversion.sigma[:, 8:16], inversion.sigma[:, 8 - width:16 - width], rtol=0, atol=0)


@pytest.mark.parametrize("first_block_size, sizes, frames", [
    (None, [4, 4, 4], [0, 1, 2]),  # the CPU's 16 slots are more than a frame
    (3, [3, 1, 4, 4], [0, 0, 1, 2]),
])
def test_first_frame_blocks_end_at_the_end_of_the_first_frame(first_block_size, sizes, frames):
    """A first-frame block never runs into the second frame, which is warm-started from the first."""
    flow = make_flow(frame_size=(2, 2))
    sampler = JacobiSampler(first_block_size=first_block_size)
    sampler.sample(flow, torch.randn(1, 3, 2, 2, 3, generator=torch.Generator().manual_seed(0)))
    deep = sampler.last_stats["deep"]
    assert deep["block_sizes"] == sizes and deep["block_frames"] == frames
