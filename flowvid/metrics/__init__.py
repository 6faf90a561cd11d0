"""Video metrics: Fréchet distance, FVD / FVD-proxy (torchmetrics) with their extractors, bits/dim.

Importing this package registers the built-in FVD extractors: ``"i3d"`` (the standard FVD),
``"inception-proxy"`` (offline FVD-proxy) and ``"pixel-stats"`` (weight-free, for smoke tests); weights
are only read when an extractor is constructed.
"""

from flowvid.metrics.bits_per_dim import BitsPerDim
from flowvid.metrics.extractor import FVDExtractor, build_extractor, check_video, resized_frames
from flowvid.metrics.frechet import frechet_distance, mean_and_covariance, psd_sqrt
from flowvid.metrics.fvd import FrechetVideoDistance, ReferenceStats, protocol_name, reference_file_name
from flowvid.metrics.i3d import I3DExtractor, InceptionI3D, load_i3d_weights
from flowvid.metrics.inception_proxy import InceptionProxyExtractor, packaged_weights
from flowvid.metrics.pixel_stats import PixelStatsExtractor

__all__ = [
    "BitsPerDim",
    "FVDExtractor",
    "FrechetVideoDistance",
    "I3DExtractor",
    "InceptionI3D",
    "InceptionProxyExtractor",
    "PixelStatsExtractor",
    "ReferenceStats",
    "build_extractor",
    "check_video",
    "frechet_distance",
    "load_i3d_weights",
    "mean_and_covariance",
    "packaged_weights",
    "protocol_name",
    "psd_sqrt",
    "reference_file_name",
    "resized_frames",
]
