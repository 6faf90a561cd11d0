"""LightningDataModules over shard folders: raw video shards or latent shards, train and validation."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from flowvid.checks import differences, is_positive_number
from flowvid.codecs.base import CodecMismatchError, same_codec
from flowvid.data import manifest as manifests
from flowvid.data.pipeline import ShardLoader, ShardSource, ShardStream, SkipCounter, shards_for_rank
from flowvid.data.shards import SampleSpec, captions_of_shards, keys_held_earlier, shard_paths
from flowvid.data.synthetic import BACKGROUNDS, DEFAULT_MAX_OBJECTS
from flowvid.registry import DATASETS
from flowvid.text.base import same_text_encoder

#: The Lightning stages that read the validation folders only.
VALIDATION_ONLY_STAGES = ("validate",)


@DATASETS.register("shards")
class VideoShardDataModule(L.LightningDataModule):
    """Batches from shard folders written by ``flowvid data`` (raw video or latent shards).

    Batches are dicts: ``video`` uint8 ``(B, T, H, W, 3)`` for raw shards or ``latents`` float32
    ``(B, t, h, w, c)`` for latent shards, ``caption`` and ``key`` (lists of str), ``meta`` (list of
    dict), and when the folder has them ``text_tokens`` ``(B, L, D)`` / ``text_mask`` ``(B, L)`` and
    ``first_frame`` uint8 ``(B, H, W, 3)``. Raw video is encoded by the model, on its device.

    ``val_dir`` may be a list of folders too: the first one's metrics are logged as ``val/...``, each
    other's as ``val/<name>/...`` (``val_names``), e.g. to watch the original data while fine-tuning.

    ``train_dir`` may be a list of folders, mixed in the proportions ``train_weights`` (by default each
    in proportion to its samples): the expected share of a folder's samples in the batches is its
    weight over the sum of the weights. Every folder must hold clips of one kind and size (and latents
    of one codec, text of one encoder).

    ``validate`` reads only the validation folders: ``train_dir`` may then be left out (``None``), and
    the validation folders are checked against each other and, through ``check_compatible``, against
    the model. ``fit`` needs ``train_dir``.

    Training resamples all the shards on every rank and worker (each with randomness of its own) and
    stops after ``batches_per_epoch`` batches on every rank. Validation reads each rank's share of the
    shards (every world-size-th) once in order, or exactly ``val_batches`` batches per rank when
    given (set it under multi-device training so that ranks do not wait for each other). A rank whose
    share holds fewer than ``val_batches × batch_size`` clips reads some again: ``setup`` warns.

    Unusable samples are skipped, logged once and counted each time they are met (``skipped_counts()``).
    The data order is fixed by ``seed``, epoch, rank and worker; ``state_dict()`` records the position in
    the epoch and ``load_state_dict()`` resumes from it batch-exactly (with the same ``num_workers`` and
    devices).
    """

    def __init__(
        self,
        train_dir: str | list[str] | None = None,
        val_dir: str | list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 128,
        batches_per_epoch: int = 100,
        val_batches: int | None = None,
        seed: int = 0,
        train_weights: list[float] | None = None,
    ):
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("batches_per_epoch", batches_per_epoch, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.train_dir = _folder_or_folders(train_dir)
        self.train_dirs = _listed(self.train_dir)
        # Without train_dir there is nothing to train on (fit refuses that in setup), nor weights to check.
        self.train_weights = None if train_dir is None else _check_weights(self.train_dirs, train_weights)
        self.val_dir = _folder_or_folders(val_dir)
        self.val_dirs = _listed(self.val_dir)
        _check_listed_once("train_dir", self.train_dirs)
        _check_listed_once("val_dir", self.val_dirs)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = seed
        self._train_skips = SkipCounter(num_workers)
        self._val_skips = SkipCounter(num_workers)
        self._skipped_before: dict[str, int] = {}  # counted before the run resumed
        self._manifests: dict[str, dict[str, Any]] = {}
        self._repeated_keys: dict[str, dict[str, frozenset[str]]] = {}
        self._train_loader: ShardLoader | None = None
        self._next_epoch = 0  # used without a Trainer: each pass over the train loader is an epoch
        self._resume: tuple[int, int] | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._reads_training_data = True  # until a validate stage says otherwise

    # --- what the data is ----------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest of the first folder read (kind, video spec, codec, latent shape and statistics, ...):
        the first training folder, or the first validation folder of a module without ``train_dir``."""
        return self._manifest(self._folders()[0])

    @property
    def val_manifest(self) -> dict[str, Any] | None:
        """The (first) validation folder's manifest."""
        return self._manifest(self.val_dirs[0]) if self.val_dirs else None

    @property
    def val_names(self) -> list[str]:
        """What each validation folder's metrics are called: ``""`` for the first (logged as ``val/...``),
        then each other folder's path below the common parent of them all (``val/<name>/...``)."""
        if len(self.val_dirs) < 2:
            return [""] * len(self.val_dirs)
        parent = os.path.commonpath([os.path.abspath(folder) for folder in self.val_dirs])
        below = [Path(os.path.relpath(os.path.abspath(folder), parent)).as_posix() for folder in self.val_dirs]
        return ["", *below[1:]]

    def _manifest(self, folder: str) -> dict[str, Any]:
        if folder not in self._manifests:
            self._manifests[folder] = manifests.load_manifest(folder)
        return self._manifests[folder]

    def check_compatible(
        self,
        codec_identity: dict[str, Any] | None = None,
        latent_shape: tuple[int, ...] | None = None,
        video_shape: tuple[int, int, int] | None = None,
        text_encoder: dict[str, str] | None = None,
    ) -> None:
        """Raise when the shards were not made for this model.

        ``video_shape`` is (frames, height, width). For latent shards the codec identity (name and
        config hash, else CodecMismatchError) and ``latent_shape`` (t, h, w, c) must match; for raw
        shards the model encodes the video itself, so only the video shape is checked. ``text_encoder``
        is checked against cached text embeddings, when the shards have them.
        """
        for folder in self._folders():
            manifest, where = self._manifest(folder), f"shards in {folder}"
            stored = manifests.video_shape(manifest)
            if video_shape is not None and tuple(video_shape) != stored:
                frames, height, width = video_shape
                size = f"{height}" if height == width else f"{height}x{width}"
                raise ValueError(f"{where} hold clips of (frames, height, width) {stored}, "
                                 f"but the model expects {tuple(video_shape)}: make them again at the model's "
                                 f"size (`flowvid data from-videos ... --frames {frames} --size {size}`, then "
                                 "`encode-latents` for latent shards), or train a model of their size")
            if manifest["kind"] == "latent":
                if codec_identity is not None:
                    _check_shards_codec(manifests.codec_identity(manifest), codec_identity, folder,
                                        _raw_folder(manifest))
                if latent_shape is not None and tuple(latent_shape) != tuple(manifest["latent_shape"]):
                    raise ValueError(f"{where} hold latents of shape {tuple(manifest['latent_shape'])}, "
                                     f"but the model expects {tuple(latent_shape)}")
            cached = manifest.get("text_encoder")
            if text_encoder is not None and cached is not None:
                _check_shards_text_encoder(dict(cached), dict(text_encoder), folder, _raw_folder(manifest))

    def training_captions(self, per_folder: int) -> dict[str, list[str]]:
        """The captions of the first ``per_folder`` samples of each training folder, in stored order and read
        without the clips: the same on every rank. A damaged shard gives those before its damage."""
        return {folder: list(itertools.islice(captions_of_shards(self._shards(folder)), per_folder))
                for folder in self.train_dirs}

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far (train and validation, all workers; before a resume too), per reason.

        A sample counts each time it is met and skipped, not once: a damaged shard read again (every
        epoch, or many times an epoch when training resamples the shards) adds the samples it loses again,
        so the totals grow with the run and their rate is the rate of skips. ``flowvid data verify``
        counts a folder's damaged samples. The shards are trusted as they are: unlike ``encode-latents``,
        the stream does not check their sha256 (which costs a hash of every byte read).

        A resumed run counts as the uninterrupted one does, except that with worker processes the
        samples of the batches the workers had read ahead when the checkpoint was written count again."""
        counts = dict(self._skipped_before)
        for totals in (self._train_skips.totals(), self._val_skips.totals()):
            for reason, count in totals.items():
                counts[reason] = counts.get(reason, 0) + count
        return counts

    # --- Lightning hooks -----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        # Validating a checkpoint on held-out data must not need the training data at hand.
        self._reads_training_data = stage not in VALIDATION_ONLY_STAGES
        if self._reads_training_data and not self.train_dirs:
            raise ValueError("data.init_args.train_dir is not set, so there is nothing to train on; give the "
                             "training shards with --data.init_args.train_dir")
        folders = self._folders()
        for folder in folders[1:]:
            _check_same_space(self._manifest(folders[0]), self._manifest(folder), folders[0], folder)
        rank, world_size = self._rank_and_world_size()
        # Training draws from all the shards on every rank; validation reads the rank's share of them.
        placed = [(folder, 0, 1) for folder in self._training_folders()]
        placed += [(folder, rank, world_size) for folder in self.val_dirs]
        for folder, _, readers in placed:
            # Fail now, not in a worker, and on every rank: one failing alone leaves the others waiting for it.
            shards_for_rank(self._shards(folder), readers - 1, readers, folder)  # the last rank has fewest shards
        for folder in self.val_dirs:
            shares = self._clips_per_rank(folder, world_size)
            self._check_every_rank_lists_clips(folder, shares)
            if rank == 0:  # every rank finds the same in the manifest: one says it
                self._warn_when_validation_repeats_clips(folder, shares)
        for folder, reader, readers in placed:
            self._check_some_sample_is_usable(folder, reader, readers)

    def _check_every_rank_lists_clips(self, folder: str, shares: list[int]) -> None:
        """Refuse, on every rank, a validation folder whose shards leave some rank (``shares``: the clips each
        rank's shards list) no listed clip."""
        if 0 not in shares:
            return
        empty, world_size = shares.index(0), len(shares)
        names = ", ".join(Path(shard).name for shard in self._source(folder).for_rank(empty, world_size).shards)
        raise ValueError(f"{folder}: the shards that rank {empty} of {world_size} validates on ({names}) list no "
                         "clip, so it has nothing to read. Write the folder again with its clips spread over its "
                         "shards, or run on fewer devices.")

    def _warn_when_validation_repeats_clips(self, folder: str, shares: list[int]) -> None:
        """``val_batches`` batches per rank are read in passes over the rank's share of the shards: when a share
        (``shares``: the clips each rank's shards list) holds fewer clips, some are read again and weigh more
        in the validation metrics."""
        if self.val_batches is None:
            return
        reads = self.val_batches * self.batch_size
        if min(shares) < reads:
            warnings.warn(f"{folder}: validation reads val_batches × batch_size = {self.val_batches} × "
                          f"{self.batch_size} = {reads} clips per rank, but {_clips_held(shares)}: some clips "
                          f"are read more than once and weigh more in the validation metrics. "
                          f"{_how_to_read_each_once(min(shares), self.batch_size)}", stacklevel=3)
        elif self.num_workers > 1 and (repeat := self._worker_that_repeats_clips(folder, len(shares))):
            warnings.warn(f"{folder}: with num_workers={self.num_workers}, {repeat}: some clips are read more "
                          "than once and weigh more in the validation metrics. Lower num_workers, or write the "
                          "folder in more shards.", stacklevel=3)

    def _worker_that_repeats_clips(self, folder: str, world_size: int) -> str | None:
        """How a DataLoader worker reads clips again, if one does: each reads every num_workers-th of its rank's
        shards for every num_workers-th batch, and one that this leaves without a shard reads all the rank's
        shards, which the others read too."""
        workers, source = self.num_workers, self._source(folder)
        for rank in range(world_size):
            share = source.for_rank(rank, world_size)
            for worker in range(workers):
                batches = len(range(worker, self.val_batches, workers))
                if batches and worker >= len(share.shards):
                    return (f"rank {rank} has {len(share.shards)} validation shard(s) for {workers} workers, and "
                            f"worker {worker} reads the shards of the others again")
                held = sum(share.for_stream(worker, workers, share=True).samples)
                if held < batches * self.batch_size:
                    return (f"worker {worker} of rank {rank} reads {batches * self.batch_size} clips for its "
                            f"{batches} batch(es) from shards that list {held}")
        return None

    def _check_some_sample_is_usable(self, folder: str, rank: int, world_size: int) -> None:
        """Read the shards of ``folder`` that ``rank`` reads up to the first usable sample: a folder whose
        shards are all broken fails before training rather than at the first validation, minutes later."""
        probe = ShardStream(self._shards(folder), SampleSpec.from_manifest(self._manifest(folder)), batch_size=1,
                            batches=1, resample=False, shuffle_buffer=0, seed=self.seed, counter=SkipCounter(1))
        probe.place(rank, world_size)
        try:
            next(iter(probe), None)
        except RuntimeError as err:  # every shard of the rank is barren
            raise ValueError(f"the shards in {folder} hold no usable sample for rank {rank}: {err}") from err

    def train_dataloader(self) -> ShardLoader:
        sources = [self._source(folder, weight) for folder, weight in zip(self.train_dirs, self._weights())]
        stream = ShardStream(
            sources,
            SampleSpec.from_manifest(self.manifest),
            batch_size=self.batch_size,
            batches=self.batches_per_epoch,
            resample=True,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            counter=self._train_skips,
        )
        self._train_loader = ShardLoader(stream, self.num_workers, self._train_position,
                                         self.state_dict, self.load_state_dict)
        return self._train_loader

    def val_dataloader(self) -> ShardLoader | list:
        """One loader per validation folder: a list when there are several (or none)."""
        loaders = [self._val_loader(folder) for folder in self.val_dirs]
        return loaders[0] if len(loaders) == 1 else loaders

    def _val_loader(self, folder: str) -> ShardLoader:
        stream = ShardStream(
            [self._source(folder)],
            SampleSpec.from_manifest(self._manifest(folder)),
            batch_size=self.batch_size,
            batches=self.val_batches,
            resample=False,
            shuffle_buffer=0,
            seed=self.seed,
            counter=self._val_skips,
            held_earlier=self._held_earlier(folder),
        )
        return ShardLoader(stream, self.num_workers, lambda: (*self._rank_and_world_size(), 0, 0))

    def state_dict(self) -> dict[str, Any]:
        """Seed and position in the training stream (``epoch`` and ``batches_consumed`` in it), and the
        samples skipped so far."""
        epoch, consumed = self._consumed()
        if consumed >= self.batches_per_epoch:
            epoch, consumed = epoch + 1, 0
        return {"seed": self.seed, "epoch": epoch, "batches_consumed": consumed, "batch_size": self.batch_size,
                "num_workers": self.num_workers, "world_size": self._rank_and_world_size()[1],
                "mixture": self._mixture(), "skipped": self.skipped_counts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the training stream where ``state`` left it (on the next pass of the loader). Validation
        reads no training stream: there is nothing to continue, nor training folders to compare with."""
        if not self._reads_training_data:
            return
        # Lightning hands the state over twice, to the DataModule and to its loader: say what differs once.
        repeated, self._loaded_state = state == self._loaded_state, dict(state)
        # The position is counted in batches: with another batch size it falls on other samples.
        settings = (("seed", self.seed), ("batch_size", self.batch_size), ("num_workers", self.num_workers),
                    ("world_size", self._rank_and_world_size()[1]), ("mixture", self._mixture()))
        for key, now in settings:
            if key in state and state[key] != now and not repeated:
                rank_zero_warn(f"resuming with {key}={now} where the run had {state[key]}: the data order will differ")
        self._resume = (int(state["epoch"]), int(state["batches_consumed"]))
        self._skipped_before = {str(reason): int(count) for reason, count in (state.get("skipped") or {}).items()}
        self._next_epoch = self._resume[0]

    # --- helpers -------------------------------------------------------------------------------

    def _folders(self) -> list[str]:
        """Every folder the stage reads: the training folders (not when validating), then the validation ones."""
        return [*self._training_folders(), *self.val_dirs]

    def _training_folders(self) -> list[str]:
        return self.train_dirs if self._reads_training_data else []

    def _weights(self) -> list[float]:
        """Each training folder's share: ``train_weights``, else its samples."""
        return self.train_weights or [float(self._manifest(folder)["samples"]) for folder in self.train_dirs]

    def _mixture(self) -> dict[str, float] | None:
        """Each training folder's share of the samples, when there are several."""
        if len(self.train_dirs) < 2:
            return None
        weights = self._weights()
        return {folder: weight / sum(weights) for folder, weight in zip(self.train_dirs, weights)}

    def _shards(self, folder: str) -> list[str]:
        return [str(path) for path in shard_paths(folder, self._manifest(folder))]

    def _held_earlier(self, folder: str) -> dict[str, frozenset[str]]:
        """Keys of a validation folder held by more than one shard: each sample is validated once, whichever
        rank or worker reads the other copies. (A training stream resamples anyway; there a key met again
        within a shard is skipped, and `flowvid data verify` finds copies in other shards.)"""
        if folder not in self._repeated_keys:
            self._repeated_keys[folder] = keys_held_earlier(self._shards(folder))
        return self._repeated_keys[folder]

    def _clips_per_rank(self, folder: str, world_size: int) -> list[int]:
        """The clips the manifest lists in each rank's share of the folder's shards (``ShardSource.for_rank``)."""
        source = self._source(folder)
        return [sum(source.for_rank(rank, world_size).samples) for rank in range(world_size)]

    def _source(self, folder: str, weight: float = 1.0) -> ShardSource:
        """The folder's shards with the samples its manifest says each holds."""
        return ShardSource(self._shards(folder), [shard["samples"] for shard in self._manifest(folder)["shards"]], weight)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _train_position(self) -> tuple[int, int, int, int]:
        """(rank, world size, epoch, batches to skip) for the training pass about to start."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._next_epoch
        self._next_epoch = epoch + 1
        skip = 0
        if self._resume is not None:
            resume_epoch, consumed = self._resume
            self._resume = None
            skip = consumed if resume_epoch == epoch else 0
        return (*self._rank_and_world_size(), epoch, skip)

    def _consumed(self) -> tuple[int, int]:
        if self.trainer is not None:
            # Lightning's own count of finished training steps in this epoch: a checkpoint taken
            # after a step resumes after it, whatever batch the loader had already prefetched.
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            return self.trainer.current_epoch, int(progress.processed)
        if self._resume is not None:
            return self._resume
        if self._train_loader is None:
            return 0, 0
        return self._next_epoch - 1, self._train_loader.consumed


def _folder_or_folders(folders: str | os.PathLike | list[str] | None) -> str | list[str] | None:
    if folders is None or isinstance(folders, (str, os.PathLike)):
        return None if folders is None else str(folders)
    return [str(folder) for folder in folders]


def _listed(folders: str | list[str] | None) -> list[str]:
    return [] if folders is None else [folders] if isinstance(folders, str) else folders


def _check_listed_once(name: str, folders: list[str]) -> None:
    seen: dict[str, str] = {}
    for folder in folders:
        where = os.path.realpath(folder)  # a link to a listed folder, or another spelling of it, is that folder
        if where in seen:
            also = "" if os.path.abspath(folder) == os.path.abspath(seen[where]) else f" (also as {folder})"
            raise ValueError(f"{name} lists {seen[where]} more than once{also}")
        seen[where] = folder


def _clips_held(shares: list[int]) -> str:
    """``the folder holds 12`` on one rank, ``the shards list 12 clips for rank 0, 7 for rank 1`` on two."""
    if len(shares) == 1:
        return f"the folder holds {shares[0]}"
    later = "".join(f", {clips} for rank {rank}" for rank, clips in enumerate(shares) if rank > 0)
    return f"the shards list {shares[0]} clips for rank 0{later}"


def _how_to_read_each_once(fewest: int, batch_size: int) -> str:
    most = fewest // batch_size
    if most == 0:  # even one batch is more than the smallest share holds
        return f"Add clips (at least {batch_size} per rank), or lower batch_size to at most {fewest}."
    return f"Lower val_batches to at most {most}, or add clips."


def _check_weights(folders: list[str], weights: list[float] | None) -> list[float] | None:
    if not folders:
        raise ValueError("train_dir names no folder")
    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)):
        raise ValueError(f"train_weights must be a list of one number per train_dir folder, got {weights!r}")
    if len(weights) != len(folders):
        raise ValueError(f"train_weights has {len(weights)} weight(s) for {len(folders)} train_dir folder(s)")
    # An infinite weight would pass here and fail at the first draw, inside a loader worker.
    if not all(is_positive_number(weight) for weight in weights):
        raise ValueError(f"train_weights must all be > 0 and finite numbers, got {list(weights)}")
    return [float(weight) for weight in weights]


def _raw_folder(manifest: dict[str, Any]) -> str:
    """The raw shard folder the latent shards were encoded from, as encode-latents recorded it."""
    source = manifest.get("source")
    return str(source.get("raw") or "RAW_DIR") if isinstance(source, dict) else "RAW_DIR"


def _check_shards_codec(there: dict[str, Any], here: dict[str, Any], folder: str, raw: str) -> None:
    """Raise CodecMismatchError when the latent shards in ``folder`` (codec identity ``there``) were not made
    with the model's codec (``here``), naming what differs and the two ways out."""
    if same_codec(here, there):
        return
    raise CodecMismatchError(
        f"the shards in {folder} were made with codec {there.get('name')!r}, but the model uses "
        f"{here.get('name')!r}: they differ in {_codec_differences(there, here)}; encode the shards again "
        f"with the model's codec (`flowvid data encode-latents {raw} --out {folder} --codec {here.get('name')} "
        "--codec-args JSON`), or point the recipe at the codec the shards were made with")


def _codec_differences(there: dict[str, Any], here: dict[str, Any]) -> str:
    """The name, what else both identities record (an identity lacking a key is an older one) and the config
    settings that differ; the config hash when the configs are not recorded."""
    recorded = sorted((there.keys() & here.keys()) - {"name", "config", "config_hash"})
    identity = differences(there, here, ["name", *recorded])
    configs = there.get("config"), here.get("config")
    settings = differences(*configs) if all(isinstance(config, dict) for config in configs) else ""
    if not settings:
        settings = differences(there, here, ["config_hash"])
    return ", ".join(part for part in (identity, settings) if part)


def _check_shards_text_encoder(there: dict[str, Any], here: dict[str, Any], folder: str, raw: str) -> None:
    """Raise a ValueError when the text embeddings cached in ``folder`` (encoder identity ``there``) are not the
    model's text encoder's (``here``), naming the keys that differ (of those both identities record)."""
    if same_text_encoder(there, here):
        return
    shared = sorted((there.keys() & here.keys()) - {"name"})
    raise ValueError(
        f"the shards in {folder} cache text embeddings of text encoder {there.get('name')!r}, but the model uses "
        f"{here.get('name')!r}: they differ in {differences(there, here, ['name', *shared])}; encode the shards "
        f"again with the model's text encoder (`flowvid data encode-latents {raw} --out {folder} --text-encoder "
        f"{here.get('name')} --text-encoder-args JSON`), or point the recipe at the text encoder the shards "
        "were made with")


def _check_same_space(first: dict[str, Any], other: dict[str, Any], first_dir: str, other_dir: str) -> None:
    # Everything a sample is checked against: the training stream checks every folder's samples by the first's.
    for key in ("kind", "codec", "latent_shape", "text_encoder", "text_shape", "first_frame"):
        if not _same_space_value(key, first.get(key), other.get(key)):
            raise ValueError(f"the shards in {first_dir} and in {other_dir} differ in {key}: "
                             f"{first.get(key)!r} vs {other.get(key)!r}")
    if manifests.video_shape(first) != manifests.video_shape(other):
        raise ValueError(f"the shards in {first_dir} hold clips of {manifests.video_shape(first)} "
                         f"but those in {other_dir} {manifests.video_shape(other)}")


def _same_space_value(key: str, first: Any, other: Any) -> bool:
    if key == "codec" and first and other:
        return same_codec(first, other)
    return first == other


@DATASETS.register("synthetic")
class SyntheticVideoDataModule(VideoShardDataModule):
    """Captioned videos of moving shapes, written to ``root/train`` and ``root/val`` on first use.

    ``prepare_data`` (run once per node by Lightning) makes the shards unless ``root`` already holds
    the same dataset, made by this module or by ``make-synthetic`` with the same settings (the defaults
    of both agree, except ``val_videos``); one made with other settings is written again, with a
    warning naming the settings that differ. Validation holds only attribute combinations never seen
    in training. Keep ``val_videos / shard_samples`` at least the number of devices, so that every
    rank has a validation shard.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        num_videos: int = 512,
        val_videos: int = 64,
        frames: int = 8,
        size: int = 16,
        fps: float = 8.0,
        data_seed: int = 0,
        shard_samples: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 128,
        batches_per_epoch: int = 100,
        val_batches: int | None = None,
        seed: int = 0,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        backgrounds: Sequence[str] = BACKGROUNDS,
    ):
        super().__init__(str(Path(root) / "train"), str(Path(root) / "val"), batch_size, num_workers,
                         shuffle_buffer, batches_per_epoch, val_batches, seed)
        self.root = str(root)
        # Every argument the dataset's manifests record, so that an unchanged dataset is recognised.
        self.recipe = {"num_videos": num_videos, "val_videos": val_videos, "frames": frames, "size": size,
                       "fps": fps, "seed": data_seed, "shard_samples": shard_samples,
                       "max_objects": max_objects, "backgrounds": list(backgrounds)}

    def prepare_data(self) -> None:
        from flowvid.data.synthetic import synthetic_recipe, write_synthetic_dataset

        try:
            made = synthetic_recipe(self.root)
        except manifests.ManifestError:
            made = None  # no dataset there yet, or only part of one
        if made == self.recipe:
            return
        if made is not None:
            differing = differences(made, self.recipe, list(self.recipe))
            warnings.warn(f"{self.root} holds a synthetic dataset made with other settings: they differ in "
                          f"{differing}; writing it again with these", stacklevel=2)
        write_synthetic_dataset(self.root, **self.recipe)
        self._manifests.clear()
        self._repeated_keys.clear()
