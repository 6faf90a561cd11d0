"""The run's count of skipped samples (corrupt clips, unreadable shards), over all ranks and across resumes.

It counts skips, not damaged samples: a sample counts each time the data stream meets and skips it, so
a damaged shard read again (every epoch, or repeatedly when training resamples its shards) counts its
lost samples again, and the slope of ``data/skipped_samples`` is the rate of skips. ``flowvid data
verify FOLDER`` counts a folder's damaged samples.

Each rank's data module counts what it skipped itself. The run's totals are those counts summed over
the ranks, plus what the run had counted before it last resumed. A checkpoint is rank 0's, and on
resuming every rank's data module starts again from rank 0's own counts, so the sum over the ranks then
holds those ``world_size`` times: the offset takes them out and puts the saved totals in.
"""

from __future__ import annotations

from typing import Any

import torch

from flowvid.data.shards import SKIP_REASONS


def per_reason(counts: dict[str, int]) -> torch.Tensor:
    """Skipped-sample counts as a vector over SKIP_REASONS, the same layout on every rank."""
    return torch.tensor([counts.get(reason, 0) for reason in SKIP_REASONS], dtype=torch.int64)


def by_reason(vector: torch.Tensor) -> dict[str, int]:
    """The reasons of ``per_reason``'s vector that have a count."""
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, vector) if n}


class SkippedSamples:
    """The skipped-sample totals of a run whose data module counts them (``skipped_counts()``): samples
    skipped each time they are met, so a damaged shard adds its lost samples at every read.

    ``totals``, ``metrics`` and ``state`` all-reduce over the ranks: every rank must call them together.
    """

    def __init__(self) -> None:
        self.offset = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        self.resumed: dict[str, dict[str, int]] | None = None  # the checkpoint's record, until training starts

    @staticmethod
    def rank_counts(trainer: Any) -> torch.Tensor | None:
        """This rank's data module's counts per SKIP_REASONS; None without a data module that counts."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "skipped_counts"):
            return None
        return per_reason(datamodule.skipped_counts())

    def totals(self, trainer: Any, device: torch.device) -> dict[str, int] | None:
        """The ranks' counts summed, with what the run counted before it resumed; the same on every rank."""
        counts = self.rank_counts(trainer)
        if counts is None:
            return None
        if trainer.world_size > 1:
            counts = counts.to(device)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        return by_reason(counts.cpu() + self.offset)

    def metrics(self, trainer: Any, device: torch.device) -> dict[str, float]:
        """The totals to log, in all and per reason."""
        totals = self.totals(trainer, device)
        if totals is None:
            return {}
        return {"data/skipped_samples": float(sum(totals.values())),
                **{f"data/skipped_{reason}": float(n) for reason, n in totals.items()}}

    def state(self, trainer: Any, device: torch.device) -> dict[str, dict[str, int]] | None:
        """What a checkpoint keeps: the run's totals, and this rank's data module's own counts."""
        totals = self.totals(trainer, device)
        if totals is None:
            return None
        return {"total": totals, "datamodule": by_reason(self.rank_counts(trainer))}

    def resume(self, world_size: int) -> None:
        """Continue the totals of the checkpoint loaded before (``resumed``) on ``world_size`` ranks."""
        if self.resumed is None:  # a checkpoint of an earlier version, or of a run without a data module that counts
            return
        self.offset = per_reason(self.resumed["total"]) - world_size * per_reason(self.resumed["datamodule"])
