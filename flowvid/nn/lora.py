"""Low-rank adapters (LoRA): fine-tune a large model through a few small matrices per linear layer.

An adapted layer computes ``x W^T + b + scale * x A^T B^T`` with ``W, b`` frozen and only ``A`` (rank x
in) and ``B`` (out x rank) trained; ``B`` starts at zero, so the adapted model starts as the model it
adapts. A flow block stays exactly invertible whatever ``A`` and ``B`` are: the adapters change the
network that computes the affine parameters, never the affine step.

The adapted layer keeps the frozen ``weight`` and ``bias`` under their own names, so checkpoints, the
EMA and exports see the same keys as before, plus ``lora_a``, ``lora_b`` and ``lora_scale`` per layer.
``merge_lora`` folds those into plain weights: the merged model has the original architecture and
gives the adapted model's outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowvid.checks import is_positive_number

#: The linear layers of the transformer layers (attention and both feed-forward kinds).
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.gate_up", "mlp.proj")
ADAPTER_KEYS = ("lora_a", "lora_b", "lora_scale")


class LoRALinear(nn.Module):
    """``linear`` with its weight and bias frozen and a trainable update of rank ``rank``, scaled by
    ``alpha / rank``."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The same Parameter objects, not copies: the frozen weights keep their names in checkpoints and the EMA.
        self.weight = linear.weight.requires_grad_(False)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        # Also in the state dict, so that merge_lora needs nothing but the weights.
        self.register_buffer("lora_scale", torch.tensor(self.scale, device=linear.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "lora_scale")
        if stored is not None and not math.isclose(float(stored), self.scale, rel_tol=1e-6):
            # The forward pass uses the configured scale and merging the stored one: a mix would give
            # exports that are not the model trained.
            raise ValueError(f"{prefix.rstrip('.') or 'a LoRA layer'}: the adapters were trained at scale {float(stored):g} "
                             f"(alpha / rank), this model is configured for {self.scale:g}; set LoRA's alpha "
                             "and rank as they were trained, or train new adapters in a new run")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(x, self.lora_a)
        # out + scale * low B^T as one matmul that accumulates into out: no separate scale and add passes.
        return torch.addmm(out.flatten(0, -2), low.flatten(0, -2), self.lora_b.t(), alpha=self.scale).view_as(out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_a.shape[0]}"


def check_lora_settings(rank: int, alpha: float | None) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not is_positive_number(alpha):  # an infinite scale makes every output NaN
        raise ValueError(f"LoRA alpha must be > 0 and finite, got {alpha!r}")


def check_targets_match(modules: list[nn.Module], targets: tuple[str, ...] | list[str]) -> None:
    """Each of ``targets`` names a linear layer of ``modules``: a misspelt one would leave its layers
    unadapted without a word."""
    linear = [name for module in modules for name, layer in module.named_modules() if isinstance(layer, nn.Linear)]
    unmatched = [target for target in targets if not any(_targeted(name, (target,)) for name in linear)]
    if unmatched:
        endings = sorted({".".join(name.split(".")[-2:]) for name in linear if ".layers." in f".{name}"})
        raise ValueError(f"LoRA targets {', '.join(unmatched)} name no linear layer; the transformer layers' linear "
                         f"layers end in {', '.join(endings)}")


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def add_lora(module: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[str]:
    """Replace the linear layers of ``module`` named by ``targets`` (name suffixes, e.g. ``attn.qkv``)
    by adapted ones; returns their names. ``alpha`` defaults to ``rank`` (scale 1).

    Only linear layers inside transformer layers (``...layers.N...``) are adapted: a block reads its
    input and output projections' weights directly (the affine parameters are computed in fp32), so an
    adapter there would be silently skipped.
    """
    check_lora_settings(rank, alpha)
    targets = tuple(targets)
    chosen = [(name, layer) for name, layer in module.named_modules()
              if isinstance(layer, nn.Linear) and _targeted(name, targets)]
    outside = [name for name, _ in chosen if ".layers." not in f".{name}"]
    if outside:
        raise ValueError(f"LoRA adapts the linear layers of transformer layers only; {', '.join(outside[:3])} "
                         "is outside them (targets such as attn.qkv, attn.proj, mlp.fc, mlp.proj)")
    if not chosen:
        raise ValueError(f"LoRA found no linear layer named {', '.join(targets)} in {type(module).__name__}")
    for name, layer in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(layer, rank, float(rank if alpha is None else alpha)))
    return [name for name, _ in chosen]


def is_adapter_key(key: str) -> bool:
    return key.rpartition(".")[2] in ADAPTER_KEYS


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every adapted weight replaced by ``W + scale * B A`` and the adapter entries removed:
    the weights of the model without adapters. The merged weights are fp32 (or wider): a bf16 weight
    (DeepSpeed keeps the frozen ones in bf16) would round away most of a small update."""
    merged = {key: value for key, value in state.items() if not is_adapter_key(key)}
    for key in state:
        if key.rpartition(".")[2] != "lora_a":
            continue
        prefix = key.removesuffix("lora_a")  # "layers.0.attn.qkv." or "" for a bare adapted layer
        weight = state[prefix + "weight"]
        update = state[prefix + "lora_b"].float() @ state[prefix + "lora_a"].float()
        wide = torch.promote_types(weight.dtype, torch.float32)
        merged[prefix + "weight"] = weight.to(wide) + state[prefix + "lora_scale"].to(wide) * update.to(wide)
    return merged
