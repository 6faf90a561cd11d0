"""Training the VideoVAE with Lightning: ``flowvid fit --config recipes/codecs/video_vae_shapes.yaml``.

The module consumes the project's video batches (``{"video": uint8 (B, T, H, W, 3), ...}``), learns to
reconstruct them through a KL-regularised Gaussian posterior, and logs the reconstruction PSNR. It
starts from the best linear autoencoder of the first batch (``VideoVAE.initialise_from``). The
per-channel normalisation of the latents is tracked while training (a running average of the
posterior means' statistics) and saved with the weights, so a checkpoint is a ready codec::

    codec = VideoVAE.from_checkpoint("runs/vae/.../checkpoints/last.ckpt")
"""

from __future__ import annotations

import inspect
import json
import math
import shlex
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from flowvid.codecs.pixel import to_unit_range
from flowvid.codecs.video_vae import CHECKPOINT_CONFIG_KEY, VideoVAE, check_linear_start


def psnr(mse: torch.Tensor, peak_to_peak: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for a mean squared error on a signal spanning ``peak_to_peak``."""
    return 10.0 * torch.log10(peak_to_peak**2 / mse.clamp_min(1e-12))


class VideoVAEModule(L.LightningModule):
    """Trains a :class:`VideoVAE` on ``batch["video"]``.

    Loss: mean squared error in [-1, 1] + ``kl_weight`` x the KL divergence to N(0, I) (both means
    over elements). Logs ``train/loss``, ``train/kl``, ``train/psnr`` and ``val/psnr`` (per-video PSNR
    of the uint8 round trip ``decode(encode(video))``, averaged).

    Args:
        spatial_factor, temporal_factor, latent_channels, width, depth: the VideoVAE's architecture.
        kl_weight: weight of the KL term.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to 10 %).
        warmup_steps: length of the warm-up.
        statistics_momentum: weight of the newest batch in the running latent statistics.
    """

    def __init__(
        self,
        spatial_factor: int = 4,
        temporal_factor: int = 4,
        latent_channels: int = 48,
        width: int = 96,
        depth: int = 2,
        kl_weight: float = 1e-5,
        learning_rate: float = 1e-3,
        warmup_steps: int = 50,
        statistics_momentum: float = 0.02,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_linear_start(spatial_factor, temporal_factor, latent_channels, width)
        self.vae = VideoVAE(spatial_factor, temporal_factor, latent_channels, width, depth)
        # Saved with the weights, so that a resumed run does not start over from the linear map.
        self.register_buffer("started", torch.tensor(False))

    def training_step(self, batch: dict[str, Any], batch_index: int) -> torch.Tensor:
        video = batch["video"]
        self.vae.check_video(video)
        if not self.started:
            self._linear_start(video)
        mean, logvar = self.vae.encode_posterior(video)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        mse = F.mse_loss(self.vae.decode_raw(z), to_unit_range(video).to(z.device))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + self.hparams.kl_weight * kl
        self._track_latent_statistics(mean.detach())
        batch_size = video.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/kl", kl, batch_size=batch_size)
        self.log("train/psnr", psnr(mse.detach(), 2.0), prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_index: int) -> None:
        video = batch["video"]
        reconstruction = self.vae.decode(self.vae.encode(video))
        mse = (reconstruction.float() - video.float().to(reconstruction.device)).pow(2).flatten(1).mean(1)
        self.log("val/psnr", psnr(mse, 255.0).mean(), prog_bar=True, batch_size=video.shape[0])

    @torch.no_grad()
    def _linear_start(self, video: torch.Tensor) -> None:
        """Begin from the principal components of the first batch (rank 0's, shared with every rank)."""
        self.vae.initialise_from(video)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in self.vae.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        self.started.fill_(True)

    @torch.no_grad()
    def _track_latent_statistics(self, mean: torch.Tensor) -> None:
        """Running per-channel mean and std of the posterior means (a plain average over the first steps)."""
        flat = mean.flatten(0, -2).float()
        weight = max(self.hparams.statistics_momentum, 1.0 / (self.global_step + 1))
        new_mean = torch.lerp(self.vae.latents_mean, flat.mean(0), weight)
        old_second_moment = self.vae.latents_std.pow(2) + self.vae.latents_mean.pow(2)
        second_moment = torch.lerp(old_second_moment, flat.pow(2).mean(0), weight)
        self.vae.set_normalisation(new_mean, (second_moment - new_mean.pow(2)).clamp_min(0).sqrt())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.vae.architecture()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate, betas=(0.9, 0.99),
                                      weight_decay=0.0)
        total = self.trainer.estimated_stepping_batches
        warmup = self.hparams.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def codec_commands(checkpoint: str, architecture: dict[str, Any]) -> tuple[str, str]:
    """How a training checkpoint of a VideoVAE serves as a codec: the ``encode-latents`` command and the
    Python line that saves it as a codec file (``vae.pt``)."""
    codec_args = json.dumps({"checkpoint": checkpoint, **architecture})
    return (f"flowvid data encode-latents SHARD_DIR --out LATENT_DIR --codec video_vae --codec-args "
            f"{shlex.quote(codec_args)}",
            f"VideoVAE.from_checkpoint({json.dumps(checkpoint)}).save(\"vae.pt\")")


def architecture_in(config: dict[str, Any]) -> dict[str, Any]:
    """The VideoVAE architecture a ``VideoVAEModule`` run's config gives (the constructor's defaults filled in)."""
    given = (config.get("model") or {}).get("init_args") or {}
    defaults = inspect.signature(VideoVAEModule).parameters
    return {key: given.get(key, defaults[key].default) for key in VideoVAE.ARCHITECTURE}
