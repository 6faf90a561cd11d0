"""Every built-in and shipped plugin block passes the conformance kit."""

import pytest
import torch

from flowvid.flows import AffineBlock
from flowvid.testing import FlowBlockConformance
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


@pytest.mark.parametrize("wrong_block, kit_test", [
    (BatchAveragedLogdet, "test_logdet_matches_autograd_jacobian"),
    (LaterFramesLogdetDropped, "test_logdet_matches_autograd_jacobian"),
    (BatchMixing, "test_samples_of_a_batch_do_not_see_each_other"),
    (ReadsThePreviousSample, "test_samples_of_a_batch_do_not_see_each_other"),
    (PeeksAtTheNextToken, "test_changing_a_token_leaves_earlier_slots_unchanged"),
])
def test_the_kit_fails_a_block_that_breaks_the_contract(wrong_block, kit_test):
    kit = type("Kit", (FlowBlockConformance,), {"block_class": wrong_block})()
    arguments = {"conditioned": False}
    if kit_test == "test_changing_a_token_leaves_earlier_slots_unchanged":
        arguments["permutation"] = "identity"
    with pytest.raises(AssertionError):
        getattr(kit, kit_test)(**arguments)


EXPECTED_FIRST_MLP_WEIGHTS = [-0.032836, -0.110159, 0.149697]  # torch.manual_seed(0), recorded with flowvid 0.1


def test_a_seed_gives_the_initial_weights_it_always_gave():
    """Recorded runs (the demo's numbers, the benchmarks) rebuild their models from a seed."""
    from flowvid.flows.base import BlockSpec

    torch.manual_seed(0)
    block = AffineBlock(BlockSpec(3, (2, 2), width=32, depth=1, head_dim=16))
    assert block.layers[0].mlp.fc.weight[0, :3].tolist() == pytest.approx(EXPECTED_FIRST_MLP_WEIGHTS, abs=1e-6)
