"""Video data: shard folders (raw video or latents), their DataModules, and synthetic captioned videos.

The names below are imported when first used: ``flowvid data`` reads manifests without loading Lightning.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "flowvid.data.datamodule": ["SyntheticVideoDataModule", "VideoShardDataModule"],
    "flowvid.data.manifest": ["FORMAT_VERSION", "ManifestError", "load_manifest", "new_manifest", "write_manifest"],
    "flowvid.data.pipeline": ["ShardLoader", "ShardStream", "SkipCounter"],
    "flowvid.data.shards": ["SKIP_REASONS", "BadSample", "BrokenShard", "LostSamples", "SampleSpec",
                            "ShardFolderWriter", "decode_sample", "encode_sample", "iter_tar", "shard_samples"],
    "flowvid.data.synthetic": ["caption_adherence", "caption_of", "estimate_attributes", "render_video",
                               "sample_attributes", "write_synthetic_dataset"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module 'flowvid.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME_OF[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
