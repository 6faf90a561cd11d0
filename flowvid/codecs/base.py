"""The LatentCodec contract: uint8 video <-> the latent space the flow models."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from flowvid.checks import differences
from flowvid.fingerprint import json_fingerprint


class CodecMismatchError(ValueError):
    """Data, model or checkpoint were made with different codecs."""


class LatentCodec(nn.Module, ABC):
    """Maps videos ``(B, T, H, W, 3)`` uint8 to latents ``(B, t, h, w, c)`` float and back; a batch of
    no videos (B = 0) gives a batch of no latents of the same ``t, h, w, c``, and back.

    Subclasses set ``spatial_factor``, ``temporal_factor`` and ``latent_channels`` and implement
    ``encode``, ``decode`` and ``config``. ``identity()`` (name, config and a hash of the config) is
    written into every shard manifest and checkpoint so that a mismatch is caught before any step runs.
    """

    spatial_factor: int = 1
    temporal_factor: int = 1
    latent_channels: int = 3
    #: True when the first frame is encoded alone and the rest in groups (causal video VAEs):
    #: T frames become 1 + (T - 1) / temporal_factor latent frames.
    causal_first_frame: bool = False

    @classmethod
    def check_files(cls, **init_args: Any) -> None:
        """Raise FileNotFoundError, naming the file and how to get it, when a file the constructor with
        ``init_args`` would read is missing. The CLI asks before it builds any part of the model, so that
        a missing VAE is reported before a large flow is allocated. Default: nothing to read."""

    @property
    def name(self) -> str:
        """The short name the class's own package registers it under (its class name without one): the same
        whatever other installed package registers that name too."""
        from flowvid.registry import CODECS, load_plugins

        load_plugins()  # plugins register their names on first use
        return CODECS.name_of(type(self)) or type(self).__name__

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, H, W, 3)`` -> float32 latents ``(B, t, h, w, c)``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """float latents ``(B, t, h, w, c)`` -> uint8 video ``(B, T, H, W, 3)``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments that determine the latent space."""

    def latent_frames(self, num_frames: int) -> int:
        self.check_video_size(num_frames, None, None)
        if self.causal_first_frame:
            return 1 + (num_frames - 1) // self.temporal_factor
        return num_frames // self.temporal_factor

    def decoded_frames(self, latent_frames: int) -> int:
        """The video frames ``latent_frames`` latent frames decode to (the inverse of ``latent_frames``)."""
        if self.causal_first_frame:
            return 1 + (latent_frames - 1) * self.temporal_factor
        return latent_frames * self.temporal_factor

    def usable_frames(self, num_frames: int) -> int:
        """The most frames, at most ``num_frames``, that encode exactly (0 when not even one latent frame)."""
        if self.causal_first_frame:
            return (num_frames - 1) // self.temporal_factor * self.temporal_factor + 1 if num_frames >= 1 else 0
        return num_frames // self.temporal_factor * self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_video_size(num_frames, height, width)
        return (
            self.latent_frames(num_frames),
            height // self.spatial_factor,
            width // self.spatial_factor,
            self.latent_channels,
        )

    def check_video_size(self, num_frames: int | None, height: int | None, width: int | None) -> None:
        """Raise a ValueError naming the factor when a video size cannot be encoded exactly."""
        if num_frames is not None:
            usable = num_frames - 1 if self.causal_first_frame else num_frames
            if num_frames < 1 or usable % self.temporal_factor:
                form = (f"1 + {self.temporal_factor}k" if self.causal_first_frame
                        else "at least 1" if self.temporal_factor == 1 else f"a positive multiple of {self.temporal_factor}")
                raise ValueError(f"codec {self.name!r} needs a frame count of {form}, got {num_frames}")
        for side, value in (("height", height), ("width", width)):
            if value is not None and (value < 1 or value % self.spatial_factor):
                raise ValueError(
                    f"codec {self.name!r} needs {side} divisible by {self.spatial_factor}, got {value}; "
                    f"resize or crop the video first"
                )

    def normalisation(self) -> dict[str, list[float]] | None:
        """The per-channel ``{"mean": [...], "std": [...]}`` that ``encode`` already applies, if any.

        Recorded in shard manifests; ``None`` for codecs without one.
        """
        return None

    def check_video(self, video: torch.Tensor) -> None:
        """Raise a ValueError unless ``video`` is uint8 ``(B, T, H, W, 3)`` of a size this codec encodes
        (a TypeError when it is no torch.Tensor: numpy's uint8 is not torch's)."""
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"codec {self.name!r} expects a torch.Tensor of uint8 video (B, T, H, W, 3), got "
                            f"{type(video).__module__}.{type(video).__qualname__}"
                            + ("; convert it with torch.from_numpy(video)" if type(video).__module__ == "numpy"
                               else ""))
        if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
            raise ValueError(
                f"codec {self.name!r} expects uint8 video (B, T, H, W, 3), got {video.dtype} {tuple(video.shape)}"
            )
        self.check_video_size(*video.shape[1:4])

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise a ValueError unless ``latents`` is ``(B, t, h, w, latent_channels)`` with t, h, w >= 1."""
        if latents.dim() != 5 or latents.shape[-1] != self.latent_channels:
            raise ValueError(
                f"codec {self.name!r} expects latents (B, t, h, w, {self.latent_channels}), "
                f"got {tuple(latents.shape)}"
            )
        if min(latents.shape[1:4]) < 1:
            raise ValueError(f"codec {self.name!r} needs latents of at least one frame, row and column, "
                             f"got {tuple(latents.shape)}")

    def no_latents(self, video: torch.Tensor) -> torch.Tensor:
        """What ``encode`` gives for a batch of no videos: float32 ``(0, t, h, w, c)``, for codecs whose
        model cannot run on an empty batch."""
        return torch.zeros((0, *self.latent_shape(*video.shape[1:4])), device=video.device)

    def no_video(self, latents: torch.Tensor) -> torch.Tensor:
        """What ``decode`` gives for a batch of no latents: uint8 ``(0, T, H, W, 3)``."""
        _, frames, height, width, _ = latents.shape
        size = (self.decoded_frames(frames), height * self.spatial_factor, width * self.spatial_factor)
        return torch.zeros((0, *size, 3), dtype=torch.uint8, device=latents.device)

    def identity(self) -> dict[str, Any]:
        """The registered name, the package that defines the class, the config as JSON values and a hash
        of it: two codecs with the same name, package and hash make the same latents. The config is there
        so that a mismatch can say what differs."""
        from flowvid.registry import with_package

        config = self.config()
        return with_package({"name": self.name, "config_hash": json_fingerprint(config),
                             "config": json.loads(json.dumps(config, default=str))}, type(self))


def same_codec(first: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two codec identities are one codec: the same name and config hash, and the same package
    where both record one (identities recorded before they carried the package or the config still
    match those that do)."""
    return (first.get("name") == other.get("name") and first.get("config_hash") == other.get("config_hash")
            and same_where_recorded(first, other, "package"))


def same_where_recorded(first: dict[str, Any], other: dict[str, Any], key: str) -> bool:
    """Whether two identities agree on ``key``, or one of them (written before it was recorded) lacks it."""
    return key not in first or key not in other or first[key] == other[key]


def check_codec_identity(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise CodecMismatchError when two codec identities differ, naming the settings that differ when
    both identities carry their config (those written before it was recorded carry only its hash)."""
    if same_codec(expected, actual):
        return
    message = (f"{where} was made with codec {actual.get('name')!r} (config {actual.get('config_hash')}), "
               f"but this model uses {expected.get('name')!r} (config {expected.get('config_hash')})")
    if expected.get("name") == actual.get("name") and not same_where_recorded(expected, actual, "package"):
        raise CodecMismatchError(f"{message}: the name {expected.get('name')!r} is a codec of the package "
                                 f"{actual['package']} there and of {expected['package']} here; give the model "
                                 f"the codec class of {actual['package']} by its import path (class_path)")
    differing = config_differences(expected.get("config"), actual.get("config"))
    raise CodecMismatchError(message + (f": {differing}" if differing else ""))


def config_differences(expected: dict[str, Any] | None, actual: dict[str, Any] | None) -> str:
    """``"they differ in patch_size (1 there, 2 here)"``, "there" being the recorded side (``actual``),
    or "" when either config is unknown."""
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        return ""
    differing = differences(actual, expected)
    return f"they differ in {differing}" if differing else ""
