"""Video data: shard folders (raw video or latents), their DataModules, and synthetic captioned videos."""

from flowvid.data.datamodule import SyntheticVideoDataModule, VideoShardDataModule
from flowvid.data.manifest import FORMAT_VERSION, ManifestError, load_manifest, new_manifest, write_manifest
from flowvid.data.pipeline import ShardLoader, ShardStream, SkipCounter
from flowvid.data.shards import (
    SKIP_REASONS,
    BadSample,
    BrokenShard,
    LostSamples,
    SampleSpec,
    ShardFolderWriter,
    decode_sample,
    encode_sample,
    iter_tar,
    shard_samples,
)
from flowvid.data.synthetic import (
    caption_adherence,
    caption_of,
    estimate_attributes,
    render_video,
    sample_attributes,
    write_synthetic_dataset,
)

__all__ = [
    "FORMAT_VERSION",
    "SKIP_REASONS",
    "BadSample",
    "BrokenShard",
    "LostSamples",
    "ManifestError",
    "SampleSpec",
    "ShardFolderWriter",
    "ShardLoader",
    "ShardStream",
    "SkipCounter",
    "SyntheticVideoDataModule",
    "VideoShardDataModule",
    "caption_adherence",
    "caption_of",
    "decode_sample",
    "encode_sample",
    "estimate_attributes",
    "iter_tar",
    "load_manifest",
    "new_manifest",
    "render_video",
    "sample_attributes",
    "shard_samples",
    "write_manifest",
    "write_synthetic_dataset",
]
