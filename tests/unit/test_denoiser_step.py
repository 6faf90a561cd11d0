"""The denoising step ``x^ = x~ - sigma * D(x~)``: its sign and scale, and the validation metric built on it.

A denoiser that predicts the noise exactly must land on the clean latents; one step the wrong way
lands twice as far from them as the noisy input.
"""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.denoise import CausalDenoiser
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule

from test_train_denoiser import CHANNELS, FRAME, make_denoiser  # noqa: E402


class NoiseOracle(CausalDenoiser):
    """Predicts the noise of ``x~ = clean + sigma * eps`` exactly, knowing ``clean``: ``D(x~) = eps``."""

    def __init__(self, clean: torch.Tensor, **sizes):
        super().__init__(CHANNELS, FRAME, width=16, depth=1, head_dim=8, **sizes)
        self.clean = clean

    def forward(self, x, text=None, first_frame=0):
        return (x.float() - self.clean) / self.noise_std


def test_denoising_subtracts_sigma_times_the_prediction():
    """With a denoiser whose output depends on its input, one step is ``x - sigma * D(x)``."""
    denoiser = make_denoiser()
    x = torch.randn(2, 3, *FRAME, CHANNELS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction = denoiser(x)
        assert prediction.abs().mean() > 0.1  # a prediction that moves the step
        torch.testing.assert_close(denoiser.denoise(x), x - denoiser.noise_std * prediction)


def test_a_denoiser_that_predicts_the_exact_noise_recovers_the_clean_latents():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 3, *FRAME, CHANNELS, generator=generator)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=generator)
    oracle = NoiseOracle(clean, noise_std=0.3)
    torch.testing.assert_close(oracle.denoise(noisy), clean, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You called `self.log")  # no logger: the returned metrics are what is checked
def test_validation_logs_the_denoised_latents_closer_to_the_clean_ones_than_the_noisy_ones():
    """``val/denoiser_mse`` measures ``denoise(x~)`` against the clean latents: about 0 for a denoiser that
    predicts the noise, while the noisy latents are ``sigma^2`` away."""
    clean = torch.randn(2, 3, *FRAME, CHANNELS, generator=torch.Generator().manual_seed(0))
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=CHANNELS, frame_size=FRAME)
    module = FlowModule(flow, PixelCodec(patch_size=2), None, NoiseOracle(clean), video_shape=(3, 4, 6), noise_std=0.3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    batch = {"latents": clean, "key": ["0", "1"]}
    (metrics,) = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)
    assert abs(metrics["val/noisy_mse"] - 0.3**2) < 0.02
    assert metrics["val/denoiser_mse"] < 1e-8
