"""``from-videos``: a folder or glob of video files plus captions -> raw clip shards with a manifest.

    flowvid data from-videos INPUT... --out DIR --frames N --size S [--fps F] [--stride K] [--captions FILE]
                             [--val-fraction 0.05]

Captions come from a CSV or JSONL of ``path,caption`` (paths relative to that file), else from a
sidecar named as the video without its extension, ``<video stem>.txt`` (``clip.txt`` for ``clip.mp4``;
``clip.mp4.txt`` is read too, and a video with both is skipped as ambiguous), else ``--default-caption``;
a video without one is skipped. A table's paths
and sidecars' names match as spelt, else up to Unicode normalisation (NFC). Files are decoded in
parallel; the output depends only on the inputs and options (not on --workers). Every skipped file
is listed with its reason in ``DIR/summary.json`` (with ``--val-fraction``: ``DIR/train/summary.json``
and ``DIR/val/summary.json``) and the manifest. A run replaces the shards of an earlier one only when
it writes at least one clip; one that writes none leaves ``DIR`` as it was (and lists every skip on
the console). ``DIR`` must not hold any of the input videos, nor a ``manifest.json`` that flowvid did
not write: both are refused before anything is read.

``--val-fraction F`` holds out about that share of the videos (never clips of a video on both sides):
their clips go to ``DIR/val`` and the others' to ``DIR/train``, the layout ``make-synthetic`` writes;
each of the two folders has its own manifest and ``summary.json`` (videos skipped before the split,
for want of a caption, are listed in ``train``'s). The two are replaced together, and only when each
gets a clip: a run whose held-out videos are all unusable leaves both as they were.
A video's side is a hash of its path below the INPUT it was found under (a file named directly: its
name), so adding videos later, under that input or another one, moves none of the others; at least
one video is held out and at least one kept. A file that several inputs name is one video.
A run into a ``DIR`` that holds the other layout (top-level shards, or ``train``/``val``) removes that
layout's manifests, the shards they list and their summaries once it has written its own.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data_tools.clips import Clips, ClipSpec, VideoSkipped, read_clips
from data_tools.report import console, print_summary, progress_bar
from flowvid.checks import is_positive_number
from flowvid.cli import exit_statuses
from flowvid.data.manifest import MANIFEST_NAME, new_manifest, write_manifest
from flowvid.data.shards import (DERIVED_FOLDERS, ShardFolderWriter, encode_sample, replace_shard_folder,
                                 staging_folder)
from flowvid.media import VIDEO_SUFFIXES


EXIT_STATUS = exit_statuses("a clip is written (with --val-fraction: into each folder)",
                            "none is (DIR is left as it was)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="video files, folders (searched recursively) or glob patterns")
    parser.add_argument("--out", required=True, help="output shard folder (earlier shards there are replaced)")
    parser.add_argument("--frames", type=int, required=True, help="frames per clip")
    parser.add_argument("--size", type=parse_size, required=True,
                        help="clip size: S (square) or HxW; scaled to cover it, then centre-cropped")
    parser.add_argument("--fps", type=float, default=None,
                        help="target frame rate: each output frame is the source frame nearest its time (default: the "
                             "source rate)")
    parser.add_argument("--stride", type=int, default=None,
                        help="frames between clip starts (default: --frames, no overlap)")
    parser.add_argument("--captions", default=None, help="CSV or JSONL of path,caption")
    parser.add_argument("--default-caption", default=None,
                        help="caption for videos without one (e.g. '' for unconditional)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="decoding processes (default: one per CPU core, 4 at most)")
    parser.add_argument("--shard-samples", type=int, default=1000, help="most clips per shard")
    parser.add_argument("--shard-mb", type=float, default=512.0, help="most megabytes per shard")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out about this share of the videos into DIR/val (the rest into DIR/train)")


def parse_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '48x64' -> (48, 64) as (height, width)."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size must be S or HxW (e.g. 64 or 48x64), got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def clip_spec_of(args: argparse.Namespace) -> ClipSpec:
    """The clips the command line asks for; a value out of range is refused naming its option (ClipSpec's own
    errors name its fields, which the command line does not have)."""
    height, width = args.size
    if args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if height < 1 or width < 1:
        raise ValueError(f"--size must be at least 1 pixel each way, got {height}x{width}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a finite number of frames per second > 0, got {args.fps:g}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    return ClipSpec(args.frames, height, width, args.fps, args.stride)


def run(args: argparse.Namespace) -> int:
    spec = clip_spec_of(args)
    summary = convert_videos(
        args.inputs, args.out, spec, captions=args.captions, default_caption=args.default_caption,
        workers=args.workers, shard_samples=args.shard_samples, shard_bytes=args.shard_mb * 2**20, show_progress=True,
        val_fraction=args.val_fraction,
    )
    splits = summary["splits"] if "splits" in summary else {"": summary}
    replaced = all(summary["written"] > 0 for summary in splits.values())
    for summary in splits.values():
        fields = {k: summary[k] for k in ("written", "files_ok", "files_total", "shards", "seconds", "clips_per_second")}
        if replaced:
            print_summary(f"from-videos -> {summary['out']}", fields, summary["skipped"])
            continue
        # No summary file was written to point at, so every skip is shown here.
        print_summary(f"from-videos -> {summary['out']}", fields, summary["skipped"], show=len(summary["skipped"]))
        console.print(f"[red]{_why_not_written(summary, splits)}[/]: {summary['out']} is left as it was")
    return 0 if replaced else 1


def _why_not_written(summary: dict, splits: dict[str, dict]) -> str:
    if summary["written"] == 0:
        return "no clip written"
    empty = " and ".join(name for name, other in splits.items() if other["written"] == 0)
    return (f"its {summary['written']} clips are not written either, since {empty} has none (the train and val "
            "folders of a run are written together; repair or remove the videos skipped there)")


def convert_videos(
    inputs: Sequence[str],
    out: str | Path,
    spec: ClipSpec,
    captions: str | Path | None = None,
    default_caption: str | None = None,
    workers: int = 1,
    shard_samples: int = 1000,
    shard_bytes: float = 512 * 2**20,
    show_progress: bool = False,
    val_fraction: float = 0.0,
) -> dict:
    """Write the clips of ``inputs`` to shards in ``out``; returns the summary (also ``out/summary.json``,
    or with ``val_fraction`` ``out/train/summary.json`` and ``out/val/summary.json``).

    The clips are written to a staging folder and replace ``out``'s earlier shards only when there
    is at least one: a run that writes nothing (or fails) leaves ``out`` as it was. With
    ``val_fraction`` the videos are split into ``out/train`` and ``out/val``, which are replaced together
    and only when both have a clip, and the summary holds one per folder under ``splits``. An ``out``
    that holds input videos or a manifest flowvid did not write is refused before any video is read; once every folder of this run's layout is written, what
    an earlier run left in the other layout is removed.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    check_limits(workers, shard_samples, shard_bytes)
    started = time.perf_counter()
    out = Path(out)
    videos = find_videos(inputs)
    check_output_folder(out, videos)
    files = list(videos)
    table = CaptionTable(load_captions(captions) if captions else {}, files)
    sidecars = Sidecars(files)
    if table.rows and not any(table.names(path) for path in files):
        raise ValueError(f"the captions in {captions} name none of the {len(files)} videos found (paths are read "
                         f"relative to the captions file's folder, {Path(captions).resolve().parent})")
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    skipped: list[dict[str, str]] = []
    captioned: list[tuple[Path, str]] = []
    for path in files:
        try:
            captioned.append((path, caption_for(path, table, sidecars, default_caption)))
        except NoCaption as err:
            skipped.append({"path": str(path), "reason": str(err)})
    keys = key_prefixes(path.relative_to(root).as_posix() for path, _ in captioned)
    settings = dict(inputs=inputs, spec=spec, root=root, keys=keys, workers=workers, shard_samples=shard_samples,
                    shard_bytes=shard_bytes, show_progress=show_progress, started=started)
    if not val_fraction:
        splits = _convert_together({"": (captioned, skipped, len(files), out)}, **settings)
        summary = splits[""]
    else:
        train, val = split_videos(captioned, videos, val_fraction)
        splits = _convert_together({"train": (train, skipped, len(train) + len(skipped), out / "train"),
                                    "val": (val, [], len(val), out / "val")}, **settings)
        summary = {"out": str(out), "splits": splits}
    if all(split["written"] > 0 for split in splits.values()):  # this run's layout replaced the earlier data
        for folder in remove_other_layout(out, split=bool(val_fraction)):
            if show_progress:
                console.print(f"[yellow]removed[/] the shards, manifest and summary in {folder}, left by an "
                              f"earlier run {'without' if val_fraction else 'with'} --val-fraction")
    return summary


def check_limits(workers: int, shard_samples: int, shard_bytes: float) -> None:
    """Refuse, before any file is read, a limit that cannot be met: no decoding process, or empty shards."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (the processes that decode), got {workers}")
    if shard_samples < 1:
        raise ValueError(f"--shard-samples must be at least 1 (clips per shard), got {shard_samples}")
    if not is_positive_number(shard_bytes):  # NaN would pass a plain > 0 and lift the limit
        raise ValueError(f"--shard-mb must be a finite number above 0, got {shard_bytes / 2**20:g}")


def layout_folders(out: Path, split: bool) -> list[Path]:
    """The shard folders a run writes: ``out/train`` and ``out/val`` with --val-fraction, else ``out``."""
    return [out / "train", out / "val"] if split else [out]


def check_output_folder(out: Path, videos: Iterable[Path]) -> None:
    """Refuse an ``out`` that holds an input video (the shards, manifest and summary would be mixed with the
    user's videos, and a manifest of theirs replaced) or a ``manifest.json`` that flowvid did not write, in
    either layout (it would be replaced, or removed as the other layout's)."""
    resolved = out.resolve()
    among = next((video for video in videos if resolved in video.parents), None)
    if among is not None:
        raise ValueError(f"--out {out} holds the input video {among}: the shards would be mixed with your videos; "
                         "give a folder of their own")
    for folder in layout_folders(out, split=False) + layout_folders(out, split=True):
        manifest = folder / MANIFEST_NAME
        if manifest.exists() and listed_shards(manifest) is None:
            raise ValueError(f"{manifest} is not a flowvid manifest, and this run would replace it; give another "
                             "--out, or move that file away")


def listed_shards(manifest: Path) -> list[str] | None:
    """The shard names a flowvid manifest lists; None when ``manifest`` is not one."""
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
        if isinstance(content, dict) and "format_version" in content:
            return [Path(shard["name"]).name for shard in content["shards"]]  # a name: nothing outside the folder
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
        pass
    return None


def remove_other_layout(out: Path, split: bool) -> list[Path]:
    """Remove what an earlier run left in the layout this run did not write (``split``: this one wrote
    ``out/train`` and ``out/val``), so that training cannot read those stale shards; returns the folders
    cleared. Only flowvid's own files go: each manifest, the shards it lists, the summary beside it and
    the statistics computed from them (and a ``train`` or ``val`` folder left empty)."""
    cleared = []
    for folder in layout_folders(out, split=not split):
        manifest = folder / MANIFEST_NAME
        shards = listed_shards(manifest) if manifest.is_file() else None
        if shards is None:
            continue
        manifest.unlink()  # first: stopped halfway, the folder is unfinished, not one whose shards are missing
        for name in [*shards, "summary.json"]:
            (folder / name).unlink(missing_ok=True)
        for name in DERIVED_FOLDERS:  # statistics of those shards
            shutil.rmtree(folder / name, ignore_errors=True)
        if folder != out and not any(folder.iterdir()):
            folder.rmdir()
        cleared.append(folder)
    return cleared


def split_videos(captioned: list[tuple[Path, str]], found_as: dict[Path, str],
                 fraction: float) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(kept, held out): a video is held out when the hash of its path below its input (``found_as``, from
    ``find_videos``), as a number in [0, 1), is below ``fraction``; at least one video goes to each side.

    Neither the other videos nor where the inputs lie change a video's side."""
    if len(captioned) < 2:
        raise ValueError(f"--val-fraction needs at least two captioned videos to hold some out, found {len(captioned)}")

    def position(path: Path) -> float:
        digest = hashlib.sha1(found_as[path].encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    positions = [position(path) for path, _ in captioned]
    count = min(max(sum(p < fraction for p in positions), 1), len(captioned) - 1)
    held = set(sorted(range(len(captioned)), key=positions.__getitem__)[:count])
    return ([item for index, item in enumerate(captioned) if index not in held],
            [item for index, item in enumerate(captioned) if index in held])


def _convert_together(folders: dict[str, tuple[list[tuple[Path, str]], list[dict[str, str]], int, Path]],
                      **settings) -> dict[str, dict]:
    """Write the clips of each ``{name: (captioned, skipped, files_total, folder)}`` to shards in its folder;
    returns ``{name: summary}``.

    Every folder is staged first and the earlier shards are replaced only when each one has at least one
    clip, all of them together: the train and val folders of a run always belong together, and a split
    without a clip (every held-out video corrupt) leaves both as they were."""
    with contextlib.ExitStack() as stack:
        staged = {}
        for name, (captioned, skipped, files_total, folder) in folders.items():
            staging = stack.enter_context(staging_folder(folder))
            staged[name] = (staging, folder, _stage(captioned, skipped, files_total, folder, staging, **settings))
        if all(summary["written"] > 0 for _, _, summary in staged.values()):
            for staging, folder, _ in staged.values():
                replace_shard_folder(staging, folder)
    return {name: summary for name, (_, _, summary) in staged.items()}


def _stage(captioned: list[tuple[Path, str]], skipped: list[dict[str, str]], files_total: int, out: Path,
           staging: Path, *, inputs: Sequence[str], spec: ClipSpec, root: Path, keys: dict[str, str], workers: int,
           shard_samples: int, shard_bytes: float, show_progress: bool, started: float) -> dict:
    """Write the clips of the ``captioned`` videos to shards in ``staging``, with the manifest and the summary
    of ``out``, the folder they are for."""
    with ShardFolderWriter(staging, max_samples=shard_samples, max_bytes=shard_bytes) as writer:
        files_ok, rates = _write_clips(writer, captioned, spec, root, keys, workers, skipped, files_total,
                                       show_progress)
    skipped.sort(key=lambda item: item["path"])
    fps = spec.fps if spec.fps is not None else (rates.pop() if len(rates) == 1 else None)  # None: mixed rates
    video = {"frames": spec.frames, "height": spec.height, "width": spec.width, "fps": fps}
    source = {"tool": "from-videos", "inputs": list(inputs),
              "clip": {"fps": spec.fps, "stride": spec.stride or spec.frames}}
    manifest = new_manifest("raw", video, samples=writer.samples, num_shards=len(writer.shards),
                            shards=writer.shards, skipped=skipped, source=source)
    write_manifest(staging, manifest)
    seconds = time.perf_counter() - started
    summary = {"out": str(out), "written": writer.samples, "files_total": files_total, "files_ok": files_ok,
               "shards": len(writer.shards), "skipped": skipped, "seconds": round(seconds, 3),
               "clips_per_second": round(writer.samples / seconds, 3)}
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_clips(
    writer: ShardFolderWriter,
    captioned: list[tuple[Path, str]],
    spec: ClipSpec,
    root: Path,
    keys: dict[str, str],
    workers: int,
    skipped: list[dict[str, str]],
    files_total: int,
    show_progress: bool,
) -> tuple[int, set[float]]:
    """Decode the captioned files and write their clips, keyed by ``keys`` (``key_prefixes``); unusable files go
    to ``skipped``.

    Returns how many files gave clips and the frame rates they had.
    """
    files_ok, rates = 0, set()
    with progress_bar(show_progress) as bar:
        task = bar.add_task("videos", total=files_total, completed=len(skipped))
        for (path, caption), result in zip(captioned, _read_all([p for p, _ in captioned], spec, workers)):
            bar.advance(task)
            if isinstance(result, str):
                skipped.append({"path": str(path), "reason": result})  # listed in the end-of-run summary
                continue
            files_ok += 1
            rates.add(result.fps)
            relative = path.relative_to(root).as_posix()
            for index, (clip, start) in enumerate(zip(result.videos, result.starts)):
                meta = {"caption": caption, "fps": result.fps, "source": relative, "clip_start": start,
                        "clip_start_seconds": start / result.fps, "frames": spec.frames, "height": spec.height,
                        "width": spec.width}
                writer.write(encode_sample(f"{keys[relative]}-{index:05d}", caption, meta, frames=clip))
    return files_ok, rates


WILDCARD = re.compile(r"[*?[]")  # what makes a path part a glob pattern


def find_videos(inputs: Sequence[str]) -> dict[Path, str]:
    """Files named directly, video files under folders (recursively) and glob matches, each once:
    ``{resolved path: its path below the input it was first found under}``, sorted by path.

    A file that several inputs name (a folder and a file in it, a relative and an absolute spelling)
    is one video. An input that names no video (a misspelt path, a folder without videos) is refused
    rather than left out unnoticed.
    """
    found: dict[Path, str] = {}
    barren: list[str] = []
    for item in inputs:
        videos = list(_found_under(item))
        if not videos:
            barren.append(item)
        for path, below in videos:
            found.setdefault(_resolved(path), below)
    if barren:
        raise ValueError(f"no video file found in {', '.join(map(repr, barren))}: not an existing file, nor a folder "
                         f"or pattern with video files (extensions: {', '.join(sorted(VIDEO_SUFFIXES))})")
    return dict(sorted(found.items()))


def _found_under(item: str) -> Iterator[tuple[Path, str]]:
    """The files one input names, each with its path below the input (a file's: its name)."""
    path = Path(item)
    if path.is_file():
        yield path, path.name
        return
    if path.is_dir():
        candidates, base = path.rglob("*"), path
    else:  # a glob pattern: its paths are read below the folders it names before the first wildcard
        candidates = map(Path, glob.glob(item, recursive=True))
        base = Path(*itertools.takewhile(lambda part: not WILDCARD.search(part), path.parts[:-1]))
    for candidate in candidates:
        if candidate.suffix.lower() in VIDEO_SUFFIXES and (candidate.is_file() or _dangling(candidate)):
            yield candidate, candidate.relative_to(base).as_posix()


def _dangling(path: Path) -> bool:
    """A link to a file that is not there (a git-annex or DataLad file not fetched): a video that cannot be
    read, to be listed as such rather than left out unnoticed."""
    return path.is_symlink() and not path.exists()


def _resolved(path: Path) -> Path:
    """The absolute path of the file ``path`` names; a dangling link stays in its own folder, beside its
    sidecar and its siblings, and is read (and listed as unreadable) there."""
    return path.parent.resolve() / path.name if _dangling(path) else path.resolve()


def load_captions(path: str | Path) -> dict[str, str]:
    """``{resolved video path: caption}`` from a CSV (optional header ``path,caption``) or a JSONL file.

    A row whose path is a bare file name also captions a video of that name in any folder, where no
    other bare row names it, so that a table of bare names works too; ``sub/a.mp4`` captions only itself.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not data
    except UnicodeDecodeError as err:  # Excel's "Unicode text" is UTF-16; old tools write Latin-1
        raise ValueError(f"captions file {path} is not UTF-8 text: {err.reason} at byte {err.start}; "
                         "save it as UTF-8") from None
    except OSError as err:
        raise ValueError(f"cannot read captions file {path}: {err.strerror or err}") from None
    rows = list(_jsonl_rows(text, path) if path.suffix.lower() == ".jsonl" else _csv_rows(text, path))
    table = {str((path.parent / video).resolve()): caption for video, caption in rows}
    names: dict[str, list[str]] = {}
    for video, caption in rows:
        if Path(video).name == video:
            names.setdefault(video, []).append(caption)
    table.update({name: captions[0] for name, captions in names.items() if len(captions) == 1})
    return table


def _csv_rows(text: str, path: Path) -> Iterator[tuple[str, str]]:
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        header = [c.strip().lower() for c in row] if number == 1 else []
        if not row or header == ["path", "caption"]:
            continue
        if {"path", "caption"} & set(header):  # a header in another order would be read as a video
            raise ValueError(f"{path}:1: the header must be path,caption (in that order), got {','.join(row)}")
        if len(row) != 2:
            raise ValueError(f"{path}:{number}: expected 2 columns (path,caption; quote captions with commas), "
                             f"got {len(row)}")
        yield row[0].strip(), row[1].strip()


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not {"path", "caption"} <= row.keys():
            raise ValueError(f'{path}:{number}: expected {{"path": ..., "caption": ...}}, got {line[:80]!r}')
        if not isinstance(row["path"], str) or not isinstance(row["caption"], str):
            raise ValueError(f'{path}:{number}: "path" and "caption" must be strings (a caption of "" for none), '
                             f'got {line[:80]!r}')
        yield row["path"], row["caption"].strip()


class NoCaption(Exception):
    """A video without a usable caption; the message is the reason listed in the summary."""


def _normalised(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class CaptionTable:
    """The rows of ``load_captions``, looked up by a video's path or file name as it is spelt, else up to
    Unicode normalisation: files copied from a Mac spell an accented letter as a letter and an accent
    (NFD) while a table typed elsewhere has one character (NFC), and both show the same name."""

    def __init__(self, rows: dict[str, str], videos: Iterable[Path]):
        self.rows = rows
        self.spellings: dict[str, list[str]] = {}  # normalised key -> the rows' keys
        for key in rows:
            self.spellings.setdefault(_normalised(key), []).append(key)
        self.videos: dict[str, list[Path]] = {}  # normalised path -> the videos spelt so
        for video in videos:
            self.videos.setdefault(_normalised(str(video)), []).append(video)

    def names(self, video: Path) -> bool:
        """Whether a row names ``video``, in any spelling."""
        return any(_normalised(key) in self.spellings for key in (str(video), video.name))

    def caption(self, video: Path) -> str | None:
        """The row's caption for ``video``, None when no row names it; NoCaption when rows in several spellings,
        or videos whose names differ only in their spelling, make it ambiguous."""
        for key in (str(video), video.name):
            if key in self.rows:
                return self.rows[key]
        twins = [other for other in self.videos.get(_normalised(str(video)), []) if other != video]
        for key in (str(video), video.name):
            rows = self.spellings.get(_normalised(key), [])
            if len(rows) > 1:
                raise NoCaption(f"ambiguous caption: the captions file names {key} in {len(rows)} spellings that "
                                "differ only in Unicode normalisation")
            if rows and twins:
                raise NoCaption(f"ambiguous caption: the captions file's {rows[0]} fits this video and {twins[0]}, "
                                "whose names differ only in Unicode normalisation; name each as it is spelt")
            if rows:
                return self.rows[rows[0]]
        return None


def sidecar_names(video: Path) -> list[str]:
    """The names a caption file of ``video`` may have: ``<stem>.txt`` (``clip.txt`` for ``clip.mp4``) and
    ``<name>.txt`` (``clip.mp4.txt``). A video named ``clip.txt`` is never its own caption file."""
    names = [f"{video.stem}.txt", f"{video.name}.txt"]
    return [name for name in dict.fromkeys(names) if name != video.name]


class Sidecars:
    """Each video's caption file, ``<stem>.txt`` or ``<name>.txt`` (``sidecar_names``), found as it is spelt,
    else up to Unicode normalisation, as ``CaptionTable`` finds rows: a video and its sidecar copied from
    different systems may spell the same name differently (NFD, NFC)."""

    def __init__(self, videos: Iterable[Path]):
        self.videos: dict[str, list[Path]] = {}  # normalised path -> the videos spelt so
        for video in videos:
            self.videos.setdefault(_normalised(str(video)), []).append(video)
        self.folders: dict[Path, dict[str, list[Path]]] = {}  # folder -> normalised .txt name -> files; listed once

    def find(self, video: Path) -> Path | None:
        """The sidecar of ``video``, None without one; NoCaption when both names are there (neither is
        preferred: one of them is likely stale), or when sidecars in several spellings, or videos whose
        names differ only in their spelling, make it ambiguous."""
        found = [sidecar for name in sidecar_names(video) if (sidecar := self._named(video, name)) is not None]
        if len(found) > 1:
            raise NoCaption(f"ambiguous caption: both {found[0].name} and {found[1].name} fit {video.name}; keep "
                            "one of them")
        return found[0] if found else None

    def _named(self, video: Path, name: str) -> Path | None:
        spelt = video.with_name(name)
        if spelt.is_file():
            return spelt
        found = [path for path in self._text_files(video.parent).get(_normalised(name), []) if path != video]
        if len(found) > 1:
            raise NoCaption(f"ambiguous caption: {len(found)} sidecars fit {video.name}, spelt differently only in "
                            "Unicode normalisation")
        twins = [other for other in self.videos.get(_normalised(str(video)), []) if other != video]
        if found and twins:
            raise NoCaption(f"ambiguous caption: sidecar {found[0].name} fits this video and {twins[0]}, whose names "
                            "differ only in Unicode normalisation; name each sidecar as its video is spelt")
        return found[0] if found else None

    def _text_files(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self.folders:
            listing: dict[str, list[Path]] = {}
            try:
                for path in folder.iterdir():
                    if path.suffix == ".txt" and path.is_file():
                        listing.setdefault(_normalised(path.name), []).append(path)
            except OSError:  # an unreadable folder has no sidecars to offer; the video says why it is skipped
                pass
            self.folders[folder] = listing
        return self.folders[folder]


@dataclasses.dataclass(frozen=True)
class FoundCaption:
    """A caption a video carries itself, and the sidecar it was read from (None: a captions table's row)."""

    text: str
    sidecar: Path | None = None


def found_caption(video: Path, table: CaptionTable, sidecars: Sidecars) -> FoundCaption | None:
    """The caption ``video`` carries itself: the captions table's entry, else its sidecar's text; None without
    either. NoCaption for an ambiguous entry or sidecar, or a sidecar that cannot be read. ``flowvid score``
    captions video files by this lookup too, so that a clip gets the same caption in both."""
    caption = table.caption(video)
    if caption is not None:
        return FoundCaption(caption)
    sidecar = sidecars.find(video)
    if sidecar is None:
        return None
    try:
        return FoundCaption(sidecar.read_bytes().decode("utf-8-sig").strip(), sidecar)  # without a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise NoCaption(f"unreadable caption {sidecar.name}: {err}") from err


def caption_for(video: Path, table: CaptionTable, sidecars: Sidecars, default: str | None) -> str:
    """The captions table's entry, else the sidecar ``.txt``, else ``default``; NoCaption says why not."""
    found = found_caption(video, table, sidecars)
    if found is not None:
        return found.text
    if default is not None:
        return default
    raise NoCaption(f"no caption (no sidecar {' or '.join(sidecar_names(video))}, no --captions entry, "
                    "no --default-caption)")


def key_prefixes(relatives: Iterable[str]) -> dict[str, str]:
    """``{relative path: the key of its clips before their index}``: a readable stem and 8 hex digits of the
    path's hash (stems repeat across folders), or all 40 for videos whose stems and 8 digits would be alike.

    Among 100k videos of one name (``<id>/video.mp4``) a pair is likely to share 8 digits; their clips
    would share keys, which ``verify`` reports and training reads once."""
    short = {relative: _key_prefix(relative, 8) for relative in relatives}
    uses = Counter(short.values())
    return {relative: prefix if uses[prefix] == 1 else _key_prefix(relative, 40) for relative, prefix in short.items()}


def _key_prefix(relative: str, digits: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(relative).stem)[:48]
    return f"{stem}-{hashlib.sha1(relative.encode()).hexdigest()[:digits]}"


def _read_one(path: Path, spec: ClipSpec) -> Clips | str:
    try:
        return read_clips(path, spec)
    except VideoSkipped as err:
        return str(err)
    except OSError as err:
        return f"unreadable: {err}"


def _read_all(paths: list[Path], spec: ClipSpec, workers: int) -> Iterator[Clips | str]:
    """Clips of each path, in order; decoding runs in ``workers`` processes, at most two files each ahead
    of the one being written. (``Executor.map`` would start every file at once: while a long video
    decodes, the clips of all the files after it would pile up in memory.)"""
    if workers <= 1 or len(paths) <= 1:
        yield from (_read_one(path, spec) for path in paths)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        for path in paths:
            if len(pending) == 2 * workers:
                yield pending.popleft().result()
            pending.append(pool.submit(_read_one, path, spec))
        while pending:
            yield pending.popleft().result()


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["from-videos", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
