"""A skipped step names the batch that made it skip."""

import logging

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
    skips = [record.getMessage() for record in caplog.records if "skipped training step" in record.getMessage()]
    assert len(skips) == 1 and "non-finite values in the batch's latents in batch 2 of epoch 0" in skips[0], skips
