"""Random numbers that depend only on the step: resumed runs draw exactly what uninterrupted ones drew.

Saving and restoring generator states is fragile: anything that draws between a checkpoint and the
next step (a validation pass, a data loader starting its epoch, a sanity check) shifts the stream, and
the states of ranks other than 0 are not in a DDP checkpoint. ``StepSeed`` instead seeds Python,
NumPy and torch (CPU and all GPUs) before every training batch from ``(seed, batch index, rank)``, and
before every validation batch from ``(seed, validation batch index, rank)``. The batch index is part of
Lightning's loop state, which every checkpoint restores, so the random numbers are restored with it;
validation is also identical at every evaluation, which makes validation losses comparable.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

_TRAIN, _VALIDATION = 0, 1


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (order matters)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch: CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepSeed(Callback):
    """Seeds every training and validation batch from the run seed, the batch index and the rank.

    Args:
        seed: the run seed; default the one given to ``seed_everything`` (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed

    @property
    def run_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Counts every batch of the run (including micro-batches of gradient accumulation) and is
        # restored by Lightning when resuming, also in the middle of an epoch.
        index = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        seed_all(mixed_seed(self.run_seed, _TRAIN, trainer.global_rank, index))

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        seed_all(mixed_seed(self.run_seed, _VALIDATION, trainer.global_rank, dataloader_idx, batch_idx))
