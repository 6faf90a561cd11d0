"""Activation checkpointing: trade compute for memory in the flow's transformer layers.

A layer whose forward is checkpointed keeps only its input during the forward pass and recomputes
its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant, so it composes with
DDP and DeepSpeed ZeRO). The deep block dominates activation memory at scale (all frames in one
causal sequence), so it is the default choice. Results are unchanged: the recomputation is exact.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowvid.flows.global_local import GlobalLocalFlow

_MARK = "_flowvid_checkpointed"


def checkpoint_module(module: nn.Module) -> None:
    """Make ``module`` recompute its activations in the backward pass (a no-op without grad)."""
    if getattr(module, _MARK, False):
        return
    forward = module.forward

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # no backward pass to save memory for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward
    setattr(module, _MARK, True)


def checkpoint_flow_layers(flow: GlobalLocalFlow, blocks: Literal["deep", "shallow", "all"] = "deep") -> int:
    """Checkpoint every transformer layer of the chosen blocks; return how many layers."""
    chosen = {"deep": [flow.deep], "shallow": list(flow.shallow), "all": flow.blocks}
    if blocks not in chosen:
        raise ValueError(f"blocks must be one of {sorted(chosen)}, got {blocks!r}")
    count = 0
    for block in chosen[blocks]:
        layers = getattr(block, "layers", None)
        if layers is None:
            raise ValueError(f"{type(block).__name__} has no `layers` to checkpoint")
        for layer in layers:
            checkpoint_module(layer)
            count += 1
    return count


class ActivationCheckpointing(Callback):
    """Checkpoint the transformer layers of the deep block (default), the shallow blocks, or all.

    Applies to every ``GlobalLocalFlow`` inside the LightningModule, before the strategy wraps it.
    """

    def __init__(self, blocks: Literal["deep", "shallow", "all"] = "deep"):
        self.blocks = blocks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        flows = [m for m in pl_module.modules() if isinstance(m, GlobalLocalFlow)]
        if not flows:
            raise ValueError(f"ActivationCheckpointing found no GlobalLocalFlow in {type(pl_module).__name__}")
        for flow in flows:
            checkpoint_flow_layers(flow, self.blocks)
