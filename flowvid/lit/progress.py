"""The progress bar of ``flowvid fit``: runs are bounded by steps, and the bar says how far along they are.

Lightning's rich bar reads ``Epoch 3/-2`` when a run has ``max_steps`` and no ``max_epochs`` (Lightning
then sets ``max_epochs=-1``), which every flowvid recipe does. This one reads ``Epoch 3`` and shows
``step: 530/640`` beside the logged metrics (and not the logger's version number); with an epoch bound
its description is Lightning's. The bar counts the batches of the epoch, and after a resume its total
counts those before the resume too, as its count does.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` with the run's step out of ``max_steps`` and no epoch total when there is none."""

    def _get_train_description(self, current_epoch: int) -> str:
        if _bounded_by_epochs(self.trainer):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    @property
    def total_train_batches(self) -> int | float:
        """The batches this epoch will have run when the run ends or the epoch does, counted as the bar
        counts them: from the epoch's start, the batches before a resume included.

        Lightning counts one batch per step left, from when it asks (after a resume: ``14/7``); a model that
        accumulates ``accumulate_grad_batches`` batches a step (FlowModule) has that many times more, less
        the batches of the window in progress."""
        trainer = self.trainer
        if _bounded_by_epochs(trainer) or trainer.max_steps is None or trainer.max_steps <= 0:
            return super().total_train_batches
        accumulate = getattr(trainer.lightning_module, "hparams", {}).get("accumulate_grad_batches", 1)
        batches = trainer.fit_loop.epoch_loop.batch_progress
        in_window = (batches.total.ready - getattr(trainer.lightning_module, "accumulation_start", 0)) % accumulate
        left = (trainer.max_steps - trainer.global_step) * accumulate - in_window
        return min(trainer.num_training_batches, batches.current.ready + left)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version folder, drawn as "v_num: 0.000"
        if trainer.max_steps > 0:
            metrics = {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
        return metrics


def _bounded_by_epochs(trainer: Trainer) -> bool:
    # Lightning turns an unset max_epochs into -1 when fitting starts.
    return trainer.max_epochs is not None and trainer.max_epochs >= 0
