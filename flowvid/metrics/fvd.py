"""FrechetVideoDistance: a torchmetrics Metric that syncs across processes, and cached reference statistics.

Each process keeps, per set (real, generated), the float64 sums ``sum x``, ``sum x x^T`` and the count.
They are reduced by sum, so DDP and DeepSpeed give the statistics of the whole set with no extra code.
The real set can also come from a reference file computed once by ``flowvid data fvd-stats``
(``ReferenceStats``), keyed by extractor, its settings, weights hash, frames, resolution and sample count.

FVD depends on all of these, so the protocol is part of the logged name::

    fvd/i3d_f16_r64_n256                     standard I3D features, 16 frames of 64x64, 256 samples
    fvd/i3d-resolution32_f16_r64_n256        I3D on frames resized to 32x32, not 224x224: not standard
    fvd_proxy/inception-proxy_f16_r64_n256   the offline proxy: not comparable to published FVD
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from flowvid.metrics.extractor import FVDExtractor, build_extractor, check_video, settings_label, tf32_off
from flowvid.metrics.frechet import frechet_distance, mean_and_covariance
from flowvid.paths import write_atomically

_SETS = ("real", "fake")


def protocol_name(extractor: FVDExtractor, frames: int, height: int, width: int, num_samples: int) -> str:
    """``<family>/<extractor>_f<frames>_r<side or HxW>_n<samples>``, the name FVD is logged under; the
    extractor part names its settings that are not those of the standard protocol (``i3d-resolution32``)."""
    resolution = f"{height}" if height == width else f"{height}x{width}"
    return f"{extractor.family}/{extractor.protocol_label}_f{frames}_r{resolution}_n{num_samples}"


def reference_file_name(extractor: str, extractor_settings: dict[str, Any], weights_hash: str, frames: int,
                        height: int, width: int, num_samples: int) -> str:
    """A file name that spells out a reference key, e.g. ``i3d-resolution224_3f2a9c0d1b7e_f16_r64x64_n2048.npz``."""
    label = settings_label(extractor, extractor_settings)
    return f"{label}_{weights_hash[:12] or 'noweights'}_f{frames}_r{height}x{width}_n{num_samples}.npz"


def _open_npz(path: Path):
    """``np.load`` of an ``.npz``; numpy's error on another kind of file names neither the file nor the problem."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # a truncated .npz is a damaged zip
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an FVD reference file (an .npz written by `flowvid data fvd-stats`)")
    return data


def _known_rate(fps: float) -> float | None:
    """A frame rate as saved (NaN for unknown) -> the rate, or None."""
    return fps if math.isfinite(fps) and fps > 0 else None


@dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance of a real set's features, with everything they depend on.

    ``requested_samples`` is how many clips the computation asked for; it is more than
    ``num_samples`` when some could not be read (default: ``num_samples``). ``shards_sha256`` tells
    which shards they were read from, so that a kept file is never reused for other clips ("": unknown).
    ``fps`` is the frame rate of those clips, at which generated video files are read to compare with them
    (None: unknown).
    ``loaded_from`` is the file ``load`` read them from, for messages ("": not read from a file); it is not saved.
    """

    mu: np.ndarray
    sigma: np.ndarray
    extractor: str
    weights_hash: str
    frames: int
    height: int
    width: int
    num_samples: int
    extractor_settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    requested_samples: int | None = None
    shards_sha256: str = ""
    fps: float | None = None
    loaded_from: str = ""

    KEY_FIELDS = ("extractor", "extractor_settings", "weights_hash", "frames", "height", "width", "num_samples")

    def __post_init__(self) -> None:
        if self.requested_samples is None:
            object.__setattr__(self, "requested_samples", self.num_samples)

    def key(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.KEY_FIELDS}

    def identity_mismatch(self, extractor: FVDExtractor) -> tuple[str, Any, Any] | None:
        """The first field of ``extractor.identity()`` these statistics differ in: (field, theirs, the extractor's)."""
        for name, value in extractor.identity().items():
            if getattr(self, name) != value:
                return name, getattr(self, name), value
        return None

    def file_name(self) -> str:
        return reference_file_name(**self.key())

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(partial: Path) -> None:
            fields = {**self.key(), "extractor_settings": json.dumps(self.extractor_settings, sort_keys=True),
                      "requested_samples": self.requested_samples}
            with open(partial, "wb") as stream:
                np.savez(stream, mu=self.mu, sigma=self.sigma, source=np.str_(self.source),
                         shards_sha256=np.str_(self.shards_sha256), fps=np.float64(self.fps or np.nan),
                         **{name: np.asarray(value) for name, value in fields.items()})

        write_atomically(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FVD reference statistics {path} not found; compute them once with "
                                    f"`flowvid data fvd-stats RAW_SHARD_DIR --out {path}`")
        with _open_npz(path) as data:
            # Files written before the extractor settings were recorded hold none: they load, and fit only
            # an extractor without settings (an I3D reference of those days is refused, to be recomputed).
            missing = [name for name in ("mu", "sigma", *cls.KEY_FIELDS) if name not in data
                       and name != "extractor_settings"]
            if missing:
                raise ValueError(f"{path} is not an FVD reference file: it lacks {missing}")
            try:
                text = {name: str(data[name]) for name in ("extractor", "weights_hash")}
                numbers = {name: int(data[name]) for name in ("frames", "height", "width", "num_samples")}
                optional = {"source": str(data["source"]) if "source" in data else "",
                            "shards_sha256": str(data["shards_sha256"]) if "shards_sha256" in data else "",
                            "extractor_settings": json.loads(str(data["extractor_settings"]))
                            if "extractor_settings" in data else {},
                            "requested_samples": int(data["requested_samples"]) if "requested_samples" in data else None,
                            "fps": _known_rate(float(data["fps"])) if "fps" in data else None}
                stats = cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                            **text, **numbers, **optional, loaded_from=str(path))
            # TypeError, ValueError: a field of another type or shape, settings that are not JSON
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, TypeError, ValueError) as err:
                raise ValueError(f"{path} is a damaged FVD reference file ({err}); compute it again") from None
        problem = stats._contents_problem()
        if problem is not None:
            raise ValueError(f"{path} is a damaged FVD reference file ({problem}); compute it again")
        return stats

    def _contents_problem(self) -> str | None:
        """What makes these statistics unusable, found on loading rather than after every generated video."""
        dim = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.sigma.shape != (dim, dim):
            return f"mu {self.mu.shape} and sigma {self.sigma.shape} do not fit together"
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            return "its mean or covariance holds NaN or inf"
        if min(self.frames, self.height, self.width) < 1 or self.num_samples < 2:
            return (f"{self.frames} frames of {self.height}x{self.width} from {self.num_samples} samples; "
                    "statistics need at least 1 frame of 1x1 from 2 samples")
        return None


def _described_reference(stats: ReferenceStats) -> str:
    """``FVD reference FILE (computed from RAW_DIR)``, with what is known of the two."""
    file = f" {stats.loaded_from}" if stats.loaded_from else ""
    computed = f" (computed from {stats.source})" if stats.source else ""
    return f"FVD reference{file}{computed}"


def _extractor_keys(state_dict: dict[str, Any], prefix: str) -> list[str]:
    return [key for key in state_dict if key.startswith(f"{prefix}extractor.")]


def _leave_out_extractor(_metric: Metric, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """The extractor's weights come from their file, which the reference key names by hash: a module that
    holds the metric would otherwise carry them (51 MB for I3D) in every checkpoint."""
    for key in _extractor_keys(state_dict, prefix):
        del state_dict[key]


def _keep_own_extractor(metric: Metric, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Loading keeps the extractor as its file made it: a checkpoint holds none of its weights, or, written
    before they were left out, a copy that must not replace the weights the hash names."""
    for key in _extractor_keys(state_dict, prefix):
        del state_dict[key]
    state_dict.update({f"{prefix}extractor.{name}": tensor for name, tensor in metric.extractor.state_dict().items()})


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

    The extractor's weights are left out of the state dict: a LightningModule that holds the metric
    saves none of them in its checkpoints, and loading one keeps the weights read from their file.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, extractor: str | FVDExtractor = "inception-proxy", extractor_args: dict[str, Any] | None = None,
                 reset_real_features: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.extractor = build_extractor(extractor, **(extractor_args or {}))
        self.extractor.requires_grad_(False).eval()
        self.register_state_dict_post_hook(_leave_out_extractor)
        self.register_load_state_dict_pre_hook(_keep_own_extractor)
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
        """Use cached real statistics; they must come from this extractor, with its settings and weights."""
        stats = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
        real_count = int(self.real_features_num_samples)
        if real_count:  # compute() would use the reference alone and drop these without a word
            raise ValueError(f"this FVD metric already holds {real_count} real videos; a reference replaces them: "
                             "give reference statistics or real videos, not both")
        described = _described_reference(stats)
        recompute = f"recompute it with `flowvid data fvd-stats RAW_DIR --extractor {self.extractor.name}`"
        mismatch = stats.identity_mismatch(self.extractor)
        if mismatch is not None:
            name, theirs, ours = mismatch
            raise ValueError(f"{described} has {name} {theirs!r}, this metric's extractor has {ours!r}; {recompute}")
        if stats.mu.shape[0] != self.extractor.feature_dim:
            raise ValueError(f"{described} has {stats.mu.shape[0]} features, the extractor {self.extractor.name!r} "
                             f"gives {self.extractor.feature_dim}: it changed since; {recompute}")
        self._check_video_size((stats.frames, stats.height, stats.width), "the reference statistics")
        self.reference = stats

    def update(self, videos: torch.Tensor, real: bool) -> None:
        check_video(videos)
        if real and self.reference is not None:
            raise ValueError("real videos given to an FVD metric that uses reference statistics")
        self._check_video_size(tuple(videos.shape[1:4]), "these videos")
        # fp32 features, as the FVD protocol computes them: no autocast, no TF32 on a GPU.
        with torch.no_grad(), torch.autocast(videos.device.type, enabled=False), tf32_off():
            features = self.extractor.features(videos).double()
        self._check_features(features, len(videos))
        name = "real" if real else "fake"
        setattr(self, f"{name}_features_sum", getattr(self, f"{name}_features_sum") + features.sum(dim=0))
        setattr(self, f"{name}_features_cov_sum", getattr(self, f"{name}_features_cov_sum") + features.T @ features)
        setattr(self, f"{name}_features_num_samples", getattr(self, f"{name}_features_num_samples") + features.shape[0])

    def forward(self, videos: torch.Tensor, real: bool) -> None:
        """The same as ``update``, and returns nothing.

        torchmetrics' forward also returns the metric of the batch alone: it resets, updates, computes
        and adds the saved states back. An FVD of one batch means nothing (too few videos for a
        covariance), and the real statistics that ``reset`` keeps would be added twice.
        """
        self.update(videos, real=real)

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
        self.computed_samples = None  # the protocol name waits for the next compute()
        if self.reset_real_features:
            super().reset()
            self.video_size = self._reference_size()  # a reference keeps fixing the size of what comes
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
        return ReferenceStats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), frames=frames, height=height, width=width,
                              num_samples=count, source=source, **self.extractor.identity())

    def _reference_size(self) -> tuple[int, int, int] | None:
        stats = self.reference
        return None if stats is None else (stats.frames, stats.height, stats.width)

    def _check_features(self, features: torch.Tensor, count: int) -> None:
        """An extractor (a plugin's, say) that breaks its contract is named here, not by a shape error in the sums
        or by NaN statistics found at compute(), or saved by ``fvd-stats``. The videos are uint8, so NaN or inf
        features come from the extractor or its weights."""
        expected = (count, self.extractor.feature_dim)
        if tuple(features.shape) != expected:
            raise ValueError(f"FVD extractor {self.extractor.name!r} returned features of shape {tuple(features.shape)} "
                             f"for {count} videos, expected {expected} (batch, its feature_dim); fix its features() "
                             "or its feature_dim")
        non_finite = int((~torch.isfinite(features).all(dim=1)).sum())
        if non_finite:
            raise ValueError(f"FVD extractor {self.extractor.name!r} gave NaN or inf features for {non_finite} of "
                             f"the {count} videos of this batch; check its weights file and its features()")

    def _check_video_size(self, size: tuple[int, ...], what: str) -> None:
        size = tuple(int(s) for s in size)
        if self.video_size is None:
            self.video_size = size  # type: ignore[assignment]
        elif size != self.video_size:
            earlier = "those of the reference statistics" if self.reference is not None else "earlier ones"
            raise ValueError(f"FVD compares videos of one size (frames, height, width): {what} are {size}, "
                             f"{earlier} are {self.video_size}")
