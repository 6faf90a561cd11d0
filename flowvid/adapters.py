"""LoRA adapter files: a run's adapters alone, applied to the model they adapted.

A LoRA run's export (``flowvid export``) is the whole model with the adapters merged in. The adapters
alone are a few MB where the model is GB, so they can be shared and applied to the model they were
trained on, at any strength. Parts the run trained in full beside the adapters (the LoRA recipe's
denoiser and text encoder) go into the file whole, so that the file turns the model into the one
fine-tuned::

    flowvid export --ckpt runs/finetune_lora/checkpoints/step=00002000.ckpt --out lora/style.safetensors \\
        --adapters-only
    flowvid generate --ckpt exported/model.safetensors --lora lora/style.safetensors --lora-strength 0.8 ...

``strength`` scales every update, an adapter's or a whole weight's (``w0 + strength * (w1 - w0)``): 0 is
the model without it, 1 the model as fine-tuned. The file records a fingerprint of the weights the
adapters were trained on; applied to other weights of the same shapes (the run's merged export, say,
which has them in already), they are applied with a warning, since the result is not the fine-tuned model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flowvid.caller_warnings import warn_caller
from flowvid.export import check_export_path, checkpoint_weights, load_weights, reading_export
from flowvid.lit.checkpointing import resolve_checkpoint
from flowvid.nn.lora import is_adapter_key, merge_lora
from flowvid.paths import write_atomically

FORMAT = "flowvid-lora"
#: Entries of each adapted weight that go into the fingerprint of the weights adapted: a different model
#: differs almost everywhere, so a spread of them tells two apart without reading gigabytes.
FINGERPRINT_ENTRIES = 4096


def export_adapters(ckpt: str | os.PathLike, out: str | os.PathLike, weights: str = "ema",
                    force: bool = False) -> Path:
    """Write the LoRA adapters of checkpoint ``ckpt`` (the moving average when the run kept one and
    ``weights="ema"``) to ``out``, a safetensors file of fp32 tensors; return ``out``."""
    out = Path(out)
    check_export_path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    ckpt = resolve_checkpoint(ckpt)
    state, _, client_state = checkpoint_weights(ckpt, weights, merge_adapters=False)
    adapters = {name: tensor.float().contiguous() for name, tensor in state.items() if is_adapter_key(name)}
    if not adapters:
        raise ValueError(f"{ckpt} holds no LoRA adapters (its run had no LoRA callback); export the whole "
                         "model without --adapters-only")
    trained = (client_state.get("flowvid") or {}).get("trained") or []
    whole = sorted(name for name in trained if not is_adapter_key(name) and name in state)
    adapters.update({name: state[name].float().contiguous() for name in whole})
    layers = sorted({name.rpartition(".")[0] for name in adapters if is_adapter_key(name)})
    metadata = {"format": FORMAT, "source": Path(ckpt).name, "global_step": str(client_state.get("global_step", "")),
                "layers": json.dumps(layers), "whole_weights": json.dumps(whole),
                "base_fingerprint": base_fingerprint(state, layers), "base_shapes": json.dumps(base_shapes(state))}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda path: save_file(adapters, str(path), metadata=metadata))
    return out


def base_fingerprint(weights: dict[str, torch.Tensor], layers: list[str]) -> str:
    """A digest of the weights of the adapted ``layers`` (without their adapters), taken in bf16 so that
    an fp32 and a bf16 export of the same model have the same."""
    digest = hashlib.sha256()
    for layer in layers:
        flat = weights[f"{layer}.weight"].detach().flatten()
        spread = flat[::max(1, flat.numel() // FINGERPRINT_ENTRIES)][:FINGERPRINT_ENTRIES]
        digest.update(layer.encode())
        digest.update(spread.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def base_shapes(weights: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The shape of every weight of the model adapted, the adapters left out."""
    return {name: list(tensor.shape) for name, tensor in weights.items() if not is_adapter_key(name)}


def check_same_architecture(path: str | os.PathLike, weights: dict[str, torch.Tensor]) -> None:
    """Adapters fit layer by layer also a model with more layers or blocks, which they would leave partly
    unadapted: refuse a model whose weights differ from those of the model adapted (files written before
    the shapes were recorded are not checked)."""
    recorded = read_adapter_metadata(path).get("base_shapes")
    if recorded is None:
        return
    expected, actual = json.loads(recorded), base_shapes(weights)
    differences = ([f"the model has {name}, the model adapted had not" for name in actual if name not in expected]
                   + [f"the model lacks {name}" for name in expected if name not in actual]
                   + [f"{name} is {tuple(actual[name])} in the model, {tuple(expected[name])} in the model adapted"
                      for name in actual if name in expected and actual[name] != expected[name]])
    if differences:
        more = f" (+{len(differences) - 1} more)" if len(differences) > 1 else ""
        raise ValueError(f"the LoRA adapters of {path} were trained on a model of another architecture: "
                         f"{differences[0]}{more}; apply them to the model they were trained on")


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a file written by ``export_adapters``; refuses any other file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file {path} does not exist")
    with reading_export(path), safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a LoRA adapter file (format {metadata.get('format')!r}); write one with "
                         "`flowvid export --adapters-only`")
    return metadata


def read_adapters(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors of a file written by ``export_adapters``."""
    read_adapter_metadata(path)
    with reading_export(path):
        return load_file(str(path))


def apply_adapters(module: nn.Module, path: str | os.PathLike, strength: float = 1.0) -> None:
    """Merge the adapters of ``path`` into ``module``'s weights, their updates scaled by ``strength``."""
    check_strength(strength)
    adapters = read_adapters(path)
    weights = module.state_dict()
    whole = {name: adapters.pop(name) for name in list(adapters) if not is_adapter_key(name)}
    for name, tensor in whole.items():
        if name not in weights or weights[name].shape != tensor.shape:
            found = "no such weight" if name not in weights else f"a weight of {tuple(weights[name].shape)}"
            raise ValueError(f"the LoRA file {path} does not fit this model: it trained {name} of "
                             f"{tuple(tensor.shape)}, the model has {found}; apply it to the model it was trained on")
    for layer in sorted({name.rpartition(".")[0] for name in adapters}):
        weight = weights.get(f"{layer}.weight")
        update = (adapters[f"{layer}.lora_b"].shape[0], adapters[f"{layer}.lora_a"].shape[1])
        if weight is None or tuple(weight.shape) != update:
            found = "no such layer" if weight is None else f"a weight of {tuple(weight.shape)}"
            raise ValueError(f"the LoRA adapters of {path} do not fit this model: {layer} adapts {update}, the "
                             f"model has {found}; apply them to the model they were trained on")
    check_same_architecture(path, weights)
    warn_if_other_base(path, weights, sorted({name.rpartition(".")[0] for name in adapters}))
    device = next(iter(weights.values())).device
    scaled = {name: (tensor * strength if name.endswith("lora_scale") else tensor).to(device)
              for name, tensor in adapters.items()}
    moved = {name: weights[name] + strength * (tensor.to(device, weights[name].dtype) - weights[name])
             for name, tensor in whole.items()}
    merged = merge_lora({**weights, **moved, **scaled})
    load_weights(module, merged, where=str(path))


def check_strength(strength: float) -> None:
    # A NaN or infinite strength makes NaN weights, which would be reported as a damaged file.
    if not math.isfinite(strength):
        raise ValueError(f"the LoRA strength must be a finite number (0: the model as it was, 1: as fine-tuned), "
                         f"got {strength}")


def warn_if_other_base(path: str | os.PathLike, weights: dict[str, torch.Tensor], layers: list[str]) -> None:
    """Adapters fit any model of the same shapes, but make the fine-tuned model only from the weights they
    were trained on: say so when these are others (files written before the fingerprint are not checked)."""
    expected = read_adapter_metadata(path).get("base_fingerprint")
    if expected and base_fingerprint(weights, layers) != expected:
        warn_caller(f"the LoRA adapters of {path} were trained on other weights than this model's (the merged "
                    "export of their run has them in already); applied all the same, the result is not the "
                    "fine-tuned model. Apply them to the model their run started from")


def add_adapter_arguments(parser) -> None:
    """``--lora`` and ``--lora-strength`` for the commands that load a model."""
    parser.add_argument("--lora", default=None,
                        help="a LoRA adapter file (flowvid export --adapters-only) to apply to the model")
    parser.add_argument("--lora-strength", type=float, default=1.0,
                        help="scale of the adapters' update: 0 leaves the model as it is, 1 is as trained")


def check_adapter_arguments(lora: str | None, strength: float) -> None:
    if lora is None and strength != 1.0:
        raise ValueError("--lora-strength needs --lora")
    if not math.isfinite(strength):
        raise ValueError(f"--lora-strength must be a finite number, got {strength}")
