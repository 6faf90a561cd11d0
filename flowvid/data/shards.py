"""WebDataset tar shards: one sample per clip, written atomically, read back with every defect named.

A sample is a group of tar members sharing a key (the clip id)::

    <key>.frames.npy   uint8 (T, H, W, 3)          raw shards
    <key>.latent.npy   float16 (t, h, w, c)        latent shards (instead of frames)
    <key>.txt          caption, UTF-8
    <key>.json         metadata: caption, fps, source, clip_start, frames, height, width, ...
    <key>.text.npy     optional float16 (L, D) cached text embedding, with <key>.textmask.npy bool (L,)
    <key>.first.npy    optional uint8 (H, W, 3) conditioning frame
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import webdataset as wds

from flowvid.data.manifest import MANIFEST_NAME, video_shape
from flowvid.paths import check_output_folder

SHARD_PATTERN = "shard-%06d.tar"
TEMPORARY_SUFFIX = ".tmp"
STAGING_PREFIX = ".staging-"

# Why a sample can be skipped; the DataModule and `verify` count skips under these names.
SKIP_REASONS = (
    "broken_tar",
    "checksum",
    "missing_field",
    "bad_caption",
    "bad_metadata",
    "bad_frames",
    "bad_latent",
    "non_finite_latent",
    "bad_text_embedding",
    "bad_first_frame",
    "duplicate_key",
)


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


class BrokenShard(OSError):
    """A shard that is missing, truncated or not a tar file. Samples read before the damage are kept."""


# --- writing -------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(
    key: str,
    caption: str,
    meta: dict[str, Any],
    *,
    frames: np.ndarray | None = None,
    latent: np.ndarray | None = None,
    text: np.ndarray | None = None,
    text_mask: np.ndarray | None = None,
    first: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fields of one sample as tar members (bytes). Exactly one of ``frames`` / ``latent``."""
    if (frames is None) == (latent is None):
        raise ValueError("a sample holds either frames (raw shards) or a latent (latent shards)")
    if "." in key or "/" in key:
        raise ValueError(f"sample keys may not contain '.' or '/', got {key!r}")
    sample: dict[str, Any] = {
        "__key__": key,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if frames is not None:
        sample["frames.npy"] = npy_bytes(frames)
    if latent is not None:
        sample["latent.npy"] = npy_bytes(latent)
    if text is not None:
        sample["text.npy"] = npy_bytes(text)
        sample["textmask.npy"] = npy_bytes(text_mask)
    if first is not None:
        sample["first.npy"] = npy_bytes(first)
    return sample


#: Where the FVD reference statistics of a folder's shards are kept, inside it.
FVD_STATS_FOLDER = "fvd_stats"
#: What is computed from a folder's shards: stale once the shards change.
DERIVED_FOLDERS = (FVD_STATS_FOLDER,)


def clear_shard_folder(folder: str | Path) -> None:
    """Remove what an earlier run left (shards, temporaries, manifest, summary) and what was computed
    from its shards (``DERIVED_FOLDERS``), nothing else."""
    folder = Path(folder)
    # The manifest goes first: stopped halfway, the folder is one without a manifest, which readers
    # refuse, rather than one whose manifest lists shards that are gone.
    leftovers = (MANIFEST_NAME, MANIFEST_NAME + TEMPORARY_SUFFIX, "summary.json", "shard-*.tar",
                 "shard-*.tar" + TEMPORARY_SUFFIX)
    for pattern in leftovers:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)  # another process clearing the same folder may be first
    for name in DERIVED_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh empty folder inside ``folder`` for a new run to write into; removed on exit, whatever happens.

    A run writes its shards, manifest and summary there and moves them in with ``replace_shard_folder``
    only once it has succeeded: a run that fails, is interrupted or writes nothing leaves the previous
    run's data as it was. Being inside ``folder`` keeps the final renames on one file system (atomic),
    and a unique name keeps two runs apart. A ``folder`` made here and left empty is removed again.
    """
    folder = Path(folder)
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    check_output_folder(folder, "output folder", "give a folder for the shards")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for made in missing:  # the folders made here, as long as the run left them empty
            if any(made.iterdir()):
                break
            made.rmdir()


def replace_shard_folder(staging: str | Path, folder: str | Path) -> None:
    """Put a finished run's shards, summary and manifest from ``staging`` in place of ``folder``'s previous ones.

    Statistics computed from the previous shards (``DERIVED_FOLDERS``) go with them; nothing else in
    ``folder`` is touched. The manifest comes last, so a reader never sees a manifest whose shards are
    not all there.
    """
    staging, folder = Path(staging), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clear_shard_folder(folder)
    for path in [*sorted(staging.glob("shard-*.tar")), staging / "summary.json", staging / MANIFEST_NAME]:
        if path.is_file():
            os.replace(path, folder / path.name)


class ShardFolderWriter:
    """Writes samples into size-limited shards ``shard-NNNNNN.tar`` of one folder.

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a crash leaves a temporary
    file (which ``verify`` reports), never a short shard under a valid name. Tar members carry fixed
    times and owners: the same samples always give the same bytes (and sha256). Opening a writer on
    a folder clears the previous run's shards and manifest; ``shards`` lists what was written. (The
    data tools open it on a ``staging_folder``, so that a run that fails keeps the previous data.)
    """

    def __init__(self, folder: str | Path, max_samples: int = 1000, max_bytes: float = 512 * 2**20):
        if max_samples < 1 or max_bytes <= 0:
            raise ValueError(f"need max_samples >= 1 and max_bytes > 0, got {max_samples}, {max_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        clear_shard_folder(self.folder)
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self._file: BinaryIO | None = None
        self._writer = wds.ShardWriter(
            str(self.folder / SHARD_PATTERN),
            maxcount=max_samples,
            maxsize=max_bytes,
            opener=self._open_temporary,
            post=self._commit,
            verbose=0,
            encoder=False,
            mtime=0,  # an int: a float mtime costs a PAX header per member
            user="flowvid",
            group="flowvid",
        )

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        self.samples += 1

    def close(self) -> list[dict[str, Any]]:
        self._writer.close()
        return self.shards

    def __enter__(self) -> "ShardFolderWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # failed mid-shard: drop the half-written temporary
            self._writer.tarstream.close()
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)

    def _open_temporary(self, name: str) -> BinaryIO:
        self._file = open(name + TEMPORARY_SUFFIX, "wb")
        return self._file

    def _commit(self, name: str) -> None:
        assert self._file is not None
        self._file.close()
        temporary, self._file = Path(self._file.name), None
        count = self._writer.count
        if count == 0:
            temporary.unlink()
            return
        os.replace(temporary, name)
        self.shards.append(
            {"name": Path(name).name, "samples": count, "bytes": Path(name).stat().st_size, "sha256": file_sha256(name)}
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- reading -------------------------------------------------------------------------------------


def iter_tar(path: str | Path, digest: Any = None) -> Iterator[dict[str, bytes]]:
    """Samples of one shard as dicts of raw bytes (plus ``__key__``), in stored order.

    Raises BrokenShard at the point of damage, after yielding every complete sample before it (a sample
    is yielded as soon as the next one begins, and the last one before the end is checked for its fields
    where it is decoded). ``digest`` (a ``hashlib`` object), when given, is fed every byte of the file,
    damaged or not, by the time the samples end: one pass over the disk both checks and decodes a shard.
    """
    try:
        with open(path, "rb") as file:
            stream = file if digest is None else _HashingReader(file, digest)
            try:
                yield from _tar_samples(stream)
            finally:
                if isinstance(stream, _HashingReader):
                    stream.hash_rest()
    except (OSError, EOFError, tarfile.TarError) as err:
        raise BrokenShard(f"{path}: {err}") from err


def _tar_samples(stream: BinaryIO) -> Iterator[dict[str, bytes]]:
    """Samples of the tar archive ``stream``; a tarfile.ReadError at the damage says what is found there."""
    archive: tarfile.TarFile | None = None
    try:
        archive = tarfile.open(fileobj=stream, mode="r|")
        with archive:
            yield from _archive_samples(archive)
        # tarfile takes a cut at a header, or a damaged header after the first, for a normal end: a complete
        # archive has its end-of-archive marker there.
        damage = _damage_at(stream, archive.offset)
    except tarfile.ReadError as err:  # a damaged first header, or a file that ends inside a member
        where = archive.offset if archive is not None else 0
        raise tarfile.ReadError(_damage_at(stream, where) or str(err)) from err
    if damage is not None:
        raise tarfile.ReadError(damage)


def _archive_samples(archive: tarfile.TarFile) -> Iterator[dict[str, bytes]]:
    sample: dict[str, Any] = {}
    for member in archive:
        if not member.isfile():
            continue
        key, field = _key_and_field(member.name)
        # A field met again starts another sample of that key, rather than overwriting the first.
        if sample and (key != sample["__key__"] or field in sample):
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[field] = archive.extractfile(member).read()  # type: ignore[union-attr]
    if sample:
        yield sample


def _damage_at(stream: BinaryIO, offset: int) -> str | None:
    """What lies at ``offset`` of a tar file, where a member's header or the end-of-archive marker (two zero
    blocks) belongs, when it is neither: a damaged block, or the end of a file cut short. None for the marker."""
    stream.seek(offset)
    blocks = stream.read(2 * tarfile.BLOCKSIZE)
    for start in range(0, len(blocks) - tarfile.BLOCKSIZE + 1, tarfile.BLOCKSIZE):
        if blocks[start:start + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
            return (f"damaged tar header at byte {offset + start}: the block there is neither a member's header "
                    "nor the end of the archive")
    if len(blocks) < 2 * tarfile.BLOCKSIZE:
        size = stream.seek(0, os.SEEK_END)
        return f"truncated: the file ends early, at byte {size}, before the end of the archive"
    return None


class _HashingReader:
    """A binary file that feeds each of its bytes to ``digest`` once and in order, however it is read: a
    rewind reads bytes already hashed, and ``hash_rest`` hashes from where hashing stopped to the end."""

    def __init__(self, file: BinaryIO, digest: Any):
        self._file, self._digest, self._hashed = file, digest, 0

    def read(self, size: int = -1) -> bytes:
        start = self._file.tell()
        data = self._file.read(size)
        if start <= self._hashed < start + len(data):
            self._digest.update(data[self._hashed - start:])
            self._hashed = start + len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def hash_rest(self) -> None:
        self._file.seek(self._hashed)
        while self.read(1 << 20):
            pass


def _key_and_field(member_name: str) -> tuple[str, str]:
    """``"clip7.latent.npy"`` -> ``("clip7", "latent.npy")``: a member's sample key and field."""
    folder, base = os.path.split(member_name)
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def keys_held_earlier(shards: Sequence[str | os.PathLike]) -> dict[str, frozenset[str]]:
    """For each shard that has any (by its path as a string), the keys of its samples that an earlier shard
    of ``shards`` holds too.

    Only the tar headers are read (the data is skipped), so a folder is scanned at little cost; a
    damaged shard gives the keys before its damage. A single pass keeps the first sample of a key, in
    stored order, and counts the others as ``duplicate_key``."""
    seen: set[str] = set()
    repeated: dict[str, frozenset[str]] = {}
    for shard in shards:
        keys = _member_keys(shard)
        if keys & seen:
            repeated[os.fspath(shard)] = frozenset(keys & seen)
        seen |= keys
    return repeated


def _member_keys(path: str | os.PathLike) -> set[str]:
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as archive:  # random access: iterating seeks past each member's data
            keys.update(_key_and_field(member.name)[0] for member in archive if member.isfile())
    except (OSError, EOFError, tarfile.TarError):
        pass  # the samples before the damage were added; the stream counts what the damage costs
    return keys


def shard_captions(path: str | os.PathLike, keys: set[str] | None = None) -> Iterator[str]:
    """The captions of one shard's samples, in stored order, read without the clips: only the tar headers
    and the ``.txt`` members are read, every other member's data is skipped. A caption that is not UTF-8
    is left out, as training skips its sample. The key of every sample met is added to ``keys``. Raises
    BrokenShard at the point of damage, after the captions before it."""
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, field = _key_and_field(member.name)
                if keys is not None:
                    keys.add(key)
                if field != "txt":
                    continue
                try:
                    caption = archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
                except UnicodeDecodeError:
                    continue
                yield caption
            # tarfile takes damage after the first header for the end of the archive: look at what is there.
            damage = _damage_at(file, archive.offset)
    except (OSError, EOFError, tarfile.TarError) as err:
        raise BrokenShard(f"{path}: {err}") from err
    if damage is not None:
        raise BrokenShard(f"{path}: {damage}")


def captions_of_shards(shards: Sequence[str | os.PathLike], broken: list[str] | None = None,
                       listed: Sequence[int] | None = None) -> Iterator[str]:
    """The captions of ``shards`` in order (``shard_captions``). A damaged shard gives the captions before its
    damage, and the error naming it is appended to ``broken``; so is a shard that holds fewer samples than
    ``listed`` gives for it (the manifest's counts), as a zero-filled one reads as a normal, early end."""
    for index, shard in enumerate(shards):
        keys: set[str] = set()
        try:
            yield from shard_captions(shard, keys)
        except BrokenShard as err:
            if broken is not None:
                broken.append(str(err))
            continue
        if broken is not None and listed is not None and len(keys) < listed[index]:
            broken.append(f"{shard}: holds {len(keys)} samples, the manifest lists {listed[index]}")


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of one shard folder must look like, from its manifest."""

    kind: str
    frames_shape: tuple[int, ...]
    latent_shape: tuple[int, ...] | None = None
    text_shape: tuple[int, ...] | None = None
    first_frame: bool = False

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "SampleSpec":
        optional = {key: tuple(manifest[key]) if manifest.get(key) else None for key in ("latent_shape", "text_shape")}
        return cls(
            kind=manifest["kind"],
            frames_shape=(*video_shape(manifest), 3),
            first_frame=bool(manifest.get("first_frame")),
            **optional,
        )

    @property
    def fields(self) -> tuple[str, ...]:
        fields = ["txt", "json", "frames.npy" if self.kind == "raw" else "latent.npy"]
        if self.text_shape is not None:
            fields += ["text.npy", "textmask.npy"]
        if self.first_frame:
            fields.append("first.npy")
        return tuple(fields)


def decode_sample(raw: dict[str, bytes], spec: SampleSpec) -> dict[str, Any]:
    """Check and decode one sample; BadSample names the reason when it is unusable.

    Returns ``key``, ``caption``, ``meta`` and ``video`` (uint8) or ``latents`` (float32), plus
    ``text_tokens`` / ``text_mask`` and ``first_frame`` when the folder has them.
    """
    key = raw.get("__key__", "?")
    missing = [field for field in spec.fields if field not in raw]
    if missing:
        raise BadSample("missing_field", f"sample {key!r} lacks {missing}")
    try:
        caption = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("bad_caption", f"sample {key!r}: caption is not UTF-8 ({err})") from err
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample("bad_metadata", f"sample {key!r}: metadata is not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise BadSample("bad_metadata", f"sample {key!r}: metadata must be a JSON object")
    out: dict[str, Any] = {"key": key, "caption": caption, "meta": meta}

    if spec.kind == "raw":
        out["video"] = _array(raw, "frames.npy", "bad_frames", key, (np.uint8,), spec.frames_shape)
    else:
        latent = _array(raw, "latent.npy", "bad_latent", key, (np.float16, np.float32), spec.latent_shape)
        if not np.isfinite(latent).all():
            raise BadSample("non_finite_latent", f"sample {key!r}: latent holds NaN or inf")
        out["latents"] = latent.astype(np.float32)
    if spec.text_shape is not None:
        tokens = _array(raw, "text.npy", "bad_text_embedding", key, (np.float16, np.float32), spec.text_shape)
        mask = _array(raw, "textmask.npy", "bad_text_embedding", key, (np.bool_,), spec.text_shape[:1])
        if not np.isfinite(tokens).all():
            raise BadSample("bad_text_embedding", f"sample {key!r}: text embedding holds NaN or inf")
        out["text_tokens"], out["text_mask"] = tokens.astype(np.float32), mask
    if spec.first_frame:
        out["first_frame"] = _array(raw, "first.npy", "bad_first_frame", key, (np.uint8,), spec.frames_shape[1:])
    return out


def _array(
    raw: dict[str, bytes], field: str, reason: str, key: str, dtypes: tuple[type, ...], shape: tuple[int, ...] | None
) -> np.ndarray:
    data = raw[field]
    try:
        # The header first: np.load allocates the shape a header declares before it reads a byte, so a
        # damaged header could ask for terabytes.
        declared_shape, dtype = _npy_header(io.BytesIO(data))
    except (ValueError, EOFError, OSError) as err:
        raise BadSample(reason, f"sample {key!r}: {field} is not a readable .npy ({err})") from err
    if dtype not in [np.dtype(d) for d in dtypes]:
        expected = [np.dtype(d).name for d in dtypes]
        raise BadSample(reason, f"sample {key!r}: {field} has dtype {dtype}, expected {expected}")
    if shape is not None and declared_shape != tuple(shape):
        raise BadSample(reason, f"sample {key!r}: {field} has shape {declared_shape}, expected {tuple(shape)}")
    if math.prod(declared_shape) * dtype.itemsize > len(data):
        raise BadSample(reason, f"sample {key!r}: {field} declares {declared_shape} {dtype}, more than its "
                                f"{len(data)} bytes hold")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise BadSample(reason, f"sample {key!r}: {field} is not a readable .npy ({err})") from err


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy file declares, read without reading its data."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    declared_shape, _, dtype = read_header(stream)
    return tuple(declared_shape), dtype


def shard_paths(folder: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """The shards a manifest lists, as paths inside ``folder``."""
    return [Path(folder) / shard["name"] for shard in manifest["shards"]]


def shard_folder_files(folder: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """What reading a shard folder's clips reads: its manifest and every shard it lists."""
    return [Path(folder) / MANIFEST_NAME, *shard_paths(folder, manifest)]


@dataclass(frozen=True)
class LostSamples:
    """Samples a shard did not give: ``samples`` of them, for ``reason`` (``duplicate_key``, ``broken_tar`` or
    ``checksum``). ``message`` names the shard, and ``key`` the sample of a repeated key."""

    reason: str
    message: str
    samples: int = 1
    key: str | None = None


def shard_samples(shard: str | os.PathLike, listed: int = 0, held_earlier: frozenset[str] = frozenset(),
                  sha256: str | None = None) -> Iterator[dict[str, bytes] | LostSamples]:
    """The raw samples of one shard in stored order (``iter_tar``), each key once, with a ``LostSamples``
    where samples are lost, in the order they are met: a sample whose key the shard gave before or that
    ``held_earlier`` (``keys_held_earlier``) lists; the damage of a broken shard, which costs every one of
    the ``listed`` samples it did not give (one at least); the end of a shard that holds fewer than
    ``listed`` (a zero-filled tail reads as a normal end). No sample is lost without a count.

    With ``sha256`` (the manifest's), the bytes read are hashed on the way and a shard that reads whole but
    differs is one ``checksum`` loss of every sample it held: its bytes cannot be trusted. The samples
    are then held back until the shard's last byte is read, so one shard's raw bytes are in memory at
    once. A broken or short shard is reported as such, with the samples before its damage."""
    if not sha256:
        yield from _unchecked_samples(shard, listed, held_earlier)
        return
    digest = hashlib.sha256()
    read = list(_unchecked_samples(shard, listed, held_earlier, digest))
    if digest.hexdigest() == sha256 or any(lost.reason == "broken_tar" for lost in _losses(read)):
        yield from read
        return
    held = sum(not isinstance(item, LostSamples) or item.key is not None for item in read)
    yield LostSamples("checksum", f"{shard}: its sha256 differs from the manifest's, though it reads as a whole "
                                  "archive: its bytes changed after it was written", max(held, 1))


def _losses(read: list[dict[str, bytes] | LostSamples]) -> Iterator[LostSamples]:
    """The losses among a shard's ``shard_samples``."""
    return (item for item in read if isinstance(item, LostSamples))


def _unchecked_samples(shard: str | os.PathLike, listed: int, held_earlier: frozenset[str],
                       digest: Any = None) -> Iterator[dict[str, bytes] | LostSamples]:
    """``shard_samples`` without the checksum; ``digest`` is fed the shard's bytes (``iter_tar``)."""
    read, seen = 0, set()
    try:
        for raw in iter_tar(shard, digest):
            read += 1
            key = raw["__key__"]
            if key in held_earlier or key in seen:
                yield LostSamples("duplicate_key", f"{shard}: key {key!r} belongs to an earlier sample", key=key)
                continue
            seen.add(key)
            yield raw
    except BrokenShard as err:
        yield LostSamples("broken_tar", str(err), max(listed - read, 1))
        return
    if read < listed:
        yield LostSamples("broken_tar", f"{shard}: holds {read} samples, the manifest lists {listed}", listed - read)


def listed_samples(shards: list[Path], listed: list[int], skipped: list[dict[str, Any]],
                   held_earlier: dict[str, frozenset[str]] | None = None,
                   sha256: Sequence[str | None] | None = None) -> Iterator[dict[str, bytes]]:
    """The raw samples of ``shards`` (``shard_samples``, shard ``i`` listing ``listed[i]`` and, when given,
    recorded with ``sha256[i]``: a shard whose bytes differ gives none). What a shard loses is appended to
    ``skipped``: ``{"shard", "reason", "samples"}`` for a broken, short or changed shard, ``{"key", "reason"}``
    for a repeated key."""
    held_earlier = held_earlier or {}
    checksums = list(sha256) if sha256 is not None else [None] * len(shards)
    for shard, count, checksum in zip(shards, listed, checksums):
        for raw in shard_samples(shard, count, held_earlier.get(os.fspath(shard), frozenset()), checksum):
            if not isinstance(raw, LostSamples):
                yield raw
            elif raw.key is not None:
                skipped.append({"key": raw.key, "reason": f"{raw.reason}: {raw.message}"})
            else:
                skipped.append({"shard": shard.name, "reason": f"{raw.reason}: {raw.message}", "samples": raw.samples})


def listed_sha256(manifest: dict[str, Any]) -> list[str | None]:
    """The sha256 the manifest records for each of its shards, in order (None where it records none)."""
    return [shard.get("sha256") or None for shard in manifest["shards"]]
