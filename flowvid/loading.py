"""Load a trained model for generation or scoring, from a training checkpoint or an export."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from flowvid.adapters import apply_adapters
from flowvid.export import build_module, checkpoint_weights, load_exported, load_weights


def load_model(path: str | os.PathLike, weights: str = "ema", map_location: str | torch.device = "cpu",
               adapters: str | os.PathLike | None = None, adapter_strength: float = 1.0) -> nn.Module:
    """The LightningModule of ``path`` in eval mode.

    ``path`` is an exported ``.safetensors`` file (with ``config.yaml`` beside it), a Lightning
    checkpoint file or a DeepSpeed checkpoint directory. ``weights="ema"`` takes the moving average
    when the run kept one. ``adapters`` (a file of ``flowvid export --adapters-only``) are merged into
    the weights, their updates scaled by ``adapter_strength``. Raises FileNotFoundError,
    CorruptCheckpointError (a damaged or incomplete checkpoint or export) or ValueError, each with a
    one-line reason.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        module = load_exported(path, map_location=map_location).module
    else:
        state_dict, config, _ = checkpoint_weights(path, weights)
        module = build_module(config)
        load_weights(module, state_dict, where=str(path))
        module = module.to(map_location).eval()
    if adapters is not None:
        apply_adapters(module, adapters, adapter_strength)
    return module
