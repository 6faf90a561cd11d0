"""``encode-latents``: raw clip shards -> latent shards through a registered codec.

    flowvid data encode-latents RAW_DIR --out DIR [--codec pixel] [--codec-args JSON]
                                [--text-encoder NAME [--text-encoder-args JSON]] [--first-frame]
                                [--batch-size 8] [--device auto] [--shard-samples 1000]

The manifest records the codec's identity (name, config and config hash, checked against the model at
training time), the latent shape, the per-channel mean and std measured over all written latents,
the codec's own normalisation when it has one (``latents_mean`` / ``latents_std``) and the clips
skipped (a broken raw shard, or one whose sha256 differs from the raw manifest's, as one entry with
the number of ``samples`` it lost: a changed shard gives none). A frozen text
encoder's embeddings can be cached with the latents. Codec and text-encoder arguments are
checked before anything is written, and a run replaces earlier shards in DIR only when it writes at
least one latent.

Under torchrun every process encodes every N-th raw shard on its own GPU (``--device auto``), and the
first one assembles the folder once all are done (a gloo process group carries the bookkeeping)::

    torchrun --nproc-per-node 8 --no-python flowvid data encode-latents RAW_DIR --out DIR --codec wan2.2 \\
        --codec-args '{"path": "Wan2.2-TI2V-5B/vae"}'

The latents of every clip are those a single process writes; only their grouping into shards differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from data_tools.arguments import build_registered
from data_tools.report import console, print_summary, progress_bar
from flowvid.checks import json_object
from flowvid.cli import exit_statuses
from flowvid.codecs.base import LatentCodec
from flowvid.codecs.video_vae import VideoVAE
from flowvid.data.manifest import MANIFEST_NAME, load_manifest, new_manifest, video_shape, write_manifest
from flowvid.data.shards import (
    SHARD_PATTERN,
    BadSample,
    SampleSpec,
    ShardFolderWriter,
    decode_sample,
    encode_sample,
    keys_held_earlier,
    listed_samples,
    listed_sha256,
    replace_shard_folder,
    shard_paths,
    staging_folder,
)
from flowvid import paths
from flowvid.placement import add_device_argument, join_launch_group, resolve_device
from flowvid.registry import CODECS, TEXT_ENCODERS
from flowvid.text.base import TextEncoder
from flowvid.text.cache import cache_embeddings


EXIT_STATUS = exit_statuses("a latent is written", "none is (DIR is left as it was)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RAW_DIR", help="raw shard folder (from from-videos or make-synthetic)")
    parser.add_argument("--out", required=True, help="output latent shard folder (earlier shards there are replaced)")
    parser.add_argument("--codec", default="pixel", help="registered codec name (see `flowvid plugins`)")
    parser.add_argument("--codec-args", type=json_object, default={}, metavar="JSON",
                        help="codec constructor arguments as JSON")
    parser.add_argument("--text-encoder", default=None, help="also cache this registered text encoder's embeddings")
    parser.add_argument("--text-encoder-args", type=json_object, default={}, metavar="JSON",
                        help="text encoder arguments as JSON")
    parser.add_argument("--first-frame", action="store_true",
                        help="store each clip's first frame (first.npy) for image-to-video")
    parser.add_argument("--batch-size", type=int, default=8, help="clips run through the codec together")
    add_device_argument(parser)
    parser.add_argument("--shard-samples", type=int, default=1000, help="most samples per shard")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    rank, world_size = join_launch_group()
    device = resolve_device(args.device)
    codec = build_registered(CODECS, args.codec, args.codec_args, "--codec-args")
    check_trained(codec, args.codec_args)
    text_encoder = None
    if args.text_encoder:
        text_encoder = build_registered(TEXT_ENCODERS, args.text_encoder, args.text_encoder_args, "--text-encoder-args")
    raw, _ = check_request(args.source, args.out, codec, text_encoder)  # a request that cannot be done draws no bar
    started = time.perf_counter()
    with progress_bar(enabled=rank == 0) as bar:
        task = bar.add_task("clips", total=sum(shard["samples"] for shard in raw["shards"][rank::world_size]))
        manifest = encode_latents(
            args.source, args.out, codec, text_encoder=text_encoder, first_frame=args.first_frame,
            batch_size=args.batch_size, device=device, shard_samples=args.shard_samples,
            on_sample=lambda: bar.advance(task),
        )
    if rank != 0:
        return 0
    seconds = time.perf_counter() - started
    fields = {"written": manifest["samples"], "shards": manifest["num_shards"], "codec": manifest["codec"]["name"],
              "latent shape": tuple(manifest["latent_shape"]), "seconds": seconds,
              "clips_per_second": manifest["samples"] / seconds}
    skipped = manifest["skipped"]
    # With nothing written there is no summary file to read the rest in: list every skip.
    print_summary(f"encode-latents -> {args.out}", fields, skipped,
                  show=len(skipped) if not manifest["samples"] else 10)
    if manifest["samples"] == 0:
        console.print(f"[red]no latent written[/]: {args.out} is left as it was")
        return 1
    return 0


def check_trained(codec: LatentCodec, codec_args: dict[str, Any]) -> None:
    """Refuse a VideoVAE built without a checkpoint: its weights are a random start, and latents written
    with them are of no trained latent space."""
    if isinstance(codec, VideoVAE) and codec_args.get("checkpoint") is None:
        raise ValueError(f"codec {codec.name!r} needs its trained weights: give --codec-args "
                         "'{\"checkpoint\": \"PATH.ckpt\"}' (train one with "
                         "`flowvid fit --config recipes/codecs/video_vae_shapes.yaml`)")


def encode_latents(
    source: str | Path,
    out: str | Path,
    codec: LatentCodec,
    text_encoder: TextEncoder | None = None,
    first_frame: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    shard_samples: int = 1000,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Encode every usable clip of the raw folder ``source`` into latent shards in ``out``; returns the manifest.

    The latents are written to a staging folder and replace ``out``'s earlier shards only when there
    is at least one: a run that writes nothing (or fails) leaves ``out`` as it was. Under a process
    group each rank encodes every world-size-th raw shard and every rank returns the whole manifest.
    """
    raw, latent_shape = check_request(source, out, codec, text_encoder)
    codec = codec.to(device).eval()
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with staging_folder(out) as staging:
        part = _write_latents(source, raw, staging, codec, latent_shape, text_encoder, first_frame, batch_size,
                              device, shard_samples, on_sample, rank, world_size)
        parts = [part]
        if world_size > 1:
            parts = [None] * world_size
            dist.all_gather_object(parts, part)
        manifest = _manifest(raw, source, codec, latent_shape, text_encoder, first_frame, parts)
        if rank == 0 and manifest["samples"] > 0:  # a run that writes no latent keeps the previous run's shards
            _gather_shards(parts, staging)
            write_manifest(staging, manifest)
            replace_shard_folder(staging, out)
        if world_size > 1:
            dist.barrier()  # the other ranks' staging folders (and their shards) live until the folder is whole
    return manifest


def check_request(source: str | Path, out: str | Path, codec: LatentCodec,
                  text_encoder: TextEncoder | None) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The raw folder's manifest and the latent shape of its clips; a ValueError, before anything is read or
    written, when the latents of ``source`` cannot be written to ``out`` with ``codec`` and ``text_encoder``."""
    check_output_folder(source, out)
    raw = load_manifest(source)
    if raw["kind"] != "raw":
        raise ValueError(f"{source} holds {raw['kind']} shards; encode-latents reads raw video shards")
    if text_encoder is not None and text_encoder.trainable:
        raise ValueError(f"text encoder {text_encoder.identity()['name']!r} trains with the model: "
                         "its embeddings cannot be cached")
    frames, height, width = video_shape(raw)
    return raw, codec.latent_shape(frames, height, width)  # raises when the codec cannot take this size


def check_output_folder(source: str | Path, out: str | Path) -> None:
    """Raise a ValueError when ``out`` is the raw folder ``source`` (the latents would replace its shards),
    cannot be a folder, or holds a manifest the latents must not replace."""
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"the output folder {out} is the raw folder itself, whose shards it would replace; "
                         "write the latents to another folder")
    paths.check_output_folder(out, "output folder", "give a folder for the shards")
    _check_earlier_manifest(Path(out) / MANIFEST_NAME)


def _check_earlier_manifest(manifest: Path) -> None:
    """Raise a ValueError when ``manifest`` is not flowvid's (a user's file of that name) or lists raw shards:
    latents replace only latents, as raw clips cannot be made again from them."""
    if not manifest.is_file():
        return
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        content = None
    if not isinstance(content, dict) or "format_version" not in content:
        raise ValueError(f"{manifest} is not a flowvid manifest, and this run would replace it; give another "
                         "--out, or move that file away")
    if content.get("kind") == "raw":
        raise ValueError(f"the output folder {manifest.parent} holds raw shards, which the latents would replace; "
                         "give another --out, or remove those shards and their manifest.json first")


def _write_latents(
    source: str | Path,
    raw: dict[str, Any],
    out: Path,
    codec: LatentCodec,
    latent_shape: tuple[int, ...],
    text_encoder: TextEncoder | None,
    first_frame: bool,
    batch_size: int,
    device: str | torch.device,
    shard_samples: int,
    on_sample: Callable[[], None] | None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Encode every ``world_size``-th raw shard from ``rank`` into shards in ``out``; returns this part's
    shards, statistics, skipped clips and text shape, for ``_manifest``."""
    skipped: list[dict[str, Any]] = []
    stats = _ChannelStats(latent_shape[-1])
    text_shape = None
    with ShardFolderWriter(out, max_samples=shard_samples) as writer:
        every_shard = shard_paths(source, raw)
        held_earlier = keys_held_earlier(every_shard)
        shards = every_shard[rank::world_size]
        listed = [shard["samples"] for shard in raw["shards"]][rank::world_size]
        checksums = listed_sha256(raw)[rank::world_size]
        samples = _samples(shards, listed, checksums, SampleSpec.from_manifest(raw), skipped, on_sample, held_earlier)
        for group in _groups(samples, batch_size):
            with torch.inference_mode():
                video = torch.from_numpy(np.stack([s["video"] for s in group])).to(device)
                latents = codec.encode(video).float().cpu()
            if tuple(latents.shape) != (len(group), *latent_shape):
                raise ValueError(f"codec {codec.name!r} returned latents {tuple(latents.shape)}, "
                                 f"its latent_shape says {latent_shape}")
            if text_encoder is not None:
                tokens, mask = cache_embeddings(text_encoder, [s["caption"] for s in group])
                text_shape = tokens.shape[1:]
            for index, sample in enumerate(group):
                latent = latents[index].half().numpy()
                if not np.isfinite(latent).all():  # NaN from the codec, or beyond float16's range
                    skipped.append({"key": sample["key"], "reason": "non_finite_latent: NaN or inf as float16"})
                    continue
                if text_encoder is not None and not np.isfinite(np.asarray(tokens[index], dtype=np.float16)).all():
                    skipped.append({"key": sample["key"], "reason": "bad_text_embedding: NaN or inf as float16"})
                    continue
                stats.add(torch.from_numpy(latent))  # the float16 values written, which training reads
                extra: dict[str, Any] = {}
                if text_encoder is not None:
                    extra = {"text": tokens[index], "text_mask": mask[index]}
                if first_frame:
                    extra["first"] = sample["video"][0]
                writer.write(encode_sample(sample["key"], sample["caption"], sample["meta"], latent=latent, **extra))

    return {"folder": str(out), "shards": writer.shards, "stats": stats, "skipped": skipped,
            "text_shape": list(text_shape) if text_shape else None}


def _manifest(raw: dict[str, Any], source: str | Path, codec: LatentCodec, latent_shape: tuple[int, ...],
              text_encoder: TextEncoder | None, first_frame: bool, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of the folder the ``parts`` (in rank order) make together, shards numbered in that order."""
    stats = _ChannelStats(latent_shape[-1])
    for part in parts:
        stats.merge(part["stats"])
    mean, std = stats.result()
    shards = [{**shard, "name": SHARD_PATTERN % index}
              for index, shard in enumerate(shard for part in parts for shard in part["shards"])]
    return new_manifest(
        "latent",
        raw["video"],
        codec=codec.identity(),
        codec_config=json.loads(json.dumps(codec.config(), default=str)),
        latent_shape=list(latent_shape),
        latent_mean=mean,
        latent_std=std,
        codec_normalisation=_codec_normalisation(codec),
        text_encoder=text_encoder.identity() if text_encoder is not None else None,
        text_shape=next((part["text_shape"] for part in parts if part["text_shape"]), None),
        first_frame=first_frame,
        samples=sum(shard["samples"] for shard in shards),
        num_shards=len(shards),
        shards=shards,
        skipped=[item for part in parts for item in part["skipped"]],
        source={"tool": "encode-latents", "raw": str(source), "raw_samples": raw["samples"]},
    )


def _gather_shards(parts: list[dict[str, Any]], staging: Path) -> None:
    """Move every part's shards into ``staging`` under the names ``_manifest`` gave them (renamed in place
    within one file system, so a checksum stays true)."""
    sources = [Path(part["folder"]) / shard["name"] for part in parts for shard in part["shards"]]
    moving = [staging / f".moving-{index}" for index in range(len(sources))]
    for source, middle in zip(sources, moving):  # in two steps: one part's new names may be another's old ones
        os.replace(source, middle)
    for index, middle in enumerate(moving):
        os.replace(middle, staging / (SHARD_PATTERN % index))


def _samples(shards: list[Path], listed: list[int], checksums: list[str | None], spec: SampleSpec,
             skipped: list[dict[str, Any]], on_sample: Callable[[], None] | None,
             held_earlier: dict[str, frozenset[str]]) -> Iterator[dict[str, Any]]:
    """Decoded samples of raw shards in stored order; unusable ones are appended to ``skipped``, a broken
    shard or one whose bytes differ from its ``checksums`` entry once with the number of ``samples`` it
    lost, a repeated key as ``listed_samples`` finds it (with ``held_earlier`` over every raw shard, a
    process under torchrun drops what a single one does). Every shard is read once, so checking its sha256
    on the way costs no second read."""
    for sample in listed_samples(shards, listed, skipped, held_earlier, checksums):
        if on_sample is not None:
            on_sample()
        try:
            yield decode_sample(sample, spec)
        except BadSample as err:
            skipped.append({"key": sample.get("__key__", "?"), "reason": f"{err.reason}: {err}"})


def _groups(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    group: list[dict[str, Any]] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class _ChannelStats:
    """Running per-channel mean and std over every latent position, in float64."""

    def __init__(self, channels: int):
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add(self, latent: torch.Tensor) -> None:
        flat = latent.reshape(-1, latent.shape[-1]).double()
        self.total += flat.sum(0)
        self.squares += (flat**2).sum(0)
        self.count += flat.shape[0]

    def merge(self, other: "_ChannelStats") -> None:
        self.total += other.total
        self.squares += other.squares
        self.count += other.count

    def result(self) -> tuple[list[float] | None, list[float] | None]:
        if self.count == 0:
            return None, None
        mean = self.total / self.count
        std = (self.squares / self.count - mean**2).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()


def _codec_normalisation(codec: LatentCodec) -> dict[str, list[float]] | None:
    """What the codec says it applies (``normalisation()``), else its ``latents_mean`` / ``latents_std``."""
    normalisation = codec.normalisation() if hasattr(codec, "normalisation") else None
    if normalisation is not None:
        return {key: [float(v) for v in values] for key, values in normalisation.items()}
    mean, std = getattr(codec, "latents_mean", None), getattr(codec, "latents_std", None)
    if mean is None or std is None:
        return None
    return {"mean": torch.as_tensor(mean).flatten().tolist(), "std": torch.as_tensor(std).flatten().tolist()}


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["encode-latents", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
