"""Exponential moving average of a model's weights, used for validation and sampling."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    a bf16 average with decay 0.999 never moves. What it trains are the fp32 master weights in its
    optimiser, of which the module's weights are rounded copies, so the masters are what is averaged
    (see ``master``); under ZeRO-1/2 that gathers each master from every rank, so every rank must call
    ``update`` together (as every rank steps together).

    Only weights that train are averaged: a frozen weight is its own average, so the module's weight
    stands for it in ``averaged`` and in exports, and it costs no fp32 copy in memory or checkpoints.

    Under DeepSpeed ZeRO-3 a rank holds a flat shard of each weight (``ds_tensor``) and averages that
    shard. ``averaged`` writes the averages into the shards, from which DeepSpeed gathers the weights it
    uses, and into the whole copies it keeps gathered of small weights. ``state_dict`` gathers the shards
    into whole weights, so every rank must call it together (as Lightning saves checkpoints);
    ``load_state_dict`` keeps each rank's shard of whole weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), or null for no moving average, got {decay}")
        self.decay = decay
        self.parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}

    def stop_averaging_frozen(self) -> None:
        """Leave out the weights frozen since the EMA was made (``Freeze`` runs after the module is built)."""
        frozen = {name for name, p in self.parameters.items() if not p.requires_grad}
        self.frozen |= frozen
        self.parameters = {name: p for name, p in self.parameters.items() if name not in frozen}
        self.shadow = {name: average for name, average in self.shadow.items() if name not in frozen}

    @torch.no_grad()
    def update(self) -> None:
        for name, weight in self.parameters.items():
            weight = master(weight)
            if name not in self.shadow:  # the first update, or a weight the loaded averages leave out
                self.shadow[name] = weight.float().clone()
                continue
            if self.shadow[name].device != weight.device:  # the module moved after the EMA was made
                self.shadow[name] = self.shadow[name].to(weight.device)
            self.shadow[name].lerp_(weight.float(), 1.0 - self.decay)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Run the module with its averaged weights; the trained weights come back on exit. Weights
        without an average yet (none before the first update) stay as they are."""
        trained = {name: held(self.parameters[name]).detach().clone() for name in self.shadow}
        self._hold(self.shadow)
        try:
            yield
        finally:
            self._hold(trained)

    @torch.no_grad()
    def _hold(self, weights: dict[str, torch.Tensor]) -> None:
        """Make ``weights`` (what each rank holds, by parameter name) the module's weights."""
        for name, weight in weights.items():
            p = self.parameters[name]
            held(p).copy_(weight)
            if is_gathered(p):  # DeepSpeed keeps small ZeRO-3 weights gathered between steps
                p.data.copy_(whole(p, held(p)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 averages by parameter name (ZeRO-3 shards gathered from every rank)."""
        return {name: whole(self.parameters[name], shadow) for name, shadow in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Averages saved by ``state_dict`` (none when saved before the first update).

        Averages of weights frozen here are passed over: runs of earlier versions averaged frozen weights
        too. A weight that trains here but has no saved average (frozen in the saved run, where it was its
        own average) keeps its weight in ``averaged`` and starts an average at the next update.
        """
        unexpected = set(state) - set(self.parameters) - self.frozen
        if unexpected:
            raise KeyError(f"EMA state does not match the model: unexpected {sorted(unexpected)[:5]}")
        self.shadow = {name: shard_of(p, state[name]).to(held(p).device, torch.float32)
                       for name, p in self.parameters.items() if name in state}


def is_sharded(p: nn.Parameter) -> bool:
    """A ZeRO-3 parameter: this rank holds a flat shard of it, which DeepSpeed gathers when it is used."""
    return getattr(p, "ds_tensor", None) is not None


def is_gathered(p: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose whole weight is gathered on this rank now."""
    if not is_sharded(p):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE


def held(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 shard, or the whole weight."""
    return p.ds_tensor if is_sharded(p) else p


def master(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p`` as the optimiser steps it: DeepSpeed's fp32 master weight where
    the module's weight is a low-precision copy of one (a collective under ZeRO-1/2), else ``held(p)``.

    The module's bf16 copies are the masters rounded to 8 bits of mantissa, up to half a bf16 ulp
    (2^-9 relative) off; an average of them averages that rounding into the fp32 averages, while the
    trained weights a checkpoint exports are the masters.
    """
    weight = held(p).detach()
    if weight.dtype == torch.float32:  # the weights are what trains: DDP, one process, fp32 ZeRO
        return weight
    if hasattr(p, "_z3_optimizer"):  # ZeRO-3's optimiser holds this rank's shard of the master, as ds_tensor's
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).detach()
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 (or DeepSpeed's bf16 optimiser) partitions the masters over ranks
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach()
    return weight  # low-precision weights without masters (bf16-true without DeepSpeed) train as they are


def whole(p: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
    """The whole weight of ``p``'s shape from every rank's ``shard`` of it (a collective under ZeRO-3)."""
    if not is_sharded(p):
        return shard
    pieces = [torch.empty_like(shard) for _ in range(p.ds_zero_partition_world_size)]
    dist.all_gather(pieces, shard.contiguous(), group=p.ds_process_group)
    return torch.cat(pieces)[:p.ds_numel].view(p.ds_shape)


def shard_of(p: nn.Parameter, weight: torch.Tensor) -> torch.Tensor:
    """This rank's flat shard of a whole weight of ``p``, zero-padded as DeepSpeed pads it."""
    if not is_sharded(p):
        return weight
    size = p.ds_tensor.numel()
    flat = F.pad(weight.reshape(-1), (0, size * p.ds_zero_partition_world_size - weight.numel()))
    return flat[size * p.ds_zero_partition_rank:][:size]
