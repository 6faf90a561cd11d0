"""Every built-in and shipped plugin block passes the conformance kit."""

from dataclasses import replace

import pytest
import torch

from flowvid.flows import AffineBlock
from flowvid.flows.base import BlockSpec
from flowvid.sampling.sequential import invert_block_sequential
from flowvid.testing import FlowBlockConformance, perturb_parameters
from flowvid_plugins.blocks import GatedAffineBlock


class TestAffineBlock(FlowBlockConformance):
    block_class = AffineBlock


class TestGatedAffineBlock(FlowBlockConformance):
    block_class = GatedAffineBlock


@pytest.mark.parametrize("block_class", [AffineBlock, GatedAffineBlock])
def test_the_mlp_ratio_sets_the_hidden_width(block_class):
    from flowvid.flows.base import BlockSpec

    spec = BlockSpec(3, (2, 2), width=32, depth=1, head_dim=16)
    sizes = {ratio: sum(p.numel() for p in block_class(spec, mlp_ratio=ratio).parameters()) for ratio in (1, 2, 4)}
    assert sizes[1] < sizes[2] < sizes[4]


@pytest.mark.parametrize("frames", [1, 3])
def test_a_block_reversing_a_whole_video_is_inverted_by_its_own_passes(frames):
    """``flip`` over several frames: where a slot's token sits depends on the length of the whole video,
    which a pass over the first slots must place it in as the forward pass does."""
    torch.manual_seed(0)
    block = AffineBlock(BlockSpec(3, (2, 3), width=16, depth=2, head_dim=4, permutation="flip"))
    perturb_parameters(block, std=0.2)
    x = torch.randn(2, frames * 6, 3)
    with torch.no_grad():
        z, _ = block.eval()(x)
    torch.testing.assert_close(invert_block_sequential(block, z), x, rtol=1e-5, atol=1e-5)


# --- the kit fails blocks that break the contract ---------------------------------------------------


class BatchAveragedLogdet(AffineBlock):
    def forward(self, x, text=None):
        z, logdet = super().forward(x, text)
        return z, logdet.mean(0, keepdim=True).expand_as(logdet)


class LaterFramesLogdetDropped(AffineBlock):
    def forward(self, x, text=None):
        z, logdet = super().forward(x, text)
        return z, torch.cat([logdet[:, :self.spec.tokens_per_frame], 0 * logdet[:, self.spec.tokens_per_frame:]], 1)


class BatchMixing(AffineBlock):
    def _run(self, *args, **kwargs):
        raw = super()._run(*args, **kwargs)
        return raw + 0.5 * raw.mean(0, keepdim=True)


class ReadsThePreviousSample(AffineBlock):
    """Sample b reads sample b - 1: a batch folded into one causal sequence. Sample 0 sees nothing else."""

    def _run(self, *args, **kwargs):
        raw = super()._run(*args, **kwargs)
        return raw + 0.5 * torch.cat([torch.zeros_like(raw[:1]), raw[:-1]])


class PeeksAtTheNextToken(AffineBlock):
    def forward(self, x, text=None):
        return super().forward(x + 0.01 * torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1), text)


class FrameLocalLogdetInSlotOrder(AffineBlock):
    """A frame-local block (a flow's shallow blocks) whose log-det is left in its own slot order, not put
    back in the tokens' natural order: only the ``flip`` order, which frame-local blocks read, shows it."""

    def forward(self, x, text=None):
        z, logdet = super().forward(x, text)
        return z, self.permutation.forward(logdet) if self.spec.frame_local else logdet


class SqueezesASingleVideo(AffineBlock):
    """``squeeze()`` written for a batch: a batch of one video loses its batch axis."""

    def forward(self, x, text=None):
        z, logdet = super().forward(x, text)
        return z.squeeze(0), logdet.squeeze(0)


class StartTokenPerRow(AffineBlock):
    """A start token scaled by the video's row in the batch: a video's noise depends on where it sits."""

    def start_token(self, batch):
        return super().start_token(batch) * torch.arange(1, batch + 1).view(batch, 1, 1)


class IgnoresItsPermutation(AffineBlock):
    """Always reads tokens in natural order, consistently in its forward pass and its inverse: a flow's
    shallow blocks then all read frames the same way instead of in alternating directions."""

    def __init__(self, spec, **kwargs):
        super().__init__(replace(spec, permutation="identity"), **kwargs)


class RunningSumBlock(AffineBlock):
    """A recurrent extra term, mu_s += 0.1 * (sum of the inputs of slots <= s), whose running state
    ``affine`` updates on every call, as if each call were followed by ``cache.advance``: right for the
    exact sampler, wrong when Jacobi writes a run again (or passes over some videos, ``cache.rows``)."""

    def forward(self, x, text=None):
        z, logdet = super().forward(x, text)
        extra = 0.1 * torch.cumsum(self.shift(self.permutation.forward(x.float())), dim=1)
        sigma = self.permutation.forward(logdet).neg().exp()
        return self.permutation.inverse(self.permutation.forward(z) - extra / sigma), logdet

    def affine(self, inputs, cache):
        mu, sigma = super().affine(inputs, cache)
        running = getattr(cache, "running", torch.zeros(inputs.shape[0], inputs.shape[-1]))
        cache.running = running + 0.1 * inputs.float().sum(dim=1)  # the bug: as if this run were final
        return mu + running[:, None] + 0.1 * torch.cumsum(inputs.float(), dim=1), sigma


UNCONDITIONED = {"conditioned": False}
WHOLE_VIDEO = {**UNCONDITIONED, "permutation": "flip_within_frame", "frame_local": False}
FRAME_LOCAL = {**UNCONDITIONED, "permutation": "flip", "frame_local": True}


@pytest.mark.parametrize("wrong_block, kit_test, arguments", [
    (BatchAveragedLogdet, "test_logdet_matches_autograd_jacobian", WHOLE_VIDEO),
    (LaterFramesLogdetDropped, "test_logdet_matches_autograd_jacobian", WHOLE_VIDEO),
    (FrameLocalLogdetInSlotOrder, "test_logdet_matches_autograd_jacobian", FRAME_LOCAL),
    (SqueezesASingleVideo, "test_a_video_alone_is_mapped_as_in_its_batch", UNCONDITIONED),
    (StartTokenPerRow, "test_a_video_alone_is_mapped_as_in_its_batch", UNCONDITIONED),
    (BatchMixing, "test_samples_of_a_batch_do_not_see_each_other", UNCONDITIONED),
    (ReadsThePreviousSample, "test_samples_of_a_batch_do_not_see_each_other", UNCONDITIONED),
    (PeeksAtTheNextToken, "test_changing_a_token_leaves_earlier_slots_unchanged",
     {**UNCONDITIONED, "permutation": "identity", "frame_local": False}),
    (IgnoresItsPermutation, "test_changing_a_token_leaves_earlier_slots_unchanged",
     {**UNCONDITIONED, "permutation": "flip", "frame_local": True}),
    (IgnoresItsPermutation, "test_changing_a_token_leaves_earlier_slots_unchanged",
     {**UNCONDITIONED, "permutation": "flip_within_frame", "frame_local": False}),
    (RunningSumBlock, "test_a_run_written_again_before_advance_counts_as_last_written", UNCONDITIONED),
    (RunningSumBlock, "test_a_pass_over_some_videos_writes_their_rows_only", UNCONDITIONED),
    (RunningSumBlock, "test_the_samplers_invert_a_flow_of_these_blocks", UNCONDITIONED),
])
def test_the_kit_fails_a_block_that_breaks_the_contract(wrong_block, kit_test, arguments):
    kit = type("Kit", (FlowBlockConformance,), {"block_class": wrong_block})()
    with pytest.raises(AssertionError):
        getattr(kit, kit_test)(**arguments)


@pytest.mark.parametrize("wrong_block, kit_test, arguments, message", [
    (FrameLocalLogdetInSlotOrder, "test_logdet_matches_autograd_jacobian", FRAME_LOCAL,
     "order 'flip': per-element log-det against the Jacobian"),
    (SqueezesASingleVideo, "test_a_video_alone_is_mapped_as_in_its_batch", UNCONDITIONED,
     r"a batch of one video \(1, 12, 3\) gave z \(12, 3\)"),
    (StartTokenPerRow, "test_a_video_alone_is_mapped_as_in_its_batch", {"conditioned": True},
     "video 1 alone gets another z than in its batch"),
])
def test_the_kit_names_what_the_block_breaks(wrong_block, kit_test, arguments, message):
    kit = type("Kit", (FlowBlockConformance,), {"block_class": wrong_block})()
    with pytest.raises(AssertionError, match=message):
        getattr(kit, kit_test)(**arguments)


@pytest.mark.parametrize("wrong_block, kit_test, arguments", [
    (FrameLocalLogdetInSlotOrder, "test_logdet_matches_autograd_jacobian", WHOLE_VIDEO),
    (SqueezesASingleVideo, "test_inverse_of_forward_is_identity", WHOLE_VIDEO),
    (StartTokenPerRow, "test_samples_of_a_batch_do_not_see_each_other", UNCONDITIONED),
])
def test_what_the_kit_checked_before_passes_these_blocks(wrong_block, kit_test, arguments):
    """The checks above are what catch them: the kit's other checks of the same property pass them."""
    kit = type("Kit", (FlowBlockConformance,), {"block_class": wrong_block})()
    getattr(kit, kit_test)(**arguments)


@pytest.mark.parametrize("kit_test, arguments", [
    ("test_inverse_of_forward_is_identity", WHOLE_VIDEO),
    ("test_kv_cache_steps_equal_full_forward", UNCONDITIONED),
])
def test_the_running_sum_passes_where_every_pass_is_final(kit_test, arguments):
    """So the checks above fail it for the passes that are not final, not for a mistake in its forward pass."""
    kit = type("Kit", (FlowBlockConformance,), {"block_class": RunningSumBlock})()
    getattr(kit, kit_test)(**arguments)


EXPECTED_FIRST_MLP_WEIGHTS = [-0.032836, -0.110159, 0.149697]  # torch.manual_seed(0), recorded with flowvid 0.1


def test_a_seed_gives_the_initial_weights_it_always_gave():
    """Recorded runs (the demo's numbers, the benchmarks) rebuild their models from a seed."""
    from flowvid.flows.base import BlockSpec

    torch.manual_seed(0)
    block = AffineBlock(BlockSpec(3, (2, 2), width=32, depth=1, head_dim=16))
    assert block.layers[0].mlp.fc.weight[0, :3].tolist() == pytest.approx(EXPECTED_FIRST_MLP_WEIGHTS, abs=1e-6)
