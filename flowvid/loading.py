"""Load a trained model for generation or scoring, from a training checkpoint or an export."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from flowvid.adapters import apply_adapters
from flowvid.export import (
    CONFIG_NAME,
    build_with_files_found,
    check_flow_model,
    check_outside_parts,
    check_weights,
    checkpoint_weights,
    load_exported,
    load_weights,
    read_export_metadata,
    weights_taken,
    without_held_weight_files,
)
from flowvid.lit.checkpointing import METADATA_KEY, recorded_fps, resolve_checkpoint
from flowvid.part_files import run_folders


def load_model(path: str | os.PathLike, weights: str = "ema", map_location: str | torch.device = "cpu",
               adapters: str | os.PathLike | None = None, adapter_strength: float = 1.0) -> nn.Module:
    """The LightningModule of ``path`` in eval mode.

    ``path`` is an exported ``.safetensors`` file (with ``config.yaml`` beside it) or its folder, a Lightning
    checkpoint file, a DeepSpeed checkpoint directory, or a run directory (its newest readable
    checkpoint, in it or in its ``checkpoints/``). ``weights="ema"`` takes the moving average
    when the run kept one, ``weights="trained"`` the weights as trained (any other value is a ValueError);
    ``module.weights_used`` says which it took ("ema" or "trained").
    ``module.training_fps`` is the frame rate of the clips the model was trained on, in frames per second
    (a float), as the checkpoint or export records it from the training data's manifest; None where it is
    unknown (a checkpoint or export made before the rate was recorded, or data of no single rate).
    ``flowvid generate`` writes its videos at that rate and ``flowvid score`` reads video files at it.
    ``adapters`` (a file of ``flowvid export --adapters-only``) are merged into the weights, their updates
    scaled by ``adapter_strength``.

    A part that loads a folder or file of its own (a T5 folder, a Wan VAE) named by a relative path is
    looked for from the current folder, then beside an export (in its folder), or for a checkpoint in the
    folder its run was started in, its run directory and the checkpoint's folder: a model moves with its
    folders beside it.

    Raises FileNotFoundError, CorruptCheckpointError (a damaged or incomplete checkpoint or export) or
    ValueError (one that is no flow video generator, such as a video VAE's), each with a one-line reason.
    """
    check_weights(weights)
    path = model_file(path)
    if path.suffix == ".safetensors":
        used = exported_weights(path, weights)
        module = load_exported(path, map_location=map_location).module
    else:
        state_dict, config, client_state = checkpoint_weights(path, weights)
        recorded = client_state.get(METADATA_KEY) or {}
        # The checkpoint holds the weights of a codec trained for this model: its file may be long gone.
        config = without_held_weight_files(config, state_dict)
        check_flow_model(config, path)
        folders = [*run_folders(path, config), path.parent.resolve()]
        module = build_with_files_found(config, recorded, f"checkpoint {path}", "trained", folders)
        load_weights(module, state_dict, where=str(path))
        check_outside_parts(module, recorded, state_dict, where=f"checkpoint {path}")
        module = module.to(map_location).eval()
        module.training_fps = recorded_fps(recorded)
        used = weights_taken(weights, client_state)
    if adapters is not None:
        apply_adapters(module, adapters, adapter_strength)
    module.weights_used = used  # what a sample's record says: a run without a moving average has none
    return module


def exported_weights(path: Path, weights: str) -> str:
    """Which weights the export holds ("ema" or "trained"); refuses to pass its moving average off as the
    trained weights."""
    held = read_export_metadata(path).get("weights", "trained")
    if weights == "trained" and held == "ema":
        raise ValueError(f"{path} holds the moving average of the weights, not the trained weights: export "
                         "those with `flowvid export --weights trained`, or leave out --weights trained")
    return held


def model_file(path: str | os.PathLike) -> Path:
    """The export or checkpoint that ``path`` names (see ``load_model``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return export_in(path) or resolve_checkpoint(path)


def export_in(folder: Path) -> Path | None:
    """The export of a folder that holds one (``config.yaml`` beside a single ``.safetensors``). A run
    directory is none, although LightningCLI writes a ``config.yaml`` into it too."""
    if not (folder.is_dir() and (folder / CONFIG_NAME).is_file()):
        return None
    exports = sorted(folder.glob("*.safetensors"))
    if not exports:
        return None
    if len(exports) > 1:
        raise ValueError(f"{folder} holds {len(exports)} .safetensors files beside {CONFIG_NAME}"
                         f": {', '.join(p.name for p in exports)}; name the export to load")
    return exports[0]
