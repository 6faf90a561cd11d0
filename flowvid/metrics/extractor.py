"""The FVD-extractor contract: uint8 videos -> one feature vector per video.

An extractor owns its network and preprocessing; ``FrechetVideoDistance`` owns the statistics and the
Fréchet math. Built-ins register in ``flowvid.registry.FVD_EXTRACTORS``; a plugin registers through
the ``flowvid.fvd_extractors`` entry-point group.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class FVDExtractor(nn.Module, ABC):
    """Maps uint8 videos ``(B, T, H, W, 3)`` to float features ``(B, feature_dim)``.

    Subclasses set ``feature_dim`` and implement ``features``; one that loads weights returns their
    hash from ``weights_hash``, and one whose constructor takes arguments that change the features
    (an input resolution, a layer) returns them from ``settings``: both are part of the key of cached
    reference statistics, so that these are never compared with other features. ``family`` is the
    first part of the logged name: ``"fvd"`` for the standard protocol, ``"fvd_proxy"`` for numbers
    that are not comparable to published FVD.
    """

    feature_dim: int
    family: str = "fvd"
    # The settings of the published protocol; others show in the protocol name (``i3d-resolution32``).
    standard_settings: ClassVar[dict[str, Any]] = {}

    @property
    def name(self) -> str:
        from flowvid.registry import FVD_EXTRACTORS

        return FVD_EXTRACTORS.name_of(type(self)) or type(self).__name__

    @property
    def weights_hash(self) -> str:
        """sha256 of the weights file (hex), or "" for an extractor without stored weights."""
        return ""

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that change the features, by name, with JSON values; not those that
        only change speed or memory, such as a batch size."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What reference statistics must share with these features: name, settings and weights hash."""
        # Through JSON, as a reference file stores the settings: a tuple would come back as a list.
        settings = json.loads(json.dumps(self.settings(), sort_keys=True))
        return {"extractor": self.name, "extractor_settings": settings, "weights_hash": self.weights_hash}

    @property
    def protocol_label(self) -> str:
        """The name, with every setting that departs from the standard protocol: ``i3d``, ``i3d-resolution32``."""
        departures = {key: value for key, value in self.settings().items() if self.standard_settings.get(key) != value}
        return settings_label(self.name, departures)

    @abstractmethod
    def features(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, H, W, 3)`` -> float ``(B, feature_dim)``."""


def build_extractor(spec: str | FVDExtractor, **kwargs: Any) -> FVDExtractor:
    """A registered name (constructed with ``kwargs``) or an extractor instance, returned as is."""
    from flowvid.registry import FVD_EXTRACTORS, resolve

    if isinstance(spec, FVDExtractor):
        if kwargs:
            raise ValueError(f"extractor arguments {sorted(kwargs)} given with an already built extractor {spec.name!r}")
        return spec
    extractor = resolve(FVD_EXTRACTORS, spec)(**kwargs)
    if not isinstance(extractor, FVDExtractor):
        raise ValueError(f"FVD extractor {spec!r} built a {type(extractor).__name__}, expected an FVDExtractor")
    return extractor


#: What each built-in extractor is for, in the commands' help; a plugin's is listed by its name.
EXTRACTOR_NOTES = {"i3d": "standard FVD, needs its weights", "inception-proxy": "FVD-proxy, offline",
                   "pixel-stats": "weight-free, for smoke tests"}


def extractor_help() -> str:
    """The registered FVD extractors, plugins included, for an ``--extractor`` option's help."""
    from flowvid.registry import FVD_EXTRACTORS  # the registry imports this module when it checks a class

    names = [f"{name} ({EXTRACTOR_NOTES[name]})" if name in EXTRACTOR_NOTES else name
             for name in FVD_EXTRACTORS.names()]
    return "registered FVD extractor: " + ", ".join(names)


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Convolutions and matmuls in full fp32 inside, the caller's TF32 settings restored after.

    CUDA GPUs from Ampere on run float32 cuDNN convolutions (and matmuls, where allowed) in TF32 by
    default: features, and so FVD, would then differ between GPU generations and from the CPU's.
    """
    settings = _fp32_precision_settings()
    precisions = [setting.fp32_precision for setting in settings]
    try:
        legacy = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:  # the caller set fp32_precision, which the old flags cannot report: set that only
        legacy = None
    if legacy is None:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:  # through the old flags, which keep both kinds of setting in step (cuBLAS refuses them apart)
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.backends.cudnn.allow_tf32, matmul_precision = legacy
            torch.set_float32_matmul_precision(matmul_precision)
        for setting, precision in zip(settings, precisions):
            setting.fp32_precision = precision


#: Under ``torch.backends``, parents first: where torch 2.9+ keeps ``fp32_precision``.
FP32_PRECISION_PATHS = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                        "mkldnn.rnn")


def _fp32_precision_settings() -> list[Any]:
    """Where torch 2.9+ keeps the float32 precision per backend and operation (``fp32_precision``),
    parents first; the old flags write there too, so their old values are put back from there."""
    found = [torch.backends] + [functools.reduce(lambda owner, name: getattr(owner, name, None), path.split("."),
                                                 torch.backends) for path in FP32_PRECISION_PATHS]
    return [setting for setting in found if hasattr(setting, "fp32_precision")]


def settings_label(name: str, settings: dict[str, Any]) -> str:
    """``name`` followed by the settings in key order: ``i3d-resolution32``; just ``name`` without settings."""
    return "-".join([name, *(f"{key}{value}" for key, value in sorted(settings.items()))])


def check_video(video: torch.Tensor) -> None:
    """Raise a ValueError unless ``video`` is uint8 ``(B, T, H, W, 3)``."""
    if not isinstance(video, torch.Tensor) or video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
        described = f"{video.dtype} {tuple(video.shape)}" if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {described}")


def resized_frames(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` -> float32 ``(B, T, 3, h, w)`` in [0, 255], bilinear, ``align_corners=False``.

    Resizing comes before any scaling: the order changes the result in floating point, and the
    standard FVD pipeline resizes the raw pixel values.
    """
    batch, frames, height, width, _ = video.shape
    frames_first = video.reshape(batch * frames, height, width, 3).permute(0, 3, 1, 2).float()
    if (height, width) != tuple(size):
        frames_first = F.interpolate(frames_first, size=size, mode="bilinear", align_corners=False)
    return frames_first.reshape(batch, frames, 3, *size)


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file; computed once per file version in a process."""
    stat = Path(path).stat()
    return _cached_sha256(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
