"""FrechetVideoDistance: a torchmetrics Metric that syncs across processes, and cached reference statistics.

Each process keeps, per set (real, generated), the float64 sums ``sum x``, ``sum x x^T`` and the count.
They are reduced by sum, so DDP and DeepSpeed give the statistics of the whole set with no extra code.
The real set can also come from a reference file computed once by ``flowvid data fvd-stats``
(``ReferenceStats``), keyed by extractor, weights hash, frames, resolution and sample count.

FVD depends on all of these, so the protocol is part of the logged name::

    fvd/i3d_f16_r64_n256                     standard I3D features, 16 frames of 64x64, 256 samples
    fvd_proxy/inception-proxy_f16_r64_n256   the offline proxy: not comparable to published FVD
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from flowvid.metrics.extractor import FVDExtractor, build_extractor, check_video
from flowvid.metrics.frechet import frechet_distance, mean_and_covariance
from flowvid.paths import write_atomically

_SETS = ("real", "fake")


def protocol_name(extractor: FVDExtractor, frames: int, height: int, width: int, num_samples: int) -> str:
    """``<family>/<extractor>_f<frames>_r<side or HxW>_n<samples>``, the name FVD is logged under."""
    resolution = f"{height}" if height == width else f"{height}x{width}"
    return f"{extractor.family}/{extractor.name}_f{frames}_r{resolution}_n{num_samples}"


def reference_file_name(extractor: str, weights_hash: str, frames: int, height: int, width: int, num_samples: int) -> str:
    """A file name that spells out a reference key, e.g. ``i3d_3f2a9c0d1b7e_f16_r64x64_n2048.npz``."""
    return f"{extractor}_{weights_hash[:12] or 'noweights'}_f{frames}_r{height}x{width}_n{num_samples}.npz"


def _open_npz(path: Path):
    """``np.load`` of an ``.npz``; numpy's error on another kind of file names neither the file nor the problem."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # a truncated .npz is a damaged zip
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an FVD reference file (an .npz written by `flowvid data fvd-stats`)")
    return data


@dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance of a real set's features, with everything they depend on."""

    mu: np.ndarray
    sigma: np.ndarray
    extractor: str
    weights_hash: str
    frames: int
    height: int
    width: int
    num_samples: int
    source: str = ""

    KEY_FIELDS = ("extractor", "weights_hash", "frames", "height", "width", "num_samples")

    def key(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.KEY_FIELDS}

    def file_name(self) -> str:
        return reference_file_name(**self.key())

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(partial: Path) -> None:
            with open(partial, "wb") as stream:
                np.savez(stream, mu=self.mu, sigma=self.sigma, source=np.str_(self.source),
                         **{name: np.asarray(value) for name, value in self.key().items()})

        write_atomically(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FVD reference statistics {path} not found; compute them once with "
                                    f"`flowvid data fvd-stats RAW_SHARD_DIR --out {path}`")
        with _open_npz(path) as data:
            missing = [name for name in ("mu", "sigma", *cls.KEY_FIELDS) if name not in data]
            if missing:
                raise ValueError(f"{path} is not an FVD reference file: it lacks {missing}")
            try:
                text = {name: str(data[name]) for name in ("extractor", "weights_hash")}
                numbers = {name: int(data[name]) for name in ("frames", "height", "width", "num_samples")}
                source = str(data["source"]) if "source" in data else ""
                stats = cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64), source=source,
                            **text, **numbers)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                raise ValueError(f"{path} is a damaged FVD reference file ({err}); compute it again") from None
        dim = stats.mu.shape[0]
        if stats.mu.ndim != 1 or stats.sigma.shape != (dim, dim):
            raise ValueError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} do not fit together")
        return stats


class FrechetVideoDistance(Metric):
    """FVD (or FVD-proxy) between generated videos and a real set.

    ``update(videos, real=...)`` takes uint8 ``(B, T, H, W, 3)``. The real set is either accumulated
    the same way or loaded with ``set_reference`` from a file of ``flowvid data fvd-stats``; a
    reference is held by every process as it is and never summed across them.

    Args:
        extractor: a registered FVD extractor name (``"i3d"``, ``"inception-proxy"``) or an instance.
        extractor_args: constructor arguments for a named extractor, e.g. ``{"weights": path}``.
        reset_real_features: whether ``reset()`` also clears the real statistics (default: kept, as
            they do not change between evaluations).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, extractor: str | FVDExtractor = "inception-proxy", extractor_args: dict[str, Any] | None = None,
                 reset_real_features: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.extractor = build_extractor(extractor, **(extractor_args or {}))
        self.extractor.requires_grad_(False).eval()
        self.reset_real_features = reset_real_features
        dim = self.extractor.feature_dim
        for name in _SETS:
            self.add_state(f"{name}_features_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_features_cov_sum", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_features_num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.reference: ReferenceStats | None = None
        self.video_size: tuple[int, int, int] | None = None  # (frames, height, width) of every video seen
        self.computed_samples: int | None = None  # generated videos behind the last compute(), all processes

    def set_reference(self, reference: ReferenceStats | str | Path) -> None:
        """Use cached real statistics; they must come from this extractor with the same weights."""
        stats = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
        ours = {"extractor": self.extractor.name, "weights_hash": self.extractor.weights_hash}
        for field, value in ours.items():
            if getattr(stats, field) != value:
                raise ValueError(f"FVD reference {stats.source or 'statistics'} has {field} {getattr(stats, field)!r}, "
                                 f"this metric's extractor has {value!r}; recompute it with `flowvid data fvd-stats`")
        if stats.mu.shape[0] != self.extractor.feature_dim:
            raise ValueError(f"FVD reference has {stats.mu.shape[0]} features, the extractor gives {self.extractor.feature_dim}")
        self._check_video_size((stats.frames, stats.height, stats.width), "the reference statistics")
        self.reference = stats

    def update(self, videos: torch.Tensor, real: bool) -> None:
        check_video(videos)
        if real and self.reference is not None:
            raise ValueError("real videos given to an FVD metric that uses reference statistics")
        self._check_video_size(tuple(videos.shape[1:4]), "these videos")
        with torch.no_grad(), torch.autocast(videos.device.type, enabled=False):
            features = self.extractor.features(videos).double()
        name = "real" if real else "fake"
        setattr(self, f"{name}_features_sum", getattr(self, f"{name}_features_sum") + features.sum(dim=0))
        setattr(self, f"{name}_features_cov_sum", getattr(self, f"{name}_features_cov_sum") + features.T @ features)
        setattr(self, f"{name}_features_num_samples", getattr(self, f"{name}_features_num_samples") + features.shape[0])

    def compute(self) -> torch.Tensor:
        fake_count = int(self.fake_features_num_samples)
        if fake_count < 2:
            raise ValueError(f"FVD needs at least 2 generated videos, got {fake_count}")
        mu_fake, sigma_fake = mean_and_covariance(self.fake_features_sum, self.fake_features_cov_sum, fake_count)
        if self.reference is not None:
            mu_real, sigma_real = torch.from_numpy(self.reference.mu), torch.from_numpy(self.reference.sigma)
        else:
            real_count = int(self.real_features_num_samples)
            if real_count < 2:
                raise ValueError(f"FVD needs at least 2 real videos (or set_reference), got {real_count}")
            mu_real, sigma_real = mean_and_covariance(self.real_features_sum, self.real_features_cov_sum, real_count)
        self.computed_samples = fake_count
        return torch.tensor(frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake), dtype=torch.float64)

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            self.video_size = None
            return
        kept = {name: getattr(self, name).clone() for name in self._defaults if name.startswith("real_")}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    @property
    def protocol_name(self) -> str:
        """Where this FVD is logged, e.g. ``fvd_proxy/inception-proxy_f16_r64_n256``; known after compute()."""
        if self.video_size is None or self.computed_samples is None:
            raise RuntimeError("the FVD protocol (frames, resolution, sample count) is known after update() and compute()")
        return protocol_name(self.extractor, *self.video_size, self.computed_samples)

    def real_statistics(self, source: str = "") -> ReferenceStats:
        """The accumulated real set as ReferenceStats, to cache with ``save``. Call it in one process
        (or after the real states were synced): it reads this process's sums."""
        count = int(self.real_features_num_samples)
        mu, sigma = mean_and_covariance(self.real_features_sum, self.real_features_cov_sum, count)
        if self.video_size is None:
            raise RuntimeError("no real videos were given")
        frames, height, width = self.video_size
        return ReferenceStats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), extractor=self.extractor.name,
                              weights_hash=self.extractor.weights_hash, frames=frames, height=height, width=width,
                              num_samples=count, source=source)

    def _check_video_size(self, size: tuple[int, ...], what: str) -> None:
        size = tuple(int(s) for s in size)
        if self.video_size is None:
            self.video_size = size  # type: ignore[assignment]
        elif size != self.video_size:
            raise ValueError(f"FVD compares videos of one size (frames, height, width): {what} are {size}, "
                             f"earlier ones {self.video_size}")
