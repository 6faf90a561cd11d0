"""The streams behind the DataModule: shards -> checked samples -> shuffled batches, per rank and worker.

A training stream (one per rank and DataLoader worker) resamples all the shards forever (with a
shuffle buffer), with randomness of its own, and stops after a fixed number of batches, so every rank
runs the same number of steps: no rank waits for another at the end of an epoch. Every stream draws
from every shard because each gives the same number of batches: a stream dealt fewer or smaller
shards (the last shard of a folder is usually small) would give each of its samples more often.

A single pass (validation) splits the shards twice: rank ``r`` of ``R`` takes every R-th shard, and
within a rank the DataLoader's worker ``w`` of ``W`` takes every W-th of those, so that each sample is
read once.

A stream may mix several sources (shard folders). A resampled stream then draws a source's shard
with probability ``weight / samples`` of that source's shards, so that the expected share of samples
from each source is its weight, whatever the sizes of its shards.

Determinism: a stream's randomness is seeded by (seed, epoch, rank, stream), and the DataLoader asks
its workers for batches in turn, so batch ``i`` of an epoch is the ``i // W``-th batch of stream
``i % W``. To resume after ``k`` batches, worker ``w`` serves stream ``(w + k) % W`` and replays (reads
and drops) that stream's batches before ``k``: the rest of the epoch is the same, batch for batch.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowvid.data.shards import SKIP_REASONS, BadSample, LostSamples, SampleSpec, decode_sample, shard_samples

log = logging.getLogger("flowvid.data")

Sample = dict[str, Any]
Batch = dict[str, Any]


class SkipCounter:
    """Skipped samples per reason, summed over the DataLoader's worker processes.

    The counts live in shared memory; each worker writes its own row, so no update is lost.
    """

    def __init__(self, workers: int):
        self._counts = torch.zeros(max(1, workers), len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def add(self, reason: str, worker: int = 0, samples: int = 1) -> None:
        self._counts[worker % len(self._counts), SKIP_REASONS.index(reason)] += samples

    def totals(self) -> dict[str, int]:
        return {reason: int(count) for reason, count in zip(SKIP_REASONS, self._counts.sum(0)) if count}


def collate(samples: list[Sample]) -> Batch:
    """Stack arrays into tensors; keys, captions and metadata stay lists."""
    batch: Batch = {
        "key": [s["key"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    for name in ("video", "latents", "text_tokens", "text_mask", "first_frame"):
        if name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


def shards_for_rank(shards: list[str], rank: int, world_size: int, folder: str | None = None) -> list[str]:
    """Every ``world_size``-th shard from ``rank``; a clear error, naming ``folder`` (by default the first
    shard's), when that leaves none."""
    where = f"{folder}: " if folder else ""
    if not shards:
        raise ValueError(f"{where}the manifest lists no shards: there is no sample to read; write the folder "
                         "again (flowvid data from-videos, make-synthetic or encode-latents)")
    mine = shards[rank::world_size]
    if not mine:
        raise ValueError(
            f"{folder or os.path.dirname(shards[0])}: rank {rank} of {world_size} receives no shard, the folder "
            f"has {len(shards)} shard(s). Write at least {world_size} shards (a smaller --shard-samples) or run "
            f"on fewer devices."
        )
    return mine


@dataclass(frozen=True)
class ShardSource:
    """The shards of one folder, the samples each holds, and the folder's share of a mixture."""

    shards: list[str]
    samples: list[int]
    weight: float = 1.0

    def for_rank(self, rank: int, world_size: int) -> "ShardSource":
        return ShardSource(shards_for_rank(self.shards, rank, world_size), self.samples[rank::world_size], self.weight)

    def for_stream(self, stream: int, streams: int, share: bool) -> "ShardSource":
        """This source's part of worker stream ``stream`` of ``streams``: every ``streams``-th shard. With
        ``share``, a stream that this leaves without a shard reads them all rather than starve."""
        if share and len(self.shards) <= stream:
            return self
        return ShardSource(self.shards[stream::streams], self.samples[stream::streams], self.weight)


class ShardStream(IterableDataset):
    """Batches from shard sources for one rank, split over the DataLoader's workers.

    ``shards`` is a list of shard paths (one source) or of ``ShardSource`` (a mixture, see the module
    docstring). ``batches`` fixes the number of batches per rank and pass (required with
    ``resample``); with ``batches=None`` the stream is one ordered pass over the rank's shards, source
    after source. ``place`` tells the stream which rank, epoch and position it serves before each pass.
    A sample whose key its shard gave before, or that ``held_earlier[shard]`` lists (``keys_held_earlier``),
    is skipped as ``duplicate_key``.
    """

    def __init__(
        self,
        shards: list[str] | list[ShardSource],
        spec: SampleSpec,
        batch_size: int,
        batches: int | None,
        resample: bool,
        shuffle_buffer: int,
        seed: int,
        counter: SkipCounter,
        held_earlier: dict[str, frozenset[str]] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resample and batches is None:
            raise ValueError("a resampled stream is endless: give the number of batches per epoch")
        if not shards:
            raise ValueError("a stream needs at least one shard")
        if all(isinstance(source, ShardSource) for source in shards):
            self.sources = list(shards)
            # What the manifests say each shard holds: a shard that ends early (a zero-filled tail reads as
            # a normal end) is counted as broken, not silently shorter.
            self.listed = {shard: count for source in shards for shard, count in zip(source.shards, source.samples)}
        else:  # plain paths: one source, whose shard sizes do not matter
            self.sources = [ShardSource(list(shards), [1] * len(shards))]
            self.listed = {}
        self.spec = spec
        self.batch_size = batch_size
        self.batches = batches
        self.resample = resample
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.counter = counter
        self.held_earlier = held_earlier or {}
        self.rank, self.world_size, self.epoch, self.skip = 0, 1, 0, 0
        self.replaying = False

    def place(self, rank: int, world_size: int, epoch: int = 0, skip: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.epoch, self.skip = rank, world_size, epoch, skip

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("a single pass has the batches its workers make: its ShardLoader counts them")
        return self.batches

    def listed_batches(self, rank: int, world_size: int, workers: int) -> int:
        """The batches of a single pass for ``rank`` over the samples that the manifests list, each of the
        ``workers`` streams batching those of its own shards; fewer come when samples are skipped."""
        if not self.listed:
            raise TypeError("shards given as plain paths have no listed sizes to count batches by")
        rank_sources = [source.for_rank(rank, world_size) for source in self.sources]
        per_stream = [sum(sum(source.for_stream(stream, workers, share=False).samples) for source in rank_sources)
                      for stream in range(workers)]
        return sum(math.ceil(samples / self.batch_size) for samples in per_stream)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = (worker + self.skip) % workers
        rank_sources, sources = self._stream_sources(stream, workers)
        if not any(source.shards for source in sources):
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{stream}")
        samples = self._samples(sources, rank_sources, rng, worker)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        batches = _batched(samples, self.batch_size)
        if self.batches is None:
            yield from batches
            return
        for index in range(stream, self.batches, workers):
            # Batches before the resume position are read again only to be dropped: their skipped
            # samples are in the counts the checkpoint brought back.
            self.replaying = index < self.skip
            batch = next(batches, None)
            if batch is None:
                return
            if not self.replaying:
                yield batch

    def _stream_sources(self, stream: int, workers: int) -> tuple[list[ShardSource], list[ShardSource]]:
        """(the rank's sources, this stream's part of them). A resampled stream draws from all the shards
        (see the module docstring); a single ordered pass reads each of the rank's shards once; a stream
        of a fixed number of batches may share."""
        if self.resample:
            return self.sources, self.sources
        rank_sources = [source.for_rank(self.rank, self.world_size) for source in self.sources]
        return rank_sources, [source.for_stream(stream, workers, self.batches is not None) for source in rank_sources]

    def _samples(self, sources: list[ShardSource], rank_sources: list[ShardSource], rng: random.Random,
                 worker: int) -> Iterator[Sample]:
        """Checked samples; resampled shards forever, or ordered passes (one unless a batch count is set).

        A stream of a fixed number of batches must not run dry before it has them all: when a source's
        shards in this stream give no usable sample, it reads all the rank's shards of that source from
        then on (``_refilled``), as the rank's other streams read on (a resampled stream reads them all
        already).
        """
        endless = self.resample or self.batches is not None
        barren: set[str] = set()  # shards that gave no usable sample
        while True:
            for shard in self._order(sources, rng):
                found = False
                for sample in self._read(shard, worker):
                    found = True
                    yield sample
                if not found and endless:
                    barren.add(shard)
                    if any(_dry(source, barren) for source in sources):
                        sources = self._refilled(sources, rank_sources, barren)
                        break  # a new pass, over the refilled sources
            if not endless:
                return

    def _order(self, sources: list[ShardSource], rng: random.Random) -> list[str]:
        """The shards of one pass: in stored order, or drawn (with replacement) by the sources' weights."""
        shards = [shard for source in sources for shard in source.shards]
        if not self.resample:
            return shards
        if len(sources) == 1:  # uniform over the shards: each sample is drawn as often as any other
            return [rng.choice(shards) for _ in shards]
        weights = [source.weight / max(sum(source.samples), 1) for source in sources for _ in source.shards]
        return rng.choices(shards, weights, k=len(shards))

    def _refilled(self, sources: list[ShardSource], rank_sources: list[ShardSource],
                  barren: set[str]) -> list[ShardSource]:
        """Each dry source replaced by all the rank's shards of it. When those are all barren too, the rank
        has nothing left to give: a stream would never end, nor would a mixture keep its weights."""
        refilled = []
        for source, whole in zip(sources, rank_sources):
            if _dry(source, barren):
                if _dry(whole, barren):
                    raise RuntimeError(
                        f"no usable sample left in {len(set(whole.shards))} shard(s) read by rank {self.rank} "
                        f"(first: {whole.shards[0]}); skipped so far: {self.counter.totals()}"
                    )
                source = whole
            refilled.append(source)
        return refilled

    def _read(self, shard: str, worker: int) -> Iterator[Sample]:
        listed = self.listed.get(shard, 0)
        for raw in shard_samples(shard, listed, self.held_earlier.get(shard, frozenset())):
            if isinstance(raw, LostSamples):
                message = raw.message if raw.key is not None else _shard_loss(shard, listed, raw)
                self._skip(raw.reason, message, worker, raw.samples)
                continue
            try:
                yield decode_sample(raw, self.spec)
            except BadSample as err:
                self._skip(err.reason, str(err), worker)

    def _skip(self, reason: str, message: str, worker: int, samples: int = 1) -> None:
        if not self.replaying:
            self.counter.add(reason, worker, samples)
        if message not in _reported:  # a resampled stream meets the same bad sample again and again
            _reported.add(message)
            log.warning("skipped (%s): %s", reason, message)


_reported: set[str] = set()  # per process: each defect is logged once, counted every time


def _shard_loss(shard: str, listed: int, lost: LostSamples) -> str:
    """What a damaged shard costs, for the one warning about it: its samples are skipped again each time it
    is read, and ``verify`` counts the folder's damaged samples once."""
    return (f"{lost.message}; {lost.samples} of its {listed} listed samples are skipped each time it is read "
            f"(`flowvid data verify {os.path.dirname(shard) or '.'}` counts the folder's damaged samples)")


def _dry(source: ShardSource, barren: set[str]) -> bool:
    """Whether every shard of ``source`` has given no usable sample (one that is never drawn does not count)."""
    return bool(source.shards) and source.weight > 0 and barren >= set(source.shards)


def _shuffled(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def _batched(samples: Iterator[Sample], batch_size: int) -> Iterator[Batch]:
    group: list[Sample] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group:
        yield collate(group)


class ShardLoader(DataLoader):
    """A DataLoader that places its ShardStream (rank, epoch, position) before every pass.

    ``position()`` returns ``(rank, world_size, epoch, skip)`` for the pass about to start.
    ``state_dict`` / ``load_state_dict`` hand over to the owner's (the DataModule's), which makes
    the loader resumable in Lightning's eyes. ``consumed`` counts the batches handed out in this pass.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        position: Callable[[], tuple[int, int, int, int]],
        state_dict: Callable[[], dict[str, Any]] = dict,
        load_state_dict: Callable[[dict[str, Any]], None] = lambda state: None,
    ):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         pin_memory=torch.cuda.is_available())
        self._position = position
        self._state_dict, self._load_state_dict = state_dict, load_state_dict
        self.consumed = 0

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        rank, world_size, epoch, skip = self._position()
        self.dataset.place(rank, world_size, epoch, skip)  # type: ignore[attr-defined]
        self.consumed = skip
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def __len__(self) -> int:
        """The batches of a pass: the stream's fixed count, or for a single pass those that the samples the
        manifests list for the rank make, of which Lightning can then take a fraction (``limit_val_batches``)."""
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        if stream.batches is not None:
            return stream.batches
        rank, world_size, _, _ = self._position()
        return stream.listed_batches(rank, world_size, max(self.num_workers, 1))

    def state_dict(self) -> dict[str, Any]:
        return self._state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_state_dict(state)
