"""``describe``: what a shard folder holds, read from its manifest, with a few of its captions.

    flowvid data describe DIR [DIR ...] [--captions 5] [--json]

Prints the kind of the folder (raw clips or latents), its samples, shards and size, the clips'
frames, resolution and duration, the codec and latent shape of latent shards, the cached text
embeddings and first frames, how the folder was made, the clips skipped while making it and the
first ``--captions`` captions of its first shard. Only the manifest and those few samples are read,
so a folder of any size is described at once; ``flowvid data verify`` reads everything. The
description goes to stdout (warnings to stderr); ``--json`` writes it as JSON for scripts instead of
the table. Every folder that can be is described; one that cannot (no finished manifest) is a one-line
error, and the command exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from data_tools.report import console, load_folder_manifest, print_error, print_summary, results
from flowvid.cli import exit_statuses
from flowvid.data.manifest import ManifestError, video_shape
from flowvid.data.shards import BrokenShard, iter_tar, shard_paths


EXIT_STATUS = exit_statuses("every folder is described")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="DIR", help="shard folders (each with manifest.json)")
    parser.add_argument("--captions", type=int, default=5, metavar="N",
                        help="show the first N captions of the first shard (0: none)")
    parser.add_argument("--json", action="store_true", help="write the descriptions to stdout as JSON")


def run(args: argparse.Namespace) -> int:
    if args.captions < 0:
        raise ValueError(f"--captions must be >= 0, got {args.captions}")
    descriptions = describe_each(args.folders, args.captions)
    for description in descriptions:
        for warning in description["warnings"]:
            console.print(f"[yellow]warning:[/] {warning} (run `flowvid data verify {description['folder']}`)")
    if args.json:
        if descriptions:
            json.dump(descriptions if len(args.folders) > 1 else descriptions[0], sys.stdout, indent=2)
            sys.stdout.write("\n")
    else:
        for description in descriptions:
            print_description(description)
    return 0 if len(descriptions) == len(args.folders) else 2


def describe_each(folders: list[str], captions: int) -> list[dict[str, Any]]:
    """The descriptions of the ``folders`` that are shard folders; each of the others is a one-line error,
    so that one mistyped path among several hides none of the rest."""
    descriptions = []
    for folder in folders:
        try:
            descriptions.append(describe_folder(folder, captions=captions))
        except ManifestError as err:
            print_error("describe", err)
    return descriptions


def describe_folder(folder: str | Path, captions: int = 5) -> dict[str, Any]:
    """What ``folder`` holds, as JSON-ready values; ManifestError when it is not a finished shard folder."""
    manifest = load_folder_manifest(folder)
    frames, height, width = video_shape(manifest)
    fps = manifest["video"].get("fps")
    clip_seconds = frames / fps if fps else None
    description: dict[str, Any] = {
        "folder": str(folder),
        "kind": manifest["kind"],
        "samples": manifest["samples"],
        "shards": manifest["num_shards"],
        "bytes": sum(shard.get("bytes", 0) for shard in manifest["shards"]),
        "video": {"frames": frames, "height": height, "width": width, "fps": fps, "clip_seconds": clip_seconds},
        "hours": manifest["samples"] * clip_seconds / 3600 if clip_seconds else None,
        "latent_shape": manifest.get("latent_shape"),
        "codec": manifest.get("codec"),
        "text_encoder": manifest.get("text_encoder"),
        "text_shape": manifest.get("text_shape"),
        "first_frame": bool(manifest.get("first_frame")),
        "source": manifest.get("source") or {},
        "skipped": manifest.get("skipped") or [],
    }
    warnings = shard_file_warnings(folder, manifest)
    description["captions"] = first_captions(folder, manifest, captions, warnings)
    description["warnings"] = warnings
    return description


def shard_file_warnings(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Listed shards that are missing or whose size is not the manifest's: found without reading them."""
    warnings = []
    for entry, path in zip(manifest["shards"], shard_paths(folder, manifest)):
        if not path.is_file():
            warnings.append(f"shard {entry['name']} is missing")
        elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
            size = path.stat().st_size
            warnings.append(f"shard {entry['name']} is {size} bytes, the manifest lists {entry['bytes']}")
    return warnings


def first_captions(folder: str | Path, manifest: dict[str, Any], count: int, warnings: list[str]) -> list[str]:
    """The captions of the first ``count`` samples of the first shard, in stored order. A first shard that
    breaks, or ends (a zero-filled one reads as empty) before it gives the samples its manifest lists, adds
    to ``warnings``."""
    captions: list[str] = []
    paths = shard_paths(folder, manifest)
    if not count or not paths or not paths[0].is_file():  # a missing shard is warned of already
        return captions
    read = 0
    try:
        for sample in iter_tar(paths[0]):
            read += 1
            caption = sample.get("txt")
            if caption is None:  # the last sample before damage may be cut short
                continue
            captions.append(caption.decode("utf-8", errors="replace"))
            if len(captions) == count:
                return captions
    except BrokenShard as err:
        warnings.append(f"{err}")
        return captions
    listed = manifest["shards"][0]["samples"]
    if read < listed:
        warnings.append(f"shard {paths[0].name} ends after {read} samples, the manifest lists {listed}")
    return captions


def print_description(description: dict[str, Any]) -> None:
    video = description["video"]
    fields: dict[str, Any] = {
        "kind": description["kind"],
        "samples": description["samples"],
        "shards": description["shards"],
        "size": _size(description["bytes"]),
        "clips": f"{video['frames']} frames of {video['height']}x{video['width']}"
                 + (f" at {video['fps']:g} fps ({video['clip_seconds']:.2f} s)" if video["fps"] else ""),
    }
    if description["hours"] is not None:
        fields["total duration"] = _duration(description["hours"] * 3600)
    if description["kind"] == "latent":
        codec = description["codec"]
        fields["codec"] = f"{codec['name']} (config {str(codec.get('config_hash', '?'))[:12]})"
        fields["latent shape"] = " x ".join(map(str, description["latent_shape"]))
    if description["text_encoder"]:
        encoder = description["text_encoder"]
        name = encoder.get("name", "?") if isinstance(encoder, dict) else encoder
        fields["cached text"] = f"{name}, {' x '.join(map(str, description['text_shape'] or []))}"
    fields["first frames"] = "yes" if description["first_frame"] else "no"
    fields["made by"] = _origin(description["source"])
    print_summary(f"describe {description['folder']}", fields, description["skipped"], show=3, to=results)
    for caption in description["captions"]:
        results.print(f"  [dim]caption[/] {caption}")


def _origin(source: dict[str, Any]) -> str:
    if source.get("generator") == "synthetic":
        return f"make-synthetic ({source.get('split', '?')} split)"
    if source.get("tool") == "from-videos":
        inputs = source.get("inputs") or []
        return f"from-videos of {', '.join(map(str, inputs[:2]))}" + (" ..." if len(inputs) > 2 else "")
    if source.get("tool") == "encode-latents":
        return f"encode-latents of {source.get('raw', '?')}"
    return json.dumps(source) if source else "unknown"


def _duration(seconds: float) -> str:
    """In the unit that shows it: a first folder of a few clips holds seconds, which hours would print as 0.00 h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["describe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
