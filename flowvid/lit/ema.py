"""Exponential moving average of a model's weights, used for validation and sampling."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weight`` after every optimiser step.

    The averages live outside the module on purpose: as buffers they would be broadcast by DDP on
    every forward and would double the parameters that a strategy shards. They travel in the
    checkpoint through ``state_dict`` / ``load_state_dict``, keyed by parameter name.

    The average starts at the weights of the first update, not at construction: weights loaded into
    the module after it was built (an export, a fine-tuning start) are what it averages from, and a
    module that never trained has no average to swap in.

    The averages are fp32 whatever the weights' dtype. DeepSpeed under bf16 keeps the module's weights
    in bf16, whose 8-bit mantissa would round away every step's ``(1 - decay)`` share of a small change:
    a bf16 average with decay 0.999 never moves.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}
            return
        for name, weight in self.parameters.items():
            if self.shadow[name].device != weight.device:  # the module moved after the EMA was made
                self.shadow[name] = self.shadow[name].to(weight.device)
            self.shadow[name].lerp_(weight.detach().float(), 1.0 - self.decay)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Run the module with its averaged weights; the trained weights come back on exit."""
        if not self.shadow:
            yield
            return
        trained = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:  # saved before the first update
            self.shadow = {}
            return
        missing = set(self.parameters) - set(state)
        unexpected = set(state) - set(self.parameters)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        self.shadow = {name: state[name].to(self.parameters[name].device, torch.float32) for name in self.parameters}
