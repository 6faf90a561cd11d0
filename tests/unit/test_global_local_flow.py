"""GlobalLocalFlow: exact likelihood, frame causality, presets, bad input."""

import math

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import SequentialSampler
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding


def make_flow(**overrides):
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), **overrides)
    perturb_parameters(flow, std=0.05)
    return flow.eval()


def make_text(batch, width=8):
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[0, 2:] = False
    return TextEmbedding(torch.randn(batch, 4, width) * mask[..., None], mask)


def test_sequential_sampler_inverts_the_flow():
    flow = make_flow(text_width=8)
    x = torch.randn(2, 3, 2, 3, 3)
    text = make_text(2)
    with torch.no_grad():
        z, _ = flow(x, text)
    x_back = SequentialSampler().sample(flow, z, text)
    assert (x_back - x).norm() / x.norm() <= 1e-5


def test_changing_frame_n_leaves_earlier_frames_of_z_unchanged():
    flow = make_flow(text_width=8)
    x = torch.randn(2, 4, 2, 3, 3)
    text = make_text(2)
    changed = x.clone()
    changed[:, 2] += torch.randn_like(changed[:, 2])
    with torch.no_grad():
        z, _ = flow(x, text)
        z_changed, _ = flow(changed, text)
    assert torch.equal(z[:, :2], z_changed[:, :2])
    assert not torch.allclose(z[:, 2:], z_changed[:, 2:])


def test_nll_matches_the_change_of_variables_formula_and_logdet_matches_autograd():
    flow = make_flow().double()
    x = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x))[0].reshape(-1).double(),
                                                  x.reshape(-1))
    logdet_autograd = torch.linalg.slogdet(jacobian)[1]
    z, logdet = flow(x)
    assert logdet.dtype == torch.float32
    assert abs(logdet.item() - logdet_autograd.item()) < 1e-4
    dims = x.numel()
    expected = (0.5 * z.pow(2).sum() + 0.5 * dims * math.log(2 * math.pi) - logdet_autograd) / dims
    assert abs(flow.nll(x).item() - expected.item()) < 1e-5
    assert abs(flow.bits_per_dim(x).item() - expected.item() / math.log(2)) < 1e-5


def test_per_frame_nll_factorises_the_whole_video_nll():
    flow = make_flow()
    x = torch.randn(2, 3, 2, 3, 3)
    with torch.no_grad():
        per_frame = flow.nll_per_frame(x)
        first_frames = flow.nll_per_frame(x[:, :2])
    assert per_frame.shape == (2, 3)
    torch.testing.assert_close(per_frame.mean(1), flow.nll(x))
    torch.testing.assert_close(per_frame[:, :2], first_frames)  # causal: later frames do not matter


def test_flow_starts_as_the_identity():
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3))
    x = torch.randn(1, 2, 2, 3, 3)
    z, logdet = flow(x)
    torch.testing.assert_close(z, x)
    assert torch.equal(logdet, torch.zeros(1))


def test_tiny_preset_accepts_any_number_of_frames():
    flow = make_flow()
    for frames in (1, 5, 9):
        z, logdet = flow(torch.randn(1, frames, 2, 3, 3))
        assert z.shape == (1, frames, 2, 3, 3) and logdet.shape == (1,)


def test_the_base_preset_counts_the_documented_0_36b_parameters():
    with torch.device("meta"):
        flow = GlobalLocalFlow.from_preset("base", latent_channels=48, frame_size=(16, 16))
    assert round(sum(p.numel() for p in flow.parameters()) / 1e9, 2) == 0.36


def test_the_7b_configuration_counts_about_5_98b_flow_parameters():
    with torch.device("meta"):
        flow = GlobalLocalFlow.from_preset("starflow-v-7b")
    count = sum(p.numel() for p in flow.parameters())
    deep = sum(p.numel() for p in flow.deep.parameters())
    assert 5.95e9 < count < 6.01e9
    assert 4.80e9 < deep < 4.88e9
    assert len(flow.shallow) == 5


def test_gated_plugin_block_is_selectable_by_short_name():
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), deep_block="gated")
    assert type(flow.deep).__name__ == "GatedAffineBlock"


@pytest.mark.parametrize(
    "x, text, message",
    [
        (torch.randn(2, 2, 3, 3), None, "rank 4"),
        (torch.randn(1, 2, 3, 3, 3), None, r"\(B, T, 2, 3, 3\)"),
        (torch.full((1, 2, 2, 3, 3), float("nan")), None, "NaN"),
        (torch.randn(1, 2, 2, 3, 3), TextEmbedding(torch.randn(1, 4, 5), torch.ones(1, 4, dtype=torch.bool)), "L, 8"),
    ],
)
def test_bad_input_raises_a_clear_value_error(x, text, message):
    flow = make_flow(text_width=8)
    with pytest.raises(ValueError, match=message):
        flow(x, text)


def test_text_on_an_unconditional_flow_is_rejected():
    with pytest.raises(ValueError, match="unconditional"):
        make_flow()(torch.randn(1, 1, 2, 3, 3), make_text(1))


@pytest.mark.parametrize(
    "overrides, parameter",
    [
        ({"deep_depth": 0}, "deep_depth"),
        ({"shallow_depth": -1}, "shallow_depth"),
        ({"num_shallow": -2}, "num_shallow"),
        ({"deep_width": 0}, "deep_width"),
        ({"shallow_width": 0}, "shallow_width"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"latent_channels": -3}, "latent_channels"),
        ({"latent_channels": 3.0}, "latent_channels"),
        ({"frame_size": (0, 4)}, "frame_size"),
        ({"frame_size": (-4, 4)}, "frame_size"),
        ({"frame_size": (4.7, 4)}, "frame_size"),
        ({"frame_size": (4,)}, "frame_size"),
        ({"text_width": 0}, "text_width"),
        ({"text_width": -8}, "text_width"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"deep_block": 3}, "deep_block"),
    ],
)
def test_sizes_that_cannot_work_are_refused_by_the_constructor(overrides, parameter):
    sizes = {"latent_channels": 3, "frame_size": (2, 3), **overrides}
    with pytest.raises(ValueError, match=parameter) as raised:
        GlobalLocalFlow.from_preset("tiny", **sizes)
    bad_value = next(iter(overrides.values()))
    assert repr(bad_value) in str(raised.value) or str(bad_value) in str(raised.value)


def test_text_states_in_another_float_dtype_are_cast_to_the_flows():
    flow = make_flow(text_width=8)
    x, text = torch.randn(2, 2, 2, 3, 3), make_text(2)
    with torch.no_grad():
        expected = flow(x, text)[1]
        in_double = flow(x, TextEmbedding(text.tokens.double(), text.mask))[1]
    torch.testing.assert_close(in_double, expected)


@pytest.mark.parametrize(
    "x, tokens, message",
    [
        (torch.randn(1, 2, 2, 3, 3), torch.ones(1, 4, 8, dtype=torch.int64), "floating-point text tokens.*int64"),
        (torch.randn(1, 2, 2, 3, 3), torch.full((1, 4, 8), float("nan")), "text tokens contain NaN"),
        (torch.randn(1, 2, 2, 3, 3), torch.full((1, 4, 8), float("inf")), "text tokens contain NaN or infinite"),
        (torch.randn(1, 0, 2, 3, 3), None, r"T >= 1, got \(1, 0, 2, 3, 3\)"),
        (torch.randn(0, 2, 2, 3, 3), None, r"B >= 1 and T >= 1, got \(0, 2, 2, 3, 3\)"),
    ],
)
def test_bad_text_and_empty_videos_are_refused_before_any_computation(x, tokens, message):
    flow = make_flow(text_width=8)
    text = None if tokens is None else TextEmbedding(tokens, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        flow(x, text)
