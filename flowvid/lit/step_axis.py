"""The one x-axis of a run's curves: optimiser steps.

Lightning logs at its count of batches whose step it logged, which under manual optimisation counts every
batch: with ``accumulate_grad_batches: k`` it runs k times ahead of the optimiser steps that validation,
samples and checkpoints are named by. flowvid logs its own values on the steps instead.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def logged_step(trainer: Trainer) -> int:
    """The step flowvid's evaluations are logged at: ``trainer.global_step``, the optimizer steps taken, which
    names the checkpoint of the same weights (``step=00000006.ckpt``). Lightning's own default, the batches
    whose step was logged, is one behind it after a step (and counts batches, not steps, when gradients
    accumulate)."""
    return trainer.global_step


def log_training_point(trainer: Trainer, metrics: dict[str, Any], step: int) -> None:
    """Log one point of the training curves at ``step``, the optimiser step a window of batches took (or
    failed to take), every ``log_every_n_steps`` steps; without accumulation, where Lightning would."""
    every = trainer.log_every_n_steps
    due = every > 0 and (step + 1) % every == 0  # Lightning's own rule, on its count before this step
    if not (due or trainer.fast_dev_run) or not trainer.loggers:
        return
    values = {name: float(value) for name, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
