"""Learning-rate shape: linear warm-up, then a cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, peak: float, floor: float) -> float:
    """The learning rate at ``step``: ``peak * (step + 1) / warmup_steps`` during warm-up, then a cosine
    from ``peak`` down to ``floor`` at ``total_steps`` (and ``floor`` after it)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_lr: float) -> LambdaLR:
    """The same shape for every parameter group, each from its own peak (its initial ``lr``)."""
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")

    def factor_for(peak: float):
        return lambda step: warmup_cosine(step, warmup_steps, total_steps, peak, min(min_lr, peak)) / peak

    return LambdaLR(optimizer, [factor_for(group["lr"]) for group in optimizer.param_groups])
