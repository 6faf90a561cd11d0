"""Fingerprints that tell one model's weights from another's without hashing gigabytes of them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn


def weights_fingerprint(module: nn.Module, values_per_tensor: int = 4096) -> str:
    """sha256 (16 hex digits) over every tensor's name, shape and dtype and up to ``values_per_tensor`` of
    its values, evenly spread: two checkpoints of one architecture (another fine-tune, another release)
    differ in it, and a multi-GB encoder is fingerprinted in a moment."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().flatten()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(flat[::max(1, flat.numel() // values_per_tensor)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def json_fingerprint(value: Any) -> str:
    """sha256 (16 hex digits) of ``value`` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
