"""Flow-score matching and the Tweedie step against references computed without the code under test.

The references: a density whose score is written out by hand (a Gaussian mixture per dimension), the
Gaussian posterior mean of an affine flow, and gradients taken by a separate ``torch.autograd.grad`` in
float64. They pin the sign and the scale of the target (per-dimension NLL against summed log-likelihood),
that the denoiser's training leaves the flow's gradients bit for bit as they were, the denoiser's loss
normalisation, and that the causal denoiser reads no frame after its look-ahead.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from flowvid.codecs.pixel import PixelCodec
from flowvid.denoise import CausalDenoiser, flow_score_target, score_matching_tap, tweedie_denoise
from flowvid.flows import GlobalLocalFlow
from flowvid.lit.module import FlowModule
from flowvid.text import LearnedTextEncoder
from flowvid.text.base import TextEmbedding

from test_train_denoiser import CHANNELS, FRAME, trained_looking_flow  # noqa: E402
VIDEO = (3, 2 * FRAME[0], 2 * FRAME[1])
SIGMA = 0.3
TEXT_WIDTH = 8
CAPTIONS = ["a red circle moves left", "a blue square"]


class MixtureDensity:
    """Every dimension independently ``0.3 N(-1, 0.5^2) + 0.7 N(1.5, 1.2^2)``, in float64; ``nll`` in nats
    per dimension, as a flow's ``nll``. Not Gaussian, so a wrong scale cannot hide in a linear score."""

    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    means = torch.tensor([-1.0, 1.5], dtype=torch.float64)
    stds = torch.tensor([0.5, 1.2], dtype=torch.float64)

    def _component_log_densities(self, x: torch.Tensor) -> torch.Tensor:
        u = x.double()[..., None]
        return (self.weights.log() - 0.5 * ((u - self.means) / self.stds) ** 2
                - self.stds.log() - 0.5 * math.log(2 * math.pi))

    def nll(self, x: torch.Tensor, text=None) -> torch.Tensor:
        return -torch.logsumexp(self._component_log_densities(x), dim=-1).flatten(1).mean(1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x) by hand: the responsibilities times each component's own score."""
        responsibilities = torch.softmax(self._component_log_densities(x), dim=-1)
        component_scores = -(x.double()[..., None] - self.means) / self.stds**2
        return (responsibilities * component_scores).sum(-1)


def float64_score(flow: GlobalLocalFlow, x: torch.Tensor) -> torch.Tensor:
    """grad_x of the summed log-likelihood ``-0.5 |z|^2 - D/2 ln 2 pi + log|det|`` of each sample, in float64."""
    probe = x.detach().clone().requires_grad_(True)
    z, logdet = flow(probe)
    dims = probe[0].numel()
    log_likelihood = -0.5 * z.double().pow(2).flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi) + logdet.double()
    (score,) = torch.autograd.grad(log_likelihood.sum(), probe)
    return score.double()


def make_module(denoiser=True, text=False) -> FlowModule:
    text_width = TEXT_WIDTH if text else None
    flow = trained_looking_flow(text_width=text_width)
    torch.manual_seed(1)
    encoder = LearnedTextEncoder(width=TEXT_WIDTH, max_length=12, depth=1, head_dim=8) if text else None
    network = None
    if denoiser:
        network = CausalDenoiser(CHANNELS, FRAME, width=32, depth=2, head_dim=16, text_width=text_width,
                                 noise_std=SIGMA)
        torch.nn.init.normal_(network.proj_out.weight, std=0.1)  # as if trained: the output depends on the input
    return FlowModule(flow, PixelCodec(patch_size=2), encoder, network, video_shape=VIDEO, noise_std=SIGMA)


# --- the target and the Tweedie step: sign and scale ---------------------------------------------


def test_target_of_a_per_dimension_loss_is_sigma_times_the_hand_written_score():
    torch.manual_seed(0)
    density = MixtureDensity()
    x = (torch.randn(4, 2, *FRAME, CHANNELS) * 1.5).requires_grad_(True)
    density.nll(x).mean().backward()  # the training loss: batch mean of per-dimension NLLs
    expected = -SIGMA * density.score(x.detach())
    torch.testing.assert_close(flow_score_target(x.grad, SIGMA).double(), expected, rtol=1e-5, atol=1e-6)


def test_tweedie_step_on_a_known_density_adds_sigma_squared_times_its_score():
    torch.manual_seed(0)
    density = MixtureDensity()
    x = torch.randn(3, 2, *FRAME, CHANNELS) * 1.5
    expected = x.double() + SIGMA**2 * density.score(x)
    torch.testing.assert_close(tweedie_denoise(density, x, SIGMA).double(), expected, rtol=1e-5, atol=1e-6)


def test_training_target_of_a_flow_is_its_float64_score_and_denoising_with_it_is_tweedie():
    module = make_module(denoiser=False)
    x = torch.randn(3, 3, *FRAME, CHANNELS).requires_grad_(True)
    module.likelihood_terms(x, None)["loss"].backward()
    target = flow_score_target(x.grad, SIGMA).double()
    score = float64_score(module.flow, x)
    assert score.abs().max() > 1.0  # a real score, not a vanishing one
    torch.testing.assert_close(target, -SIGMA * score, rtol=1e-4, atol=1e-5)
    # A denoiser that predicts the target exactly lands where Tweedie's formula does.
    tweedie = x.detach().double() + SIGMA**2 * score
    torch.testing.assert_close(x.detach().double() - SIGMA * target, tweedie, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tweedie_denoise(module.flow, x, SIGMA).double(), tweedie, rtol=1e-4, atol=1e-5)


def affine_flow(seed=2) -> GlobalLocalFlow:
    """A flow whose output projections have zero weights: each block maps every token by the same
    per-channel affine map, so the density is a Gaussian with per-channel mean and scale."""
    torch.manual_seed(seed)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=CHANNELS, frame_size=FRAME)
    with torch.no_grad():
        for block in flow.blocks:
            log_scale, shift = block.proj_out.bias.view(2, CHANNELS)
            log_scale.uniform_(0.2, 1.0)  # every block widens the density: its variance exceeds sigma^2
            shift.normal_(0.0, 1.0)
    return flow


def test_tweedie_step_through_an_affine_flow_is_the_gaussian_posterior_mean():
    flow = affine_flow()
    # The Gaussian p(x~) = N(mean, scale^2) per channel, read off the flow as a black box: z = (x - mean) / scale.
    z, _ = flow(torch.stack([torch.zeros(1, *FRAME, CHANNELS), torch.ones(1, *FRAME, CHANNELS)]))
    z = z.double().flatten(1, -2)  # (2, tokens, channels)
    assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-6)  # every token mapped alike
    scale = 1.0 / (z[1, 0] - z[0, 0])
    mean = -z[0, 0] * scale
    assert (scale > 1.0).all() and mean.abs().max() > 0.1
    # x~ = x + sigma eps with x ~ N(mean, scale^2 - sigma^2): the conjugate-Gaussian posterior mean of x.
    x_noisy = torch.randn(2, 3, *FRAME, CHANNELS) * 2.0
    shrink = (scale**2 - SIGMA**2) / scale**2
    expected = mean + shrink * (x_noisy.double() - mean)
    torch.testing.assert_close(tweedie_denoise(flow, x_noisy, SIGMA).double(), expected, rtol=1e-5, atol=1e-5)


# --- the tap: the flow learns exactly what it learns alone ---------------------------------------


def flow_gradients(module: FlowModule, x: torch.Tensor, loss_scale: float, tapped: bool, autocast: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, TextEmbedding | None]:
    """The gradients of the flow and text encoder, x.grad, the denoiser's prediction and the text states
    of one training backward pass."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        text = module.encode_text(CAPTIONS[:x.shape[0]])
        prediction = None
        flow_input = x
        if tapped:
            prediction = module.denoiser_prediction(x, text)
            flow_input = score_matching_tap(x, prediction, SIGMA, loss_scale)
        (module.likelihood_terms(flow_input, text)["loss"] * loss_scale).backward()
    upstream = [*module.flow.parameters(), *(module.text_encoder.parameters() if module.text_encoder else [])]
    return [p.grad.clone() for p in upstream], x.grad, prediction, text


@pytest.mark.parametrize("loss_scale", [1.0, 0.25])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_tap_leaves_the_flows_gradients_bit_for_bit_and_trains_the_denoiser_by_the_documented_mse(
        loss_scale, autocast):
    module = make_module(text=True)
    x = torch.randn(2, 3, *FRAME, CHANNELS)
    alone, x_grad_alone, _, _ = flow_gradients(module, x, loss_scale, tapped=False, autocast=autocast)
    tapped, x_grad, prediction, text = flow_gradients(module, x, loss_scale, tapped=True, autocast=autocast)
    assert len(alone) > len(list(module.flow.parameters()))  # the text encoder's gradients are compared too
    assert all(torch.equal(a, b) for a, b in zip(alone, tapped))
    assert torch.equal(x_grad, x_grad_alone)

    # The denoiser's gradient: loss_scale * MSE (mean over every element) to the target, in float64.
    assert prediction.dtype == torch.float32
    target = (x_grad.double() / loss_scale) * (x.numel() * SIGMA)
    reference = copy.deepcopy(module.denoiser).double()
    text = TextEmbedding(text.tokens.detach().double(), text.mask)
    (loss_scale * F.mse_loss(reference(x.double(), text), target)).backward()
    for expected, parameter in zip(reference.parameters(), module.denoiser.parameters()):
        # bf16 autocast rounds the denoiser's own activations, not its target.
        tolerance = dict(rtol=5e-2, atol=5e-3 * loss_scale) if autocast else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(parameter.grad.double(), expected.grad, **tolerance)


def test_under_bf16_autocast_the_target_stays_fp32_and_close_to_the_fp32_one():
    module = make_module(denoiser=False)
    x = torch.randn(2, 3, *FRAME, CHANNELS)
    _, fp32_grad, _, _ = flow_gradients(module, x, 1.0, tapped=False, autocast=False)
    _, bf16_grad, _, _ = flow_gradients(module, x, 1.0, tapped=False, autocast=True)
    target, fp32_target = flow_score_target(bf16_grad, SIGMA), flow_score_target(fp32_grad, SIGMA)
    assert target.dtype == torch.float32
    # Off by the transformer's bf16 rounding only: no factor, no sign.
    assert (target - fp32_target).norm() < 0.05 * fp32_target.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        denoised = tweedie_denoise(module.flow, x, SIGMA)
    assert denoised.dtype == torch.float32
    step, fp32_step = denoised - x, tweedie_denoise(module.flow, x, SIGMA) - x
    assert (step - fp32_step).norm() < 0.05 * fp32_step.norm()


# --- the causal denoiser ----------------------------------------------------------------------------


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_a_denoised_frame_is_bit_for_bit_blind_to_every_frame_after_its_lookahead(lookahead):
    torch.manual_seed(0)
    denoiser = CausalDenoiser(CHANNELS, FRAME, width=32, depth=3, head_dim=16, window=1, lookahead=lookahead,
                              text_width=8, noise_std=SIGMA)
    torch.nn.init.normal_(denoiser.proj_out.weight)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    text = TextEmbedding(torch.randn(2, 5, 8), mask)
    x = torch.randn(2, 6, *FRAME, CHANNELS)
    base = denoiser(x, text)
    for first_changed in range(1, 6):
        changed = x.clone()
        changed[:, first_changed:] = 10.0 * torch.randn_like(changed[:, first_changed:])
        out = denoiser(changed, text)
        blind = max(0, first_changed - lookahead)  # frames [0, blind) must not see the change
        assert torch.equal(out[:, :blind], base[:, :blind])
        assert (out[:, blind] - base[:, blind]).abs().max() > 1e-3  # the first frame that may see it does


# --- noise augmentation -------------------------------------------------------------------------------


def test_noise_augmentation_adds_zero_mean_noise_of_std_sigma():
    module = make_module(denoiser=False)
    clean = torch.randn(64, *module.latent_shape)
    torch.manual_seed(3)
    noisy, _ = module.training_inputs({"latents": clean})
    noise = (noisy - clean) / SIGMA
    # 13,824 draws: the sample mean and std are within 0.05 of 0 and 1 by over 5 standard errors.
    assert abs(noise.mean().item()) < 0.05
    assert abs(noise.std().item() - 1.0) < 0.05
