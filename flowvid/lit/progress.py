"""The progress bar of ``flowvid fit``: runs are bounded by steps, and the bar says how far along they are.

Lightning's rich bar reads ``Epoch 3/-2`` when a run has ``max_steps`` and no ``max_epochs`` (Lightning
then sets ``max_epochs=-1``), which every flowvid recipe does. This one reads ``Epoch 3`` and shows
``step: 530/640`` beside the logged metrics (and not the logger's version number); with an epoch bound
its description is Lightning's.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` with the run's step out of ``max_steps`` and no epoch total when there is none."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version folder, drawn as "v_num: 0.000"
        if trainer.max_steps > 0:
            metrics = {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
        return metrics
