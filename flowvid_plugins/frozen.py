"""Keep a frozen pretrained submodule's weights out of checkpoints.

Pretrained encoders (a Wan VAE, T5) always load from their own files. Saving them again in every
model checkpoint would add gigabytes per file, so a module that holds one drops the child's tensors
from its state dict and, on loading, keeps the ones it already has (strict loading still passes).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def keep_out_of_checkpoints(module: nn.Module, child: str) -> None:
    """Leave ``module.<child>``'s parameters and buffers out of ``module``'s state dict."""

    def drop(_module: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
        for key in [key for key in state_dict if key.startswith(f"{prefix}{child}.")]:
            del state_dict[key]

    def keep(_module: nn.Module, state_dict: dict, prefix: str, *_args: Any) -> None:
        for name, tensor in getattr(module, child).state_dict().items():
            state_dict.setdefault(f"{prefix}{child}.{name}", tensor)

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(keep)
