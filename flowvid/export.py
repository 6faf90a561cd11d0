"""``flowvid export``: a training checkpoint -> one portable ``safetensors`` file + ``config.yaml``.

::

    flowvid export --ckpt runs/demo/checkpoints/step=00010000.ckpt --out exported/model.safetensors \\
        [--dtype fp32|bf16] [--weights ema|trained] [--force]

The checkpoint may be a Lightning file (single device, DDP) or a DeepSpeed directory sharded over any
number of ranks; the export holds the whole module's weights, consolidated, and loads on any number of
devices. ``config.yaml`` (written beside it) is the run's config, so ``model:`` rebuilds the module;
``README.md``, a model card, says what the model is and how to use it (a README of your own stays).
``--out`` may name a folder instead, one that exists or ``exported/``: the export is then
``model.safetensors`` in it, the name under which ``--ckpt FOLDER`` finds it.

Loading (``load_exported``) reads only safetensors and YAML: no pickle, so no code hidden in the
file runs. The classes built are the ones the config names, as with a recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flowvid.checks import differences, first_non_finite
from flowvid.cli import HelpFormatter, exit_statuses, help_text
from flowvid.codecs.base import LatentCodec, check_codec_identity
from flowvid.lit.checkpointing import (
    METADATA_KEY,
    CheckpointMismatchError,
    CorruptCheckpointError,
    consolidated_state_dict,
    list_checkpoints,
    load_client_state,
    recorded_fps,
    resolve_checkpoint,
)
from flowvid.model_card import CARD_NAME, is_card, is_replaceable, model_card
from flowvid.nn.lora import is_adapter_key, merge_lora
from flowvid.part_files import missing_file_line, missing_files, with_files_found
from flowvid.paths import check_output_file, write_atomically
from flowvid.registry import describe, distribution_of, imported, registered_as
from flowvid.text.base import TextEncoder, same_text_encoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_NAME = "config.yaml"
#: The file an export into a folder (``--out FOLDER``) writes there.
EXPORT_NAME = "model.safetensors"
FORMAT = "flowvid"
#: Metadata fields stored as JSON (safetensors metadata holds strings only). ``fps`` is the frame rate of the
#: training clips (null where the checkpoint records none; exports made before it was recorded lack it).
JSON_FIELDS = ("flowvid_version", "codec", "text_encoder", "plugins", "fps")
#: The weights a checkpoint gives: the moving average (when the run kept one) or the weights as trained.
WEIGHTS = ("ema", "trained")


@dataclass
class ExportedModel:
    """A loaded export: the whole LightningModule and its parts (None where the model has none)."""

    module: nn.Module
    flow: nn.Module
    codec: nn.Module | None
    text_encoder: nn.Module | None
    denoiser: nn.Module | None
    config: dict[str, Any]


# --- export ----------------------------------------------------------------------------------------


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32",
                      weights: str = "ema", force: bool = False) -> Path:
    """Write ``out`` (safetensors) and ``config.yaml`` beside it from checkpoint ``ckpt``; return ``out``.
    A model card, ``README.md``, goes beside them too, unless a README that flowvid did not write is there.

    Args:
        ckpt: a Lightning checkpoint file, a DeepSpeed checkpoint directory or a run directory (its
            newest readable checkpoint).
        out: the ``.safetensors`` file to write, or a folder (one that exists, or a path ending in a
            separator) to write ``model.safetensors`` into.
        dtype: ``fp32`` or ``bf16`` for the floating-point tensors.
        weights: ``ema`` exports the moving average when the run kept one (else the trained
            weights); ``trained`` always exports the trained weights.
        force: overwrite ``out`` and ``config.yaml`` when they exist.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_weights(weights)
    out = export_file(out)
    config_path = out.parent / CONFIG_NAME
    check_export_path(out, folder_taken=True)
    if not force:
        for existing in (p for p in (out, config_path) if p.exists()):
            raise FileExistsError(f"{existing} exists; pass --force to overwrite it")

    ckpt = resolve_checkpoint(ckpt)
    state_dict, config, client_state = checkpoint_weights(ckpt, weights)
    check_flow_model(config, ckpt)
    tensors = {name: _portable(tensor, DTYPES[dtype]) for name, tensor in state_dict.items()}
    run = client_state.get(METADATA_KEY) or {}
    used = weights_taken(weights, client_state)
    config_text = yaml.safe_dump(without_held_weight_files(config, tensors), sort_keys=False)
    metadata = {
        "format": FORMAT,
        "dtype": dtype,
        "weights": used,
        "source": str(Path(ckpt).name),
        "global_step": str(client_state.get("global_step", "")),
        **{key: json.dumps(run.get(key)) for key in JSON_FIELDS},
        "config_sha256": sha256(config_text),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda path: save_file(tensors, str(path), metadata=metadata))
        write_atomically(config_path, lambda path: path.write_text(config_text))
        card = out.parent / CARD_NAME
        if is_replaceable(card):
            text = model_card(out.parent, out.name, decode_metadata(metadata), config, tensors)
            write_atomically(card, lambda path: path.write_text(text))
    except (OSError, SafetensorError) as err:  # a full disk, a folder without write permission
        raise OSError(f"cannot write the export {out}: {getattr(err, 'strerror', None) or err}") from None
    return out


def check_flow_model(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse the checkpoint or export of a module other than a flow video generator (a VideoVAE's, say):
    an export of it would carry a flow model's card, and generating or scoring would fail deep inside."""
    from flowvid.codecs.vae_training import VideoVAEModule, architecture_in, codec_commands
    from flowvid.lit.module import FlowModule

    class_path = str(((config.get("model") or {}).get("class_path")) or "")
    try:
        module_class = imported(class_path)
    except (ImportError, AttributeError, ValueError):  # building the module later says what is missing
        return
    if not isinstance(module_class, type) or issubclass(module_class, FlowModule):
        return
    said = f"{path} holds a {class_path}, not a flow video generator"
    if issubclass(module_class, VideoVAEModule):
        checkpoint = "CKPT" if Path(path).suffix == ".safetensors" else str(path)  # an export is no codec file
        encode, save = codec_commands(checkpoint, architecture_in(config))
        said += f"; a video VAE's training checkpoint is a codec as it is: `{encode}`, or {save} in Python"
    raise ValueError(said)


def check_weights(weights: str) -> None:
    """A ValueError unless ``weights`` is one of ``WEIGHTS``: the loaders take the moving average only for
    "ema", so any other spelling ("EMA", a typo) would give the trained weights without a word."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")


def without_held_weight_files(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``config`` less the weight files (a ``VideoVAE``'s ``checkpoint``) of the parts whose weights the
    export holds: such a file lies on the training machine, and an export must load without it."""
    config = copy.deepcopy(config)
    for name, part in ((config.get("model") or {}).get("init_args") or {}).items():
        init_args = part.get("init_args") if isinstance(part, dict) else None
        if isinstance(init_args, dict) and "checkpoint" in init_args and any(key.startswith(f"{name}.")
                                                                             for key in tensors):
            del init_args["checkpoint"]
    return config


def export_file(out: str | os.PathLike) -> Path:
    """The file an export to ``out`` writes: ``out`` itself, or ``model.safetensors`` in it when ``out`` is
    a folder that exists or is spelt as one (``exported/``), since that is how exports are loaded too."""
    spelt_as_folder = str(out).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    out = Path(out)
    return out / EXPORT_NAME if spelt_as_folder or out.is_dir() else out


def check_export_path(out: Path, folder_taken: bool = False) -> None:
    """Refuse, before the checkpoint is read, an ``out`` that cannot be an export: a folder, a path
    inside a file, or a name without the ``.safetensors`` ending by which generate and score know one.
    ``folder_taken``: the command also takes a folder spelt with a trailing separator (``export_file``)."""
    check_output_file(out, "--out", f"give the file to write, e.g. {out / 'model.safetensors'}")
    if out.suffix != ".safetensors":
        folder = f", or a folder as {out}{os.sep} (for {out / EXPORT_NAME})" if folder_taken else ""
        raise ValueError(f"--out {out} does not end in .safetensors, which is how generate and score know an "
                         f"export; name it {out.with_suffix('.safetensors')}{folder}")


def checkpoint_weights(ckpt: str | os.PathLike, weights: str = "ema",
                       merge_adapters: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The module weights of ``ckpt`` (the EMA when ``weights="ema"`` and the run kept one), the run's
    config (``{"model": {class_path, init_args}, ...}``) and the checkpoint's client state. LoRA
    adapters are merged into the weights they adapt unless ``merge_adapters=False``."""
    client_state = load_client_state(ckpt)
    state_dict = consolidated_weights(ckpt, client_state)
    ema = (client_state.get("flowvid") or {}).get("ema")
    if weights == "ema" and ema:
        state_dict.update({name: tensor for name, tensor in ema.items() if name in state_dict})
    if merge_adapters:  # a run that trained adapters gives the model it adapted
        state_dict = merge_lora(state_dict)
    check_finite(state_dict, str(ckpt))
    run = client_state.get(METADATA_KEY) or {}
    config = run.get("config") or {"model": model_config_from_hparams(client_state)}
    return state_dict, config, client_state


def consolidated_weights(ckpt: str | os.PathLike, client_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``consolidated_state_dict``, with a DeepSpeed shard that cannot be read named in a
    CorruptCheckpointError: torch's error for a truncated shard names no file."""
    try:
        return consolidated_state_dict(ckpt, client_state)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        damaged = [str(shard) for shard in sorted(Path(ckpt).glob("*/*.pt")) if not zipfile.is_zipfile(shard)]
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        which = (f"{', '.join(damaged)} is truncated or damaged" if damaged
                 else f"one of its shards cannot be read ({detail})")
        raise CorruptCheckpointError(f"cannot read DeepSpeed checkpoint {ckpt}: {which}; use an earlier "
                                     "checkpoint, or copy this one again") from err


def weights_taken(weights: str, client_state: dict[str, Any]) -> str:
    """Which weights ``checkpoint_weights`` gives for ``weights``: "ema" only where the run kept a moving
    average."""
    return "ema" if weights == "ema" and (client_state.get("flowvid") or {}).get("ema") else "trained"


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """A ValueError naming the first weight of ``state`` that holds NaN or inf: training skips the steps
    that would make one, so such a weight means a file damaged after it was written."""
    if (damaged := first_non_finite(state.items())) is not None:
        raise ValueError(f"the weights in {where} are damaged: {damaged} holds NaN or infinite values")


def model_config_from_hparams(client_state: dict[str, Any]) -> dict[str, Any]:
    """``{class_path, init_args}`` of the LightningModule, from hyperparameters saved under LightningCLI."""
    hparams = dict(client_state.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        raise ValueError("the checkpoint records neither the run's config nor the module's class_path; "
                         "train through `flowvid fit` (or save_hyperparameters under LightningCLI) to export it")
    return {"class_path": class_path, "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}


def _portable(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # safetensors stores neither shared nor strided storage: give every tensor its own.
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous().clone()


# --- load ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reading_export(path: str | os.PathLike):
    """safetensors' errors on a damaged file do not name it: raise CorruptCheckpointError naming it."""
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpointError(f"cannot read exported model {path}: {err}") from err


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in an exported file (codec, text encoder, versions, dtype, ...).

    Raises CorruptCheckpointError when the file is not a readable safetensors file.
    """
    with reading_export(path), safe_open(str(path), framework="pt") as file:
        raw = file.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowvid export (format {raw.get('format')!r})")
    return decode_metadata(raw)


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """An export's metadata (all strings in the file) with its JSON fields decoded."""
    return {key: json.loads(value) if key in JSON_FIELDS else value for key, value in raw.items()}


def load_exported(path: str | os.PathLike, config: str | os.PathLike | None = None,
                  map_location: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild the model of an export from ``config.yaml`` and load its weights (in fp32).

    ``config`` defaults to the ``config.yaml`` beside ``path``. The returned module is in eval mode, with
    ``training_fps`` set as ``flowvid.loading.load_model`` sets it. A part's folder or file named by a
    relative path (a T5 folder) is also looked for beside the export (``flowvid.part_files``).
    Raises FileNotFoundError, CorruptCheckpointError (a damaged file) or ValueError (also for an export of
    a module that is no flow video generator) with a one-line reason.
    """
    path = Path(path)
    config_path = Path(config) if config is not None else path.parent / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"exported model {path} does not exist")
    run_config = read_run_config(config_path)
    metadata = read_export_metadata(path)  # fails early on a file that is not an export
    if config is None:
        check_config_matches(path, config_path, metadata)
    check_flow_model(run_config, path)
    module = build_with_files_found(run_config, metadata, f"{path} from {config_path}", "exported",
                                    [path.parent.resolve()])
    with reading_export(path):
        state = load_file(str(path), device=str(map_location))
    load_weights(module, state, where=str(path))
    check_outside_parts(module, metadata, state, where=f"exported model {path}")
    module.to(map_location).eval()
    module.training_fps = recorded_fps(metadata)
    return ExportedModel(
        module=module,
        flow=getattr(module, "flow", module),
        codec=getattr(module, "codec", None),
        text_encoder=getattr(module, "text_encoder", None),
        denoiser=getattr(module, "denoiser", None),
        config=run_config,
    )


def build_with_files_found(config: dict[str, Any], recorded: dict[str, Any], where: str, made: str,
                           folders: list[Path]) -> nn.Module:
    """``build_recorded_module`` of ``config`` with its parts' relative files found in ``folders`` where the
    current folder lacks them; a file found nowhere is named in one line, not in the builder's long error."""
    config = with_files_found(config, folders)
    try:
        module = build_recorded_module(config, recorded, where, made)
    except ValueError as err:
        missing = next(iter(missing_files(config)), None)
        if missing is None:
            raise
        raise FileNotFoundError(missing_file_line(where, *missing, folders)) from err
    check_plugin_packages(module, recorded, where, made)
    return module


def check_plugin_packages(module: nn.Module, recorded: dict[str, Any], where: str, made: str) -> None:
    """Raise when a part of ``module`` chosen by a registered name (a block, the sampler) comes from a plugin
    package that ``recorded`` does not list: another package registers that name here, so the model would
    run other code than it was ``made`` with, silently where the weights fit."""
    if not recorded.get("flowvid_version"):  # not written by flowvid fit or export: nothing to compare with
        return
    parts = {type(part) for part in [*module.modules(), getattr(module, "sampler", None)] if part is not None}
    for part in sorted(parts, key=describe):
        registered = registered_as(part)
        if registered is None:
            continue
        kind, name = registered
        package = distribution_of(part)
        if package != "flowvid" and package not in (recorded.get("plugins") or {}):
            raise CheckpointMismatchError(
                f"{where}: its {kind} {name!r} is {describe(part)} of the package {package} here, which the "
                f"model was not {made} with: another package registers the name now; uninstall {package}, or "
                f"install the one the model was {made} with{made_with(recorded, made)}")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_config_matches(path: Path, config_path: Path, metadata: dict[str, str]) -> None:
    """Warn when the config beside an export is not the one it was written with: an export interrupted
    between its two files, another export into the same folder, or an edit since (exports before the
    config's checksum was recorded are not checked)."""
    expected = metadata.get("config_sha256")
    if expected and sha256(config_path.read_text()) != expected:
        warnings.warn(f"{config_path} is not the config {path.name} was exported with (another export into the "
                      "same folder, an interrupted export or an edit since?); the model is built from it as it is "
                      "now. Export again to pair them", stacklevel=3)


def read_run_config(config_path: Path) -> dict[str, Any]:
    """The run's config from ``config_path``; FileNotFoundError or ValueError naming the file otherwise."""
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: it is written beside the model by `flowvid export`")
    if not config_path.is_file():
        raise ValueError(f"config {config_path} is not a file: expected the config.yaml written by `flowvid export`")
    try:
        run_config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"config {config_path} is not valid YAML: {yaml_problem(err)}") from err
    if not isinstance(run_config, dict):
        raise ValueError(f"config {config_path} must be a YAML mapping with a 'model' section, "
                         f"got {type(run_config).__name__}")
    return run_config


def yaml_problem(err: Exception) -> str:
    """The parser's complaint in one line, with the line and column of the file where it arose
    (its own message spans several lines and shows a ``<unicode string>``, not the file)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return " ".join(str(err).split())
    return f"{getattr(err, 'problem', None) or err} at line {mark.line + 1}, column {mark.column + 1}"


def build_module(run_config: dict[str, Any]) -> nn.Module:
    """Instantiate ``run_config["model"]`` (``class_path`` + ``init_args``) as LightningCLI would."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    from flowvid.registry import load_plugins

    if "model" not in run_config:
        raise ValueError(f"the config has no 'model' section (keys: {sorted(run_config)})")
    load_plugins()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=LightningModule)
    parsed = parser.parse_object({"model": run_config["model"]})
    return parser.instantiate_classes(parsed).model


def build_recorded_module(run_config: dict[str, Any], recorded: dict[str, Any], where: str, made: str) -> nn.Module:
    """``build_module``, whose error also says what the model was ``made`` (exported, trained) with, as
    ``recorded`` (an export's or a checkpoint's metadata) has it: most often the error is a plugin's block or
    codec that is not installed here, and the plugin packages name what to install."""
    try:
        return build_module(run_config)
    except Exception as err:  # noqa: BLE001 - the class named in the config decides what it raises
        raise ValueError(f"cannot build the model of {where}: {err}{made_with(recorded, made)}") from err


def made_with(recorded: dict[str, Any], made: str) -> str:
    """``It was MADE with flowvid V and the plugin packages P`` on a line of its own, from ``recorded``;
    nothing where it records no version (a checkpoint written outside ``flowvid fit``)."""
    if not recorded.get("flowvid_version"):
        return ""
    plugins = recorded.get("plugins") or {}
    packages = (f"the plugin packages {', '.join(f'{name} {version}' for name, version in sorted(plugins.items()))}"
                if plugins else "no plugin package")
    return f"\nIt was {made} with flowvid {recorded['flowvid_version']} and {packages}"


def check_outside_parts(module: nn.Module, recorded: dict[str, Any], held: dict[str, torch.Tensor], where: str) -> None:
    """Raise when the codec or text encoder built from the config is not the one the model was trained with.

    A frozen part (a Wan VAE, a T5 encoder) loads its weights from a folder named in the config, not from
    the file: that folder may hold another checkpoint now, and the model would load without a complaint
    and read latents or text states it never saw. ``recorded`` holds the identities written with the
    file (``codec``, ``text_encoder``); a codec whose weights ``held`` carries is what the file holds.
    """
    codec_name, codec = first_part(module, LatentCodec)
    if codec is not None and recorded.get("codec") and not any(key.startswith(f"{codec_name}.") for key in held):
        check_codec_identity(codec.identity(), recorded["codec"], where)
    _, text_encoder = first_part(module, TextEncoder)
    if text_encoder is not None and recorded.get("text_encoder"):
        theirs, ours = dict(recorded["text_encoder"]), dict(text_encoder.identity())
        if not same_text_encoder(theirs, ours):
            differing = differences(theirs, ours, sorted(theirs.keys() & ours.keys()))
            raise CheckpointMismatchError(
                f"{where} was made with text encoder {theirs.get('name')!r}, but the one built from its config "
                f"differs in {differing}: point the config at the files the model was trained with")


def first_part(module: nn.Module, kind: type) -> tuple[str, Any]:
    """The name and the first submodule of ``kind`` in ``module`` (``("", None)`` when it has none)."""
    return next(((name, part) for name, part in module.named_modules() if isinstance(part, kind)), ("", None))


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Copy ``state`` into ``module`` (cast to each parameter's dtype); clear errors on a mismatch.

    A module with LoRA adapters takes weights without them (its adapters keep their values)."""
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not is_adapter_key(k))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if reshaped or (strict and (missing or unexpected)):
        details = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                   for label, names in (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped))
                   if names]
        raise ValueError(f"the weights in {where} do not fit the model built from its config: {'; '.join(details)}")
    check_finite(state, where)
    # Checked above: what is left out here is allowed to be.
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}, strict=False)


# --- command line ----------------------------------------------------------------------------------


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights ema|trained`` of the commands that read a checkpoint's weights."""
    parser.add_argument("--weights", choices=WEIGHTS, default="ema",
                        help="ema: the moving average of the weights when the run kept one, else the trained "
                             "weights; trained: the weights as trained")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowvid export", description=help_text(__doc__.split("\n\n")[0]),
                                     formatter_class=HelpFormatter,
                                     epilog=exit_statuses("the export is written"))
    parser.add_argument("--ckpt", required=True,
                        help="Lightning checkpoint file, DeepSpeed checkpoint directory, or a run directory "
                             "(its newest checkpoint)")
    parser.add_argument("--out", required=True,
                        help="the .safetensors file to write (config.yaml and a model card go beside it), or a "
                             "folder, existing or given with a trailing /, to write model.safetensors into (not with "
                             "--adapters-only)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the dtype of the weights written")
    add_weights_argument(parser)
    parser.add_argument("--force", action="store_true", help="overwrite an existing export")
    parser.add_argument("--adapters-only", action="store_true",
                        help="a LoRA run: write only its adapters (fp32), to apply with generate/score --lora")
    return parser


def check_not_an_export(ckpt: str | Path) -> None:
    """Raise a ValueError naming an export given where a training checkpoint is read, rather than calling
    it an unreadable checkpoint or a folder without one."""
    path = Path(ckpt)
    export = path / EXPORT_NAME if path.is_dir() and not path.name.endswith(".ckpt") else path
    if export.suffix != ".safetensors" or not export.is_file():
        return
    if path.is_dir() and (list_checkpoints(path) or list_checkpoints(path / "checkpoints")):
        return  # a run folder an export was written into: its checkpoints are what it means
    what = f"an export ({export})" if path.is_dir() else "an export"
    raise ValueError(f"{ckpt} is {what}, not a training checkpoint: export from the run's checkpoint "
                     f"(a .ckpt, a DeepSpeed checkpoint folder or the run folder); an export is used as it is, as "
                     f"in `flowvid generate --ckpt {ckpt}`")


def main(argv: list[str]) -> int:
    """``flowvid export --ckpt C --out model.safetensors [--dtype fp32|bf16] [--weights ema|trained] [--force]``."""
    from flowvid.cli import UserError

    args = build_parser().parse_args(argv)
    if args.adapters_only and args.dtype != "fp32":
        raise UserError("--adapters-only writes fp32 adapters (a few MB, merged into the weights in fp32); "
                        "leave out --dtype")
    try:
        check_not_an_export(args.ckpt)
        if args.adapters_only:
            from flowvid.adapters import export_adapters

            out = export_adapters(args.ckpt, args.out, args.weights, args.force)
        else:
            out = export_checkpoint(args.ckpt, args.out, args.dtype, args.weights, args.force)
    except (OSError, CorruptCheckpointError, ValueError, ImportError) as err:
        raise UserError(str(err)) from err
    card = out.parent / CARD_NAME
    written = [out] if args.adapters_only else [out, out.parent / CONFIG_NAME] + ([card] if is_card(card) else [])
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}" if len(written) > 1 else f"wrote {out}")
    return 0
