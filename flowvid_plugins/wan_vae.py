"""The Wan video VAE as a flowvid codec, through diffusers' ``AutoencoderKLWan``.

STARFlow-V models the latent space of the Wan2.2 TI2V-5B VAE (48 channels, 16x spatial, 4x temporal,
causal: the first frame alone, then groups of four). Latents are normalised per channel with Wan's
tables, and latent frames 1: are multiplied by ``temporal_scale`` (0.6) after normalisation; decoding
undoes both in reverse order.

Weights come from a local diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``),
e.g. the ``vae/`` folder of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` copied to disk; nothing is downloaded.
Registered through the entry point ``wan2.2`` (group ``flowvid.codecs``).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flowvid.caller_warnings import warn_caller
from flowvid.codecs.base import LatentCodec
from flowvid.codecs.pixel import to_uint8, to_unit_range
from flowvid.fingerprint import json_fingerprint, weights_fingerprint
from flowvid_plugins.frozen import keep_out_of_checkpoints
from flowvid_plugins.pretrained import download_first, first_present, load_complete, reading

# Per-channel mean and std of the Wan2.2 TI2V-5B VAE's latents (from the Wan2.2 release); used when
# a 48-channel model's config does not carry its own tables.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json")


def check_wan_directory(path: str | Path) -> Path:
    """Raise one FileNotFoundError naming the directory and the files a diffusers VAE folder needs."""
    path = Path(path)
    has_config = (path / "config.json").is_file()
    has_weights = any((path / name).is_file() for name in _WEIGHT_FILES)
    if not (has_config and has_weights):
        if (path / "model_index.json").is_file() and (path / "vae").is_dir():
            raise FileNotFoundError(f"Wan VAE directory {path} holds a whole diffusers pipeline (model_index.json): "
                                    f"give its VAE folder, {path / 'vae'}")
        state = "does not exist" if not path.is_dir() else "is incomplete"
        raise FileNotFoundError(
            f"Wan VAE directory {path} {state}: expected config.json and one of {', '.join(_WEIGHT_FILES)} "
            f"(the vae/ folder of a diffusers Wan checkpoint, saved locally){download_first(path, 'vae')}"
        )
    return path


def load_wan_vae(directory: Path) -> Any:
    """``AutoencoderKLWan`` from ``directory``, refusing a config of another model and weights that do not fit
    it with one error naming the file."""
    from diffusers import AutoencoderKLWan

    config = directory / "config.json"
    with reading(config, "Wan VAE config"):
        settings = json.loads(config.read_text())
        model_type = settings.get("model_type")
        # diffusers writes the class into every model config, and loads one without it as the class asked for;
        # transformers (a text encoder's folder) writes a model_type instead.
        class_name = settings.get("_class_name", None if model_type else AutoencoderKLWan.__name__)
    if class_name != AutoencoderKLWan.__name__:
        described = f"model class {class_name}" if class_name else f"no diffusers model (model_type {model_type!r})"
        raise ValueError(f"{config} describes {described}, not AutoencoderKLWan: give the vae/ folder of a "
                         "diffusers Wan checkpoint")
    # Loaded in full rather than onto meta tensors, so that a weight the file lacks is reported, not left unset.
    load = partial(AutoencoderKLWan.from_pretrained, str(directory), low_cpu_mem_usage=False)
    return load_complete(load, first_present(directory, _WEIGHT_FILES), "Wan VAE weights")


def normalisation_tables(config: Any, config_file: Path | None = None) -> tuple[list[float], list[float]]:
    """The model config's ``latents_mean``/``latents_std`` when they fit ``z_dim``, else Wan2.2's 48-value tables
    (with a warning, once per file, when ``config_file`` itself gives tables of another length)."""
    mean, std = list(config.latents_mean or []), list(config.latents_std or [])
    if len(mean) == len(std) == config.z_dim:
        return mean, std
    if config.z_dim == len(WAN22_LATENTS_MEAN):
        if config_file is not None:
            _warn_tables_replaced(config_file, len(mean), len(std))
        return list(WAN22_LATENTS_MEAN), list(WAN22_LATENTS_STD)
    raise ValueError(f"the Wan VAE config has z_dim={config.z_dim} but normalisation tables of "
                     f"{len(mean)} and {len(std)} values; add latents_mean/latents_std of {config.z_dim} values")


_WARNED_TABLES: set[str] = set()


def _warn_tables_replaced(config_file: Path, mean_length: int, std_length: int) -> None:
    """Warn that Wan2.2's tables replace those ``config_file`` gives; silent when it gives none (diffusers then
    fills in Wan2.1's 16 values, and the Wan2.2 tables are what such a 48-channel folder means)."""
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    given = isinstance(settings, dict) and ("latents_mean" in settings or "latents_std" in settings)
    if not given or str(config_file.resolve()) in _WARNED_TABLES:
        return
    _WARNED_TABLES.add(str(config_file.resolve()))
    warn_caller(f"{config_file} has z_dim 48 but latents_mean of {mean_length} and latents_std of {std_length} "
                "values: normalising with Wan2.2 TI2V-5B's 48-value tables instead; give tables of 48 values "
                "there to use the model's own")


class WanVAECodec(LatentCodec):
    """``AutoencoderKLWan`` from a local directory, with Wan's normalisation and the temporal scale.

    Args:
        path: the diffusers VAE directory.
        temporal_scale: factor on latent frames 1: after normalisation (STARFlow-V uses 0.6).
        sample_posterior: encode to a posterior sample instead of its mean (STARFlow-V samples).
    """

    causal_first_frame = True

    @classmethod
    def check_files(cls, path: str, **_: Any) -> None:
        check_wan_directory(path)

    def __init__(self, path: str, temporal_scale: float = 0.6, sample_posterior: bool = False):
        super().__init__()
        try:
            import diffusers  # noqa: F401
        except ImportError as err:
            raise ImportError("the Wan VAE codec needs diffusers: pip install 'flowvid[codecs]'") from err
        if temporal_scale <= 0:
            raise ValueError(f"temporal_scale must be > 0, got {temporal_scale}")
        self.vae = load_wan_vae(check_wan_directory(path)).eval().requires_grad_(False)
        keep_out_of_checkpoints(self, "vae")
        config = self.vae.config
        self.latent_channels = config.z_dim
        self.spatial_factor = config.scale_factor_spatial
        self.temporal_factor = config.scale_factor_temporal
        self.temporal_scale = temporal_scale
        self.sample_posterior = sample_posterior
        mean, std = normalisation_tables(config, Path(path) / "config.json")
        self.register_buffer("latents_mean", torch.tensor(mean), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std), persistent=False)

    def train(self, mode: bool = True) -> "WanVAECodec":
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    def config(self) -> dict[str, Any]:
        # The model's config and weights (not the directory, which differs between machines) fix the latent
        # space: a fine-tuned or distilled VAE of the same config gives other latents.
        if not hasattr(self, "_weights_sha256"):  # frozen: computed once
            self._weights_sha256 = weights_fingerprint(self.vae)
        model = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        return {"model_config_sha256": json_fingerprint(model), "weights_sha256": self._weights_sha256,
                "temporal_scale": self.temporal_scale, "sample_posterior": self.sample_posterior,
                **self.normalisation()}

    def normalisation(self) -> dict[str, list[float]]:
        return {"mean": self.latents_mean.tolist(), "std": self.latents_std.tolist()}

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.check_video(video)
        if not len(video):
            return self.no_latents(video)  # the Wan VAE cannot run on an empty batch
        weight = next(self.vae.parameters())
        x = to_unit_range(video).permute(0, 4, 1, 2, 3).to(weight.device, weight.dtype)  # B, 3, T, H, W
        with torch.autocast(weight.device.type, enabled=False):  # the VAE's own precision, as for latent shards
            posterior = self.vae.encode(x).latent_dist
        z = self._posterior_sample(posterior, video) if self.sample_posterior else posterior.mode()
        z = z.float().permute(0, 2, 3, 4, 1)  # B, t, h, w, c
        z = (z - self.latents_mean) / self.latents_std
        return torch.cat([z[:, :1], z[:, 1:] * self.temporal_scale], dim=1)

    @staticmethod
    def _posterior_sample(posterior, video: torch.Tensor) -> torch.Tensor:
        """A sample of each video's posterior with noise seeded by its pixels: the same latents whatever the
        batch it is encoded in, the process, or what drew from the global generator before."""
        noise = torch.stack([
            torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
                int.from_bytes(hashlib.sha256(clip.cpu().numpy().tobytes()).digest()[:8], "little")))
            for clip in video])
        return posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        if not len(latents):
            return self.no_video(latents)
        z = torch.cat([latents[:, :1], latents[:, 1:] / self.temporal_scale], dim=1).float()
        z = z.to(self.latents_mean.device) * self.latents_std + self.latents_mean
        weight = next(self.vae.parameters())
        with torch.autocast(weight.device.type, enabled=False):
            video = self.vae.decode(z.permute(0, 4, 1, 2, 3).to(weight.dtype)).sample
        return to_uint8(video.permute(0, 2, 3, 4, 1))
