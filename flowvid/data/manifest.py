"""``manifest.json``: what a shard folder holds, written last so that a folder without one is unfinished.

Format (version 1)::

    {
      "format_version": 1,
      "kind": "raw" | "latent",
      "video": {"frames": T, "height": H, "width": W, "fps": F | null},
      "codec": null | {"name": ..., "config_hash": ..., "config": {...}},   # latent shards
      "codec_config": null | {...},                                 # the same config (older folders: only here)
      "latent_shape": null | [t, h, w, c],
      "latent_mean": null | [c floats], "latent_std": null | [c floats],   # measured on the shards
      "codec_normalisation": null | {"mean": [...], "std": [...]},         # the codec's own, if it has one
      "text_encoder": null | {...}, "text_shape": null | [L, D],           # cached text embeddings
      "first_frame": bool,                                                 # first.npy in every sample
      "samples": N, "num_shards": S,
      "shards": [{"name": "shard-000000.tar", "samples": n, "bytes": b, "sha256": "..."}],
      "skipped": [{"path" or "key": ..., "reason": ...}],
      "source": {...}                                               # how the folder was made
    }
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from flowvid.checks import is_count, is_positive_number

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("raw", "latent")
_REQUIRED = ("format_version", "kind", "video", "samples", "num_shards", "shards")
#: The shard folders of a dataset with a validation split, inside the folder given as its output.
SPLIT_FOLDERS = ("train", "val")


class ManifestError(ValueError):
    """A shard folder's manifest is missing, unreadable or inconsistent."""


def new_manifest(kind: str, video: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A manifest with every key present; shards and counts are filled in by the writer."""
    if kind not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}, got {kind!r}")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "video": dict(video),
        "codec": None,
        "codec_config": None,
        "latent_shape": None,
        "latent_mean": None,
        "latent_std": None,
        "codec_normalisation": None,
        "text_encoder": None,
        "text_shape": None,
        "first_frame": False,
        "samples": 0,
        "num_shards": 0,
        "shards": [],
        "skipped": [],
        "source": {},
    }
    unknown = set(fields) - set(manifest)
    if unknown:
        raise ValueError(f"unknown manifest fields {sorted(unknown)}")
    manifest.update(fields)
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write atomically (temporary name, then rename): a reader never sees half a manifest."""
    check_manifest(manifest, where=str(folder))
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check a folder's manifest; ManifestError says what is wrong."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found: {folder} is not a finished shard folder ({what_to_give(folder)})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not readable JSON: {err}") from err
    check_manifest(manifest, where=str(path))
    return manifest


def what_to_give(folder: str | Path) -> str:
    """The hint for a folder without a manifest: the ``train`` and ``val`` shard folders that
    ``make-synthetic`` and ``from-videos --val-fraction`` write inside it, else how to make one."""
    splits = [Path(folder) / split for split in SPLIT_FOLDERS if (Path(folder) / split / MANIFEST_NAME).is_file()]
    if splits:
        return f"it holds the shard folders {' and '.join(map(str, splits))}: give one of those"
    return "make one with `flowvid data from-videos` or `flowvid data make-synthetic`"


def check_manifest(manifest: Any, where: str) -> None:
    """Raise ManifestError when required keys are missing, a field has the wrong type or counts disagree."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: manifest must be a JSON object, got {type(manifest).__name__}")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ManifestError(f"{where}: manifest lacks {missing}")
    _check_version(manifest["format_version"], where)
    if manifest["kind"] not in KINDS:
        raise ManifestError(f"{where}: kind must be one of {KINDS}, got {manifest['kind']!r}")
    if manifest["kind"] == "latent" and (not manifest.get("codec") or not manifest.get("latent_shape")):
        raise ManifestError(f"{where}: latent shards need 'codec' and 'latent_shape' in the manifest")
    video = manifest["video"]
    if not isinstance(video, dict) or not all(_positive_int(video.get(key)) for key in ("frames", "height", "width")):
        raise ManifestError(f"{where}: 'video' must give frames, height and width as integers >= 1, got {video!r}")
    if video.get("fps") is not None and not is_positive_number(video["fps"]):
        raise ManifestError(f"{where}: video 'fps' must be a finite number > 0 or null, got {video['fps']!r}")
    _check_optional_fields(manifest, where)
    _check_shards(manifest, where)


def _check_version(version: Any, where: str) -> None:
    if is_count(version) and version > FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} was written by a newer flowvid, which this one "
                            f"(format_version {FORMAT_VERSION}) cannot read: upgrade flowvid")
    if not is_count(version) or version != FORMAT_VERSION:  # `true` equals 1 in Python, not in a manifest
        raise ManifestError(f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")


def _check_optional_fields(manifest: dict[str, Any], where: str) -> None:
    """The fields that may be null or absent: when given, of the type readers rely on."""
    for key in ("latent_shape", "text_shape"):
        value = manifest.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and value and all(map(_positive_int, value))):
            raise ManifestError(f"{where}: '{key}' must be a list of integers >= 1 or null, got {value!r}")
    for key in ("codec", "text_encoder", "source"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise ManifestError(f"{where}: '{key}' must be a JSON object or null, got {manifest[key]!r}")
    if not isinstance(manifest.get("first_frame", False), bool):
        raise ManifestError(f"{where}: 'first_frame' must be true or false, got {manifest['first_frame']!r}")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(item, dict) and isinstance(item.get("reason"), str)
                                                for item in skipped):
        raise ManifestError(f"{where}: 'skipped' must list objects with a 'reason'")


def _check_shards(manifest: dict[str, Any], where: str) -> None:
    for key in ("samples", "num_shards"):
        if not is_count(manifest[key]) or manifest[key] < 0:
            raise ManifestError(f"{where}: '{key}' must be an integer >= 0, got {manifest[key]!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(_shard_entry(shard) for shard in shards):
        raise ManifestError(f"{where}: 'shards' must list objects with a 'name', a 'sha256' and a count of "
                            "'samples' >= 0 (and of 'bytes', when given)")
    names = [shard["name"] for shard in shards]
    strange = [name for name in names if not _plain_file_name(name)]
    if strange:
        # A shard is read from the folder itself: a path would read another folder's files.
        raise ManifestError(f"{where}: shard names must be file names inside the folder, got {strange[0]!r}")
    repeated = next((name for name, count in Counter(names).items() if count > 1), None)
    if repeated is not None:
        raise ManifestError(f"{where}: shard {repeated} is listed more than once")
    if len(shards) != manifest["num_shards"]:
        raise ManifestError(f"{where}: num_shards is {manifest['num_shards']} but {len(shards)} shards are listed")
    listed = sum(shard["samples"] for shard in shards)
    if listed != manifest["samples"]:
        raise ManifestError(f"{where}: samples is {manifest['samples']} but the shards hold {listed}")


def _positive_int(value: Any) -> bool:
    return is_count(value) and value >= 1


def _plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _shard_entry(shard: Any) -> bool:
    return (isinstance(shard, dict) and isinstance(shard.get("name"), str) and isinstance(shard.get("sha256"), str)
            and is_count(shard.get("samples")) and shard["samples"] >= 0
            and is_count(shard.get("bytes", 0)) and shard.get("bytes", 0) >= 0)


def video_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(frames, height, width) of the clips a folder was made from."""
    video = manifest["video"]
    return (int(video["frames"]), int(video["height"]), int(video["width"]))


def codec_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The codec identity of latent shards, with its config: folders made before identities carried the
    config have it in ``codec_config`` only."""
    return {"config": manifest.get("codec_config"), **manifest["codec"]}
