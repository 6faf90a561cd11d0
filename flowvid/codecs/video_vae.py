"""A small causal video autoencoder of our own: the trainable latent space for the demo.

Time is causal in the same way as the Wan VAE: the first frame is encoded alone, then every group of
``temporal_factor`` frames becomes one latent frame, so ``T = 1 + k * temporal_factor`` frames give
``1 + k`` latent frames, and latent frame n depends on frames up to the end of its group only.

The first frame is repeated ``temporal_factor - 1`` times in front so that every latent frame covers
a full group; each ``temporal_factor x spatial_factor x spatial_factor`` block of pixels is then
folded into channels, and a residual stack of causal 3-D convolutions (they see the current and
earlier latent frames, never later ones) works at latent resolution. The decoder mirrors it and drops
the repeated frames again. The posterior is a diagonal Gaussian (KL-regularised in training); the
codec encodes to its mean, normalised per channel by ``latents_mean`` and ``latents_std``.

Train it with :class:`flowvid.codecs.vae_training.VideoVAEModule` and load the result with
``VideoVAE.from_checkpoint(path)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowvid.checks import first_non_finite, is_count
from flowvid.codecs.base import LatentCodec
from flowvid.codecs.pixel import to_uint8, to_unit_range
from flowvid.files import TorchFileError, read_torch_file
from flowvid.registry import CODECS

#: Checkpoint entry that holds a VideoVAE's architecture (written by VideoVAEModule and VideoVAE.save).
CHECKPOINT_CONFIG_KEY = "video_vae_config"
#: Prefix of the VideoVAE's weights in a checkpoint's ``state_dict``.
STATE_PREFIX = "vae."


class CausalConv3d(nn.Conv3d):
    """Convolution over (time, height, width) that sees this frame and the one before, never a later one."""

    def __init__(self, in_channels: int, out_channels: int, spatial_kernel: int = 3, temporal_kernel: int = 2):
        kernel = (temporal_kernel, spatial_kernel, spatial_kernel)
        super().__init__(in_channels, out_channels, kernel, padding=(0, spatial_kernel // 2, spatial_kernel // 2))
        self.past = temporal_kernel - 1  # zero frames in front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 0, 0, 0, self.past, 0)))


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each position (a norm over time would leak the future)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * scale * self.weight[:, None, None, None]


class ResidualBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))``; the second convolution starts at zero (identity block)."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            ChannelRMSNorm(width), nn.SiLU(), CausalConv3d(width, width),
            ChannelRMSNorm(width), nn.SiLU(), CausalConv3d(width, width),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


def _stack(in_channels: int, width: int, depth: int, out_channels: int) -> nn.Sequential:
    """Pointwise read-in, residual blocks (spatial and temporal context), pointwise read-out."""
    return nn.Sequential(
        nn.Conv3d(in_channels, width, 1),
        *[ResidualBlock(width) for _ in range(depth)],
        nn.Conv3d(width, out_channels, 1),
    )


@CODECS.register("video_vae")
class VideoVAE(LatentCodec):
    """Causal video VAE: ``(B, 1 + k*tf, H, W, 3)`` uint8 <-> ``(B, 1 + k, H/sf, W/sf, latent_channels)``.

    Args:
        spatial_factor: sf, pixels per latent position along height and width.
        temporal_factor: tf, frames per latent frame after the first.
        latent_channels: channels of a latent position.
        width: channels inside the encoder and decoder.
        depth: residual blocks in each of them.
        checkpoint: a file written by ``VideoVAEModule`` (Lightning checkpoint) or ``VideoVAE.save``
            to load weights and normalisation from; its architecture must match the arguments above
            (``VideoVAE.from_checkpoint`` reads them from the file instead).
    """

    causal_first_frame = True

    def __init__(
        self,
        spatial_factor: int = 4,
        temporal_factor: int = 4,
        latent_channels: int = 48,
        width: int = 96,
        depth: int = 2,
        checkpoint: str | None = None,
    ):
        super().__init__()
        for name, value, least in (("spatial_factor", spatial_factor, 1), ("temporal_factor", temporal_factor, 1),
                                   ("latent_channels", latent_channels, 1), ("width", width, 1), ("depth", depth, 0)):
            if not (is_count(value) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = latent_channels
        self.width = width
        self.depth = depth
        patch_channels = 3 * temporal_factor * spatial_factor**2
        self.encoder = _stack(patch_channels, width, depth, 2 * latent_channels)
        self.decoder = _stack(latent_channels, width, depth, patch_channels)
        self.register_buffer("latents_mean", torch.zeros(latent_channels))
        self.register_buffer("latents_std", torch.ones(latent_channels))
        if checkpoint is not None:
            self._load(checkpoint)

    @classmethod
    def check_files(cls, checkpoint: str | None = None, **_: Any) -> None:
        if checkpoint is not None:
            check_checkpoint_exists(Path(checkpoint))

    # --- the codec ---------------------------------------------------------------------------------
    #: The constructor arguments that fix the shapes of the weights.
    ARCHITECTURE = ("spatial_factor", "temporal_factor", "latent_channels", "width", "depth")

    def architecture(self) -> dict[str, int]:
        """The values of ``ARCHITECTURE``."""
        return {key: getattr(self, key) for key in self.ARCHITECTURE}

    def config(self) -> dict[str, Any]:
        # Two trainings of one architecture give different latent spaces: the weights are part of it.
        return {**self.architecture(), "weights_sha256": self.weights_digest()}

    def normalisation(self) -> dict[str, list[float]]:
        return {"mean": self.latents_mean.tolist(), "std": self.latents_std.tolist()}

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, H, W, 3)`` -> the normalised posterior mean ``(B, t, h, w, c)``, in the codec's own
        precision whatever the autocast context (latents made on the fly equal those of latent shards)."""
        self.check_video(video)
        with torch.autocast(self.latents_mean.device.type, enabled=False):
            mean, _ = self.encode_posterior(video)
            return self.normalise(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        latents = latents.to(self.latents_mean.device, self.latents_mean.dtype)
        with torch.autocast(self.latents_mean.device.type, enabled=False):
            return to_uint8(self.decode_raw(self.denormalise(latents)))

    # --- the pieces training uses ------------------------------------------------------------------
    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 video -> posterior mean and log-variance ``(B, t, h, w, c)``, before normalisation."""
        h = self.encoder(self._pixel_blocks(video))
        mean, logvar = h.movedim(1, -1).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents ``(B, t, h, w, c)`` -> float video ``(B, T, H, W, 3)``, about [-1, 1], unclamped."""
        x = self._unfold(self.decoder(latents.movedim(-1, 1)))
        return x[:, :, self.temporal_factor - 1:].permute(0, 2, 3, 4, 1)

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latents_mean) / self.latents_std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latents_std + self.latents_mean

    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of the posterior mean, so that encoded latents have zero mean and unit std."""
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"expected mean and std of shape ({self.latent_channels},), "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.latents_mean.copy_(mean)
        self.latents_std.copy_(std.clamp_min(1e-6))

    @torch.no_grad()
    def initialise_from(self, video: torch.Tensor) -> None:
        """Start as the best linear autoencoder of ``video``: whitened principal components of its pixel blocks.

        The residual blocks start as the identity, so after this the encoder projects every pixel
        block onto its top ``latent_channels`` components (scaled to unit variance) and the decoder
        maps them back; the other channels of the read-in keep their random start, so the network
        still sees every pixel. Training then only has to learn what is not linear: minutes on a
        CPU rather than hours from a random start.
        """
        self.check_video(video)
        channels = self.latent_channels
        blocks = self._pixel_blocks(video).movedim(1, -1).flatten(0, -2).double()  # positions, block values
        if self.width < channels or blocks.shape[0] < channels or blocks.shape[1] < channels:
            raise ValueError(f"a linear start needs width >= latent_channels, at least {channels} latent positions and "
                             f"pixel blocks of at least {channels} values (3 x {self.temporal_factor} x "
                             f"{self.spatial_factor}^2 = {blocks.shape[1]}); got width {self.width} and "
                             f"{blocks.shape[0]} positions: use fewer latent channels or larger factors")
        centre = blocks.mean(0)
        _, singular, components = torch.linalg.svd(blocks - centre, full_matrices=False)
        basis = components[:channels]  # latent_channels x block values
        spread = (singular[:channels] / blocks.shape[0] ** 0.5).clamp_min(1e-3)  # std along each component
        encoder_in, encoder_out = self.encoder[0], self.encoder[-1]
        decoder_in, decoder_out = self.decoder[0], self.decoder[-1]
        identity = torch.eye(channels)
        encoder_in.weight[:channels, :, 0, 0, 0] = (basis / spread[:, None]).float()
        encoder_in.bias[:channels] = -(basis @ centre / spread).float()
        encoder_out.weight.zero_()
        encoder_out.weight[:channels, :channels, 0, 0, 0] = identity
        encoder_out.bias.zero_()
        encoder_out.bias[channels:] = -10.0  # posterior std e^-5: nearly deterministic at first
        decoder_in.weight[:channels, :, 0, 0, 0] = identity
        decoder_in.bias[:channels] = 0.0
        decoder_out.weight.zero_()
        decoder_out.weight[:, :channels, 0, 0, 0] = (basis * spread[:, None]).T.float()
        decoder_out.bias.copy_(centre.float())
        for block in (*self.encoder[1:-1], *self.decoder[1:-1]):
            nn.init.zeros_(block.layers[-1].weight)
            nn.init.zeros_(block.layers[-1].bias)

    def _pixel_blocks(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, H, W, 3)`` -> ``(B, 3*tf*sf*sf, t, h, w)``, the first frame repeated in front."""
        # In the weights' precision: bf16 under `precision: bf16-true`.
        x = to_unit_range(video).to(self.latents_mean.device, self.latents_mean.dtype).permute(0, 4, 1, 2, 3)
        first = x[:, :, :1].expand(-1, -1, self.temporal_factor - 1, -1, -1)
        return self._fold(torch.cat([first, x], dim=2))

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, tf*t, sf*h, sf*w) -> (B, 3*tf*sf*sf, t, h, w)."""
        b, c, frames, height, width = x.shape
        tf, sf = self.temporal_factor, self.spatial_factor
        x = x.reshape(b, c, frames // tf, tf, height // sf, sf, width // sf, sf)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, c * tf * sf * sf, frames // tf, height // sf, width // sf)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        tf, sf = self.temporal_factor, self.spatial_factor
        x = x.reshape(b, 3, tf, sf, sf, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, 3, t * tf, h * sf, w * sf)

    # --- files -------------------------------------------------------------------------------------
    def weights_digest(self) -> str:
        """sha256 (16 hex digits) over every weight and normalisation buffer, in name order."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write weights and architecture only, in the layout ``from_checkpoint`` reads."""
        state = {STATE_PREFIX + key: value.cpu() for key, value in self.state_dict().items()}
        torch.save({CHECKPOINT_CONFIG_KEY: self.architecture(), "state_dict": state}, path)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "VideoVAE":
        """Build the VAE a checkpoint describes and load its weights (and normalisation)."""
        return cls(**read_checkpoint(path)[CHECKPOINT_CONFIG_KEY], checkpoint=str(path))

    def _load(self, path: str | Path) -> None:
        checkpoint = read_checkpoint(path)
        stored = checkpoint[CHECKPOINT_CONFIG_KEY]
        if stored != self.architecture():
            arguments = json.dumps({**stored, "checkpoint": str(path)})
            raise ValueError(f"checkpoint {path} holds a VideoVAE with {stored}, but this one was built with "
                             f"{self.architecture()}; give its architecture with the checkpoint (init_args, or "
                             f"--codec-args '{arguments}'), or use VideoVAE.from_checkpoint({str(path)!r})")
        state = {key[len(STATE_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
                 if key.startswith(STATE_PREFIX)}
        if (mismatch := weights_mismatch(self.state_dict(), state)) is not None:
            raise ValueError(f"checkpoint {path} does not hold the weights of the VideoVAE it describes ({mismatch}); "
                             "train the VideoVAE again (`flowvid fit --config recipes/codecs/video_vae_shapes.yaml`)")
        if (damaged := first_non_finite(state.items())) is not None:
            raise ValueError(f"checkpoint {path} is damaged: {damaged} holds NaN or infinite values; train the "
                             "VideoVAE again (`flowvid fit --config recipes/codecs/video_vae_shapes.yaml`)")
        self.load_state_dict(state)


def check_linear_start(spatial_factor: int, temporal_factor: int, latent_channels: int, width: int) -> None:
    """Raise a ValueError, in one line, unless training can begin from the linear start
    (``initialise_from``): it gives each latent channel an inner channel and a principal component of the
    pixel blocks. Checked when the training module is built, so that ``flowvid fit`` refuses it before any
    step; a VAE only used as a codec needs no linear start."""
    if width < latent_channels:
        raise ValueError(f"width {width} is less than latent_channels {latent_channels}: the linear start training "
                         f"begins from needs width >= latent_channels; use width >= {latent_channels} (or fewer "
                         "latent channels)")
    block_values = 3 * temporal_factor * spatial_factor**2
    if block_values < latent_channels:
        raise ValueError(f"latent_channels {latent_channels} is more than the {block_values} values of a pixel block "
                         f"(3 x temporal_factor {temporal_factor} x spatial_factor {spatial_factor}^2): the linear "
                         "start training begins from gives each latent channel a principal component of them; use "
                         f"at most {block_values} latent channels, or larger factors")


def weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``found`` from loading in place of ``expected`` ("missing: a, b; other shape: c"), or None.
    Said in one line, where ``load_state_dict`` would list every key over several."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & found.keys() if expected[key].shape != found[key].shape)
    problems = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
                if names]
    return "; ".join(problems) or None


def check_checkpoint_exists(path: Path) -> None:
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"), key=lambda file: file.stat().st_mtime)
        hint = f"give the checkpoint file, such as {found[-1]}" if found else "it holds no .ckpt file"
        raise FileNotFoundError(f"VideoVAE checkpoint {path} is a folder, not a checkpoint file: {hint}")
    if not path.is_file():
        raise FileNotFoundError(
            f"VideoVAE checkpoint {path} does not exist; train one with "
            f"`flowvid fit --config recipes/codecs/video_vae_shapes.yaml` (it writes a .ckpt file)"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a VideoVAE checkpoint file, with one clear error if it is missing or of another kind."""
    path = Path(path)
    check_checkpoint_exists(path)
    try:
        checkpoint = read_torch_file(path, "VideoVAE checkpoint")
    except ValueError as err:
        raise ValueError(f"{path} is not a VideoVAE checkpoint{_load_failure(err)}; train one with "
                         "`flowvid fit --config recipes/codecs/video_vae_shapes.yaml`") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_CONFIG_KEY not in checkpoint:
        raise ValueError(f"{path} is not a VideoVAE checkpoint ({_what_it_holds(checkpoint)}); give a checkpoint of "
                         "`flowvid fit --config recipes/codecs/video_vae_shapes.yaml`, or a file of VideoVAE.save")
    return checkpoint


#: The entry a flow model's checkpoint records its run in (``flowvid.lit.checkpointing.METADATA_KEY``;
#: named here because codecs do not import the training code).
FLOW_RUN_KEY = "flowvid_run"


def _what_it_holds(checkpoint: Any) -> str:
    """Why a file that torch reads is not a VideoVAE checkpoint, in a few words."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a checkpoint"
    state = checkpoint.get("state_dict")
    if FLOW_RUN_KEY in checkpoint or (isinstance(state, dict) and any(str(key).startswith("flow.") for key in state)):
        return "it is the checkpoint of a flow model, a video generator, not of a VideoVAE"
    return f"it has no {CHECKPOINT_CONFIG_KEY!r} entry"


def _load_failure(err: ValueError) -> str:
    """What kept torch from reading a file (``read_torch_file``'s problem), as " (problem)"."""
    return f" ({err.problem})" if isinstance(err, TorchFileError) else ""
