"""A skipped step names the batch that made it skip, and skips in a row stop a run across resumes."""

import logging

import pytest
import torch

import flowvid.lit.module as module_file
from test_train_resume import batches, make_module, trainer


def test_a_skipped_accumulation_window_names_its_bad_batch_not_its_last(caplog):
    module = make_module(accumulate_grad_batches=2)
    encode = module.latents_of

    def nan_in_batch_2(batch, key=""):
        latents = encode(batch, key)
        third = module.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 3  # batch_idx 2
        return latents * float("nan") if third else latents

    module.latents_of = nan_in_batch_2
    with caplog.at_level(logging.WARNING, logger="flowvid.train"):
        trainer(max_steps=2).fit(module, batches(6))
    assert module.skipped_steps == 1
    skips = [record.getMessage() for record in caplog.records if "skipped an optimiser step" in record.getMessage()]
    assert len(skips) == 1 and "non-finite values in the batch's latents in batch 2 of epoch 0" in skips[0], skips


def test_skips_in_a_row_are_counted_across_a_resume(tmp_path, monkeypatch):
    """A diverged run restarted from its checkpoint stops at the limit, not after the limit's worth more."""
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 4)
    module = make_module()
    module.latents_of = lambda batch, key="": torch.full((2, 3, 2, 3, 12), float("nan"))
    first = trainer(max_epochs=1)
    first.fit(module, batches(3))
    assert module.skipped_steps == 3
    first.save_checkpoint(tmp_path / "diverged.ckpt")

    resumed = make_module()
    resumed.latents_of = module.latents_of
    with pytest.raises(RuntimeError, match="4 optimiser steps in a row were skipped"):
        trainer(max_epochs=2).fit(resumed, batches(3), ckpt_path=tmp_path / "diverged.ckpt")
    assert resumed.skipped_steps == 4
