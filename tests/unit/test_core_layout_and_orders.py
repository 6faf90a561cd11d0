"""Properties of the flow's core that its round trips cannot see: the layout of the affine output, the
precision of its projection, the token orders, when Jacobi stops, prefixes under another token order, the
prefix's own noise and what the denoiser's text tokens attend to."""

import math

import pytest
import torch
import torch.nn.functional as F

from flowvid.denoise.network import denoiser_attention_mask
from flowvid.flows import GlobalLocalFlow
from flowvid.flows.autoregressive import SOFTPLUS_INV_ONE, AffineBlock
from flowvid.flows.base import BlockSpec
from flowvid.flows.permutations import Permutation
from flowvid.registry import PERMUTATIONS
from flowvid.sampling import JacobiSampler, SequentialSampler
from flowvid.sampling.jacobi import pass_change
from flowvid.sampling.tasks import task_inputs
from flowvid.testing import perturb_parameters

from test_sampling_jacobi import make_flow


def test_the_affine_output_holds_the_log_scale_then_the_shift():
    # The layout imported checkpoints rely on (flowvid convert maps the projection's rows one to one);
    # swapping the halves would keep every round trip exact.
    block = AffineBlock(BlockSpec(2, (1, 2), width=16, depth=1, head_dim=8)).eval()
    log_scale, shift = torch.tensor([0.7, -1.2]), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        block.proj_out.bias.copy_(torch.cat([log_scale, shift]))  # its weights are zero at initialisation
    x = torch.randn(1, 2, 2)
    z, logdet = block(x)
    sigma = F.softplus(4 * torch.tanh(log_scale / 4) + SOFTPLUS_INV_ONE)
    torch.testing.assert_close(z, (x - 4 * torch.tanh(shift / 4)) / sigma)
    torch.testing.assert_close(logdet, -sigma.log().expand_as(x))


def test_the_affine_projection_computes_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    block = AffineBlock(BlockSpec(3, (2, 3), width=32, depth=2, head_dim=16))
    perturb_parameters(block)
    block.eval()
    seen = []
    block.proj_out.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(2, 12, 3))
    [(hidden, output)] = seen
    assert output.dtype == torch.float32
    exact = F.linear(hidden.float(), block.proj_out.weight, block.proj_out.bias)
    torch.testing.assert_close(output, exact, rtol=1e-6, atol=1e-6)


class Rolled(Permutation):
    """An order that is not its own inverse, as a plugin's may be."""

    def index(self, num_tokens, device=None):
        return torch.arange(num_tokens, device=device).roll(1)


@pytest.mark.parametrize("name", [*PERMUTATIONS.names(), "rolled"])
def test_an_order_moves_the_tokens_as_its_index_says_and_its_inverse_undoes_it(name):
    order = Rolled(4) if name == "rolled" else PERMUTATIONS.get(name)(4)
    x = torch.randn(2, 12, 3)
    torch.testing.assert_close(order.forward(x), x.index_select(1, order.index(12)), rtol=0, atol=0)
    torch.testing.assert_close(order.inverse(order.forward(x)), x, rtol=0, atol=0)


@pytest.mark.parametrize("num_shallow, orders", [(1, ["flip"]), (2, ["identity", "flip"]),
                                                 (3, ["flip", "identity", "flip"])])
def test_the_shallow_orders_alternate_and_the_one_beside_the_deep_block_reads_backwards(num_shallow, orders):
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 2), num_shallow=num_shallow)
    assert [type(block.permutation) for block in flow.shallow] == [type(PERMUTATIONS.get(o)(4)) for o in orders]


def test_a_jacobi_pass_changes_by_its_move_relative_to_the_whole_block():
    new, old, final = torch.tensor([[[3.0, 0.0]]]), torch.zeros(1, 1, 2), torch.tensor([[[4.0, 0.0]]])
    change, moves = pass_change(new, old, final)
    torch.testing.assert_close(change, torch.tensor([0.6]))
    torch.testing.assert_close(moves, torch.tensor([[0.6 * math.sqrt(2)]]))


def test_blocks_of_one_slot_take_one_pass_each():
    # A slot whose inputs are all final is exact after one pass: a second one would cost a pass per block.
    flow = make_flow(frame_size=(2, 2))
    z = torch.randn(2, 2, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    sampler = JacobiSampler(first_block_size=1, block_size=1)
    sampler.sample(flow, z)
    stats = sampler.last_stats
    assert set(stats["deep"]["iterations"]) == {1}
    assert all(set(shallow["iterations"]) == {1} for shallow in stats["shallow"].values())


def test_a_prefix_continues_a_video_whose_deep_block_reads_each_frame_backwards():
    torch.manual_seed(0)

    def backwards_in_frame(spec):
        return AffineBlock(BlockSpec(**{**spec.__dict__, "permutation": "flip_within_frame"}))

    flow = GlobalLocalFlow(3, (2, 2), num_shallow=1, shallow_width=16, shallow_depth=1, deep_width=32, deep_depth=1,
                           head_dim=8, deep_block=backwards_in_frame)
    perturb_parameters(flow, std=0.1)
    flow.eval()
    x = torch.randn(2, 3, 2, 2, 3)
    with torch.no_grad():
        z, _ = flow(x)
    torch.testing.assert_close(SequentialSampler().sample(flow, z, prefix=x[:, :1]), x, rtol=1e-4, atol=1e-4)


def test_a_prefix_is_noised_apart_from_the_sampling_noise():
    source = torch.zeros(1, 1, 4, 4, 3)
    inputs = task_inputs("i2v", ["a"], 3, (4, 4, 3), seed=5, source=source, noise_std=1.0)
    again = task_inputs("i2v", ["a"], 3, (4, 4, 3), seed=5, source=source, noise_std=1.0)
    assert torch.equal(inputs.prefix, again.prefix)  # reproducible from the seed
    correlation = torch.corrcoef(torch.stack([inputs.prefix.flatten(), inputs.z[:, :1].flatten()]))[0, 1]
    assert abs(correlation) < 0.9


def test_the_denoisers_text_tokens_see_the_valid_text_and_the_frames_see_it_too():
    valid = torch.tensor([[True, True, False]])
    mask = denoiser_attention_mask(2, 1, window=1, lookahead=0, text_valid=valid)[0, 0]
    text_rows = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask[:3], text_rows)  # padding sees only the valid text and itself
    assert torch.equal(mask[3:, :3], valid.expand(2, 3))
