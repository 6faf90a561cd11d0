"""Bits/dim computed a second way: Gaussian log-density of z plus the log|det| of the whole map, by autograd.

Training, validation and ``flowvid score`` all read the likelihood off ``flow.nll_per_frame``. These tests
rebuild it from ``torch.autograd.functional.jacobian`` in float64, with everything between the numbers a
user sees and the flow's z inside the differentiated map: the pixel codec's scaling, every shallow block
with its permutation, the captioned deep block.
"""

import copy
import math

import numpy as np
import pytest
import torch

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.placement import precision_context
from flowvid.score import score_video
from flowvid.testing import perturb_parameters
from flowvid.text import LearnedTextEncoder

WINDOW = 2  # frames of the clips the model is trained on: a 5-frame video is scored in clips of 2, 2 and 1
LN2 = math.log(2)


def make_module() -> FlowModule:
    """Pixel codec (2x2 patches) and a captioned flow with both shallow directions, off its identity start."""
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 2), num_shallow=2, text_width=16)
    module = FlowModule(flow, PixelCodec(patch_size=2),
                        LearnedTextEncoder(width=16, max_length=8, depth=1, head_dim=8), video_shape=(WINDOW, 4, 4))
    perturb_parameters(module.flow, std=0.05)
    return module.eval()


def nats_by_change_of_variables(to_z, x: torch.Tensor) -> tuple[list[float], float]:
    """-log p of each frame of ``x`` (1, T, ...) given the earlier ones, and of the whole clip, in nats, for
    the density that ``to_z`` (float64 x -> z of the same shape) carries over from a standard Gaussian."""
    flat = x.reshape(-1)
    jacobian = torch.autograd.functional.jacobian(lambda v: to_z(v.view_as(x)).reshape(-1), flat)
    z = to_z(x).detach()

    def gaussian_minus_logdet(z_part: torch.Tensor, block: torch.Tensor) -> float:
        dims = z_part.numel()
        return (0.5 * z_part.pow(2).sum() + 0.5 * dims * math.log(2 * math.pi) - torch.linalg.slogdet(block)[1]).item()

    per_frame = x[0, 0].numel()
    frames = [slice(t * per_frame, (t + 1) * per_frame) for t in range(x.shape[1])]
    return ([gaussian_minus_logdet(z[0, t], jacobian[rows, rows]) for t, rows in enumerate(frames)],
            gaussian_minus_logdet(z, jacobian))


def test_a_pixel_score_is_the_density_of_the_dequantised_8bit_values_clip_by_clip():
    """The flow with the map from 8-bit values to [-1, 1] as its first layer, differentiated whole, scores
    every frame and the video as ``flowvid score`` does: the scaling costs exactly ln 127.5 nats per value,
    and a video cut into clips of unequal length weighs every value once."""
    module = make_module()
    video = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    record = score_video(module, video, "a red circle", torch.Generator().manual_seed(7))

    flow = copy.deepcopy(module.flow).double()
    text = module.text_encoder.encode(["a red circle"])
    noise = torch.Generator().manual_seed(7)  # the clips draw their dequantisation noise in turn, as scoring does
    expected_per_frame, clip_nats, values = [], 0.0, 0
    for start in range(0, len(video), WINDOW):
        levels = torch.from_numpy(video[start:start + WINDOW]).double().reshape(1, -1, 2, 2, 2, 2, 3)
        levels = levels.permute(0, 1, 2, 4, 3, 5, 6).reshape(1, -1, 2, 2, 12)  # 2x2 patches of RGB: the latent layout
        dequantised = levels + torch.rand(levels.shape[1:], generator=noise).double()
        frames, clip = nats_by_change_of_variables(lambda v: flow(v / 127.5 - 1, text)[0], dequantised)
        expected_per_frame += [nats / (dequantised[0, 0].numel() * LN2) for nats in frames]
        clip_nats, values = clip_nats + clip, values + dequantised.numel()

    assert record["clips"] == 3 and record["latent_frames"] == 5
    assert record["bits_per_dim_per_frame"] == pytest.approx(expected_per_frame, abs=1e-5)
    assert record["bits_per_dim"] == pytest.approx(clip_nats / (values * LN2), abs=1e-5)


def test_training_bits_per_dim_is_the_change_of_variables_nll_of_the_noisy_latents():
    """``train/bits_per_dim`` (``nats_per_dim / ln 2``) is the mean over the batch of each video's exact NLL,
    with the captions of a batch kept apart; the loss leaves out only the Gaussian constant."""
    module = make_module()
    captions = ["a red circle moves left", "a blue square"]
    noisy = torch.randn(2, 3, 2, 2, 12, generator=torch.Generator().manual_seed(1))
    terms = module.likelihood_terms(noisy, module.encode_text(captions))

    flow = copy.deepcopy(module.flow).double()
    nats = []
    for video, caption in zip(noisy.double(), captions):
        text = module.text_encoder.encode([caption])
        _, whole = nats_by_change_of_variables(lambda v: flow(v, text)[0], video[None])
        nats.append(whole / video.numel())
    assert terms["nats_per_dim"].item() == pytest.approx(np.mean(nats), abs=1e-5)
    assert terms["loss"].item() == pytest.approx(np.mean(nats) - 0.5 * math.log(2 * math.pi), abs=1e-5)


def constant_affine_maps(module: FlowModule) -> FlowModule:
    """Every block's output projection reduced to its bias: each block is a fixed affine map, whatever its
    transformer computes, so a precision's rounding inside the network cannot reach z or the log-det."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in module.flow.blocks:
            block.proj_out.weight.zero_()
            block.proj_out.bias.copy_(torch.randn(block.proj_out.bias.shape, generator=generator))
    return module


def scores_in(module: FlowModule, precision: str) -> list[float]:
    video = np.random.default_rng(3).integers(0, 256, (4, 4, 4, 3)).astype(np.uint8)
    with precision_context(precision, torch.device("cpu")):
        return score_video(module, video, "a red circle", torch.Generator().manual_seed(5))["bits_per_dim_per_frame"]


def test_under_bf16_mixed_z_and_the_log_determinant_stay_fp32():
    module = constant_affine_maps(make_module())
    assert scores_in(module, "bf16-mixed") == pytest.approx(scores_in(module, "32-true"), abs=1e-6)


def test_bf16_mixed_moves_scores_only_by_the_networks_rounding():
    module = make_module()
    fp32, bf16 = np.array(scores_in(module, "32-true")), np.array(scores_in(module, "bf16-mixed"))
    assert np.any(bf16 != fp32)  # the network did run in bf16
    assert np.abs(bf16 - fp32).max() < 1e-2  # ~1e-3 bits on this model; a dropped term would cost far more
