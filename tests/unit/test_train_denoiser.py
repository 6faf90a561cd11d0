"""The causal denoiser and flow-score matching: the target's scale, the window, the Tweedie fallback."""

import pytest
import torch

from flowvid.codecs.pixel import PixelCodec
from flowvid.denoise import CausalDenoiser, flow_score_target, score_matching_tap, tweedie_denoise
from flowvid.flows import GlobalLocalFlow
from flowvid.lit.module import FlowModule
from flowvid.text.base import TextEmbedding

FRAME = (2, 3)
CHANNELS = 12  # PixelCodec(patch_size=2): 2 x 2 RGB pixels per token


def trained_looking_flow(text_width=None, seed=0) -> GlobalLocalFlow:
    """A tiny flow whose output projections are not zero, so that it is far from the identity."""
    torch.manual_seed(seed)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=CHANNELS, frame_size=FRAME, text_width=text_width)
    with torch.no_grad():
        for block in flow.blocks:
            block.proj_out.weight.normal_(0.0, 0.1)
            block.proj_out.bias.normal_(0.0, 0.1)
    return flow


def random_text(batch, width=8, length=5, seed=1) -> TextEmbedding:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    return TextEmbedding(torch.randn(batch, length, width, generator=generator) * mask[..., None], mask)


def test_fsm_target_is_sigma_times_the_autograd_score_of_each_sample():
    sigma = 0.3
    flow = trained_looking_flow()
    module = FlowModule(flow, PixelCodec(patch_size=2), video_shape=(3, 2 * FRAME[0], 2 * FRAME[1]), noise_std=sigma)
    x = torch.randn(3, 3, *FRAME, CHANNELS).requires_grad_(True)
    text = None

    module.likelihood_terms(x, text)["loss"].backward()  # the training loss's own backward pass
    target = flow_score_target(x.grad, sigma)

    probe = x.detach().clone().requires_grad_(True)
    dims = probe[0].numel()
    (score,) = torch.autograd.grad((flow.nll(probe, text) * dims).sum(), probe)  # sum_b grad NLL_b
    torch.testing.assert_close(target, sigma * score, rtol=1e-5, atol=1e-5)
    assert score.abs().max() > 1.0  # a real score, not a vanishing one


def test_tweedie_step_through_an_identity_flow_is_the_gaussian_posterior_mean():
    # At initialisation every block is the identity, so the flow's density is N(0, I) and
    # E[x | x~] = x~ + sigma^2 grad log p(x~) = (1 - sigma^2) x~.
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=CHANNELS, frame_size=FRAME)
    x = torch.randn(2, 3, *FRAME, CHANNELS)
    torch.testing.assert_close(tweedie_denoise(flow, x, 0.4), (1 - 0.4**2) * x, rtol=1e-5, atol=1e-6)


def test_tweedie_step_works_under_inference_mode():
    flow = trained_looking_flow()
    x = torch.randn(1, 2, *FRAME, CHANNELS)
    expected = tweedie_denoise(flow, x, 0.3)
    with torch.inference_mode():
        torch.testing.assert_close(tweedie_denoise(flow, x, 0.3), expected)


def make_denoiser(depth=2, window=1, lookahead=1, text_width=None) -> CausalDenoiser:
    torch.manual_seed(0)
    denoiser = CausalDenoiser(CHANNELS, FRAME, width=32, depth=depth, head_dim=16, window=window,
                              lookahead=lookahead, text_width=text_width, noise_std=0.5)
    torch.nn.init.normal_(denoiser.proj_out.weight)  # as if trained: the output depends on the input
    return denoiser


def test_untrained_denoiser_returns_its_input():
    denoiser = CausalDenoiser(CHANNELS, FRAME, width=32, depth=1, head_dim=16, noise_std=0.5)
    x = torch.randn(2, 3, *FRAME, CHANNELS)
    torch.testing.assert_close(denoiser.denoise(x), x)


@pytest.mark.parametrize("depth,lookahead", [(1, 1), (3, 1), (3, 2)])
def test_a_frame_never_sees_further_ahead_than_the_lookahead(depth, lookahead):
    denoiser = make_denoiser(depth=depth, window=1, lookahead=lookahead)
    x = torch.randn(1, 6, *FRAME, CHANNELS)
    base = denoiser(x)
    changed = x.clone()
    changed[:, 4] += 1.0
    out = denoiser(changed)
    last_blind = 4 - lookahead - 1
    torch.testing.assert_close(out[:, : last_blind + 1], base[:, : last_blind + 1])
    assert (out[:, 4 - lookahead] - base[:, 4 - lookahead]).abs().max() > 1e-4


def test_the_past_is_seen_through_depth_times_window_frames():
    denoiser = make_denoiser(depth=2, window=1, lookahead=1)
    x = torch.randn(1, 6, *FRAME, CHANNELS)
    base = denoiser(x)
    changed = x.clone()
    changed[:, 0] += 1.0
    out = denoiser(changed)
    assert (out[:, 2] - base[:, 2]).abs().max() > 1e-4  # two layers, one past frame each
    torch.testing.assert_close(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("depth,window,lookahead", [(2, 1, 1), (3, 2, 0), (1, 1, 2)])
def test_denoising_a_video_frame_by_frame_gives_the_whole_videos_frames_lookahead_frames_behind(depth, window,
                                                                                                 lookahead):
    denoiser = make_denoiser(depth=depth, window=window, lookahead=lookahead, text_width=8)
    x, text = torch.randn(2, 9, *FRAME, CHANNELS), random_text(2)
    arrived, out = [], []

    def frames():
        for frame in x.unbind(1):
            arrived.append(frame)
            yield frame

    for n, frame in enumerate(denoiser.denoise_stream(frames(), text)):
        assert len(arrived) == min(n + lookahead + 1, 9)  # no later frame was needed yet
        out.append(frame)
    torch.testing.assert_close(torch.stack(out, dim=1), denoiser.denoise(x, text), rtol=1e-5, atol=1e-5)


def test_text_conditioning_counts_and_padding_does_not():
    denoiser = make_denoiser(text_width=8)
    x = torch.randn(3, 2, *FRAME, CHANNELS)
    text = random_text(3)
    base = denoiser(x, text)
    padded = TextEmbedding(text.tokens.clone(), text.mask)
    padded.tokens[0, 3:] = 100.0  # masked positions of sample 0
    torch.testing.assert_close(denoiser(x, padded), base)
    other = TextEmbedding(text.tokens + 1.0, text.mask)
    assert (denoiser(x, other) - base).abs().max() > 1e-4


def test_wrong_latent_shape_is_a_clear_error():
    denoiser = make_denoiser()
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, T, 2, 3, 12\)"):
        denoiser(torch.randn(1, 2, 3, 2, CHANNELS))


@pytest.mark.parametrize("noise_std, loss_scale", [(0.0, 1.0), (-0.1, 1.0), (0.1, 0.0), (0.1, float("inf"))])
def test_the_score_matching_tap_refuses_a_noise_level_or_loss_scale_that_is_no_scale(noise_std, loss_scale):
    x = torch.randn(1, 1, *FRAME, CHANNELS)
    with pytest.raises(ValueError, match="must be > 0 and finite"):
        score_matching_tap(x, torch.zeros_like(x), noise_std, loss_scale)


def test_denoise_needs_its_noise_level():
    denoiser = CausalDenoiser(CHANNELS, FRAME, width=32, depth=1, head_dim=16)
    with pytest.raises(ValueError, match="noise_std"):
        denoiser.denoise(torch.randn(1, 1, *FRAME, CHANNELS))



@pytest.mark.parametrize("size, message", [
    ({"depth": 0}, "CausalDenoiser depth must be an int >= 1, got 0"),
    ({"depth": -1}, "CausalDenoiser depth must be an int >= 1, got -1"),
    ({"width": 0}, "CausalDenoiser width must be an int >= 1, got 0"),
    ({"head_dim": 0}, "CausalDenoiser head_dim must be an int >= 2, got 0"),
    ({"head_dim": 5, "width": 40}, "CausalDenoiser head_dim must be even"),
    ({"head_dim": 16, "width": 40}, "CausalDenoiser width must be a multiple of head_dim, got width=40, head_dim=16"),
    ({"window": -1}, "CausalDenoiser window must be an int >= 0, got -1"),
    ({"lookahead": 1.5}, "CausalDenoiser lookahead must be an int >= 0, got 1.5"),
    ({"channels": 0}, "CausalDenoiser channels must be an int >= 1, got 0"),
    ({"frame_size": (0, 3)}, r"CausalDenoiser frame_size must be a pair \(h, w\) of ints >= 1, got \(0, 3\)"),
    ({"text_width": 0}, "CausalDenoiser text_width must be an int >= 1, got 0"),
    ({"noise_std": 0.0}, "CausalDenoiser noise_std must be > 0 and finite, got 0.0"),
    ({"noise_std": -0.1}, "CausalDenoiser noise_std must be > 0 and finite, got -0.1"),
    ({"noise_std": float("nan")}, "CausalDenoiser noise_std must be > 0 and finite, got nan"),
])
def test_sizes_that_build_no_working_denoiser_are_refused(size, message):
    settings = {"channels": CHANNELS, "frame_size": FRAME, "width": 32, "head_dim": 16, **size}
    with pytest.raises(ValueError, match=f"^{message}"):
        CausalDenoiser(**settings)
