"""Checkpoints that survive crashes, say what made them, and refuse to resume the wrong model.

* ``RunCheckpoint`` (a ``ModelCheckpoint``) saves every ``every_n_train_steps`` into
  ``<run dir>/checkpoints/step=NNNNNNNN.ckpt``, keeps the last ``keep_last_k``, writes atomically
  (a file or a DeepSpeed directory appears under its final name only when complete), stores the run's
  metadata (``run_metadata``) and, before resuming, checks the checkpoint against the model.
* ``resolve_resume(checkpoint_dir, resume)`` turns ``resume: auto | none | PATH`` into the
  ``ckpt_path`` for ``Trainer.fit``; ``resolve_checkpoint(path)`` lets the commands that read a
  checkpoint take a run directory for its newest one.

Lightning itself restores weights, optimisers, schedulers, step counters, callback states and the
datamodule's ``state_dict`` (the data stream position); ``StepSeed`` makes the random numbers of every
step a function of the step counter, so they are restored with it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flowvid.checks import differences
from flowvid.codecs.base import LatentCodec, check_codec_identity
from flowvid.nn.lora import is_adapter_key
from flowvid.paths import PARTIAL_SUFFIX, sync_folder, write_atomically
from flowvid.text.base import TextEncoder, same_text_encoder

#: Key of flowvid's own metadata in a checkpoint.
METADATA_KEY = "flowvid_run"
#: Where RunCheckpoint writes, inside the run directory (``trainer.default_root_dir``).
CHECKPOINT_SUBDIR = "checkpoints"
#: What a run that diverged leaves in its checkpoint folder: the step it stopped at and its skips in a row.
DIVERGED_RECORD = "diverged.json"

_STEP_IN_NAME = re.compile(r"step=(\d+)")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file or directory is truncated, incomplete or unreadable."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was made by a different model than the one it is loaded into."""


class CheckpointFolderError(ValueError):
    """The folder a run's checkpoints go to cannot be written."""


class CheckpointStrategyError(ValueError):
    """A checkpoint in a form that the run's strategy cannot load: DeepSpeed shards without
    ``ZeroStrategy``, or a Lightning file under it."""


def shown(path: str | os.PathLike) -> str:
    """``path`` as a user would type it here: relative to the current folder when inside it."""
    path = str(path)
    if "://" in path:
        return path
    relative = os.path.relpath(path)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


# --- what a checkpoint records ----------------------------------------------------------------


def run_metadata(pl_module: LightningModule, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to tell later what made a checkpoint.

    flowvid version, versions of the plugin packages in the registries, codec and text encoder
    identities (from the first ``LatentCodec`` / ``TextEncoder`` inside the module), the shape of
    every parameter, the world size, the frame rate of the clips the run trains on (``fps``, from
    ``training_fps``; None where unknown) and the run's resolved config when given.
    """
    import flowvid
    from flowvid.registry import REGISTRIES

    plugins = {entry.package: entry.version for registry in REGISTRIES.values() for entry in registry
               if entry.package != "flowvid"}
    codec = fixed_codec(pl_module)
    text_encoder = _first(pl_module, TextEncoder)
    trainer = pl_module._trainer
    return {
        "flowvid_version": flowvid.__version__,
        "plugins": dict(sorted(plugins.items())),
        "codec": codec.identity() if codec is not None else None,
        "text_encoder": text_encoder.identity() if text_encoder is not None else None,
        "parameters": parameter_shapes(pl_module),
        "world_size": trainer.world_size if trainer is not None else 1,
        "fps": training_fps(trainer),
        "config": config,
    }


def training_fps(trainer: Trainer | None) -> float | None:
    """The frame rate of the clips a run trains on, as its datamodule's manifest records it (``video.fps``);
    None without a datamodule that has a manifest, or where the manifest records no single rate."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    try:
        manifest = getattr(datamodule, "manifest", None)
    except (OSError, ValueError):  # a folder moved away since it was read: the checkpoint still gets written
        return None
    video = manifest.get("video") if isinstance(manifest, dict) else None
    return recorded_fps(video or {})


def recorded_fps(metadata: dict[str, Any]) -> float | None:
    """``metadata["fps"]`` as a frame rate: None where it is missing (a checkpoint or export made before the
    rate was recorded), null, or not a finite number above 0."""
    fps = metadata.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        return None
    return float(fps)


def parameter_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Full shapes of all parameters, also when DeepSpeed ZeRO-3 holds only a shard of each."""
    return {name: list(getattr(param, "ds_shape", param.shape)) for name, param in module.named_parameters()}


def fixed_codec(module: torch.nn.Module) -> LatentCodec | None:
    """The first codec inside ``module``, unless the module trains its weights (``VideoVAEModule``): the
    identity of such a codec includes a digest of weights that change at every step."""
    codec = _first(module, LatentCodec)
    if codec is None or any(parameter.requires_grad for parameter in codec.parameters()):
        return None
    return codec


def _first(module: torch.nn.Module, kind: type) -> Any:
    return next((m for m in module.modules() if isinstance(m, kind)), None)


# --- reading checkpoints ----------------------------------------------------------------------


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def load_client_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state of a checkpoint: the whole dict of a Lightning file, or the non-tensor
    part (``client_state``) of a DeepSpeed directory. Tensors are memory-mapped, not read.

    Raises FileNotFoundError when ``path`` is missing and CorruptCheckpointError when it cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CorruptCheckpointError(f"{path} is a checkpoint that was still being written; use an earlier one")
    source = deepspeed_model_states(path) if path.is_dir() else path
    if path.is_dir() and importlib.util.find_spec("deepspeed") is None:  # its files unpickle DeepSpeed's classes
        raise ImportError(f"{path} is a DeepSpeed checkpoint, and reading it needs DeepSpeed: "
                          "pip install 'flowvid[deepspeed]'")
    state = read_checkpoint_file(source, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{source} holds a {type(state).__name__}, not a checkpoint dict")
    if path.is_dir():
        check_deepspeed_shards(path, state)
    return state


def read_checkpoint_file(source: str | os.PathLike, **torch_load: Any) -> Any:
    """``torch.load(source, **torch_load)``, with one CorruptCheckpointError naming the file for any file that
    cannot be read, whichever reader (a resume, an export, Lightning's loading) reads it."""
    if not zipfile.is_zipfile(source):  # torch.load would say only that it cannot memory-map it, or unpickle it
        raise CorruptCheckpointError(f"cannot read checkpoint {source}: not a PyTorch checkpoint (no zip archive "
                                     "inside; truncated, or another kind of file)")
    try:
        return torch.load(source, **torch_load)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged zip
        raise CorruptCheckpointError(f"cannot read checkpoint {source}: {err}") from err


def consolidated_state_dict(ckpt: str | os.PathLike, client_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the module, whatever the number of ranks that wrote ``ckpt``."""
    if not Path(ckpt).is_dir():
        if "state_dict" not in client_state:
            raise CorruptCheckpointError(f"{ckpt} has no 'state_dict': not a Lightning training checkpoint")
        return dict(client_state["state_dict"])
    from deepspeed.utils import zero_to_fp32

    with contextlib.redirect_stdout(io.StringIO()), without_tqdm_bars(zero_to_fp32):  # it reports its progress
        gathered = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    # Lightning wraps the module; older versions saved it under this prefix.
    gathered = {name.removeprefix("_forward_module."): tensor for name, tensor in gathered.items()}
    # Keep exactly the module's state_dict keys: DeepSpeed also reconstructs frozen pretrained
    # weights (a VAE, a text encoder) that the module leaves out of its state dict on purpose.
    module_state = client_state.get("module") or {}
    if not module_state:
        return gathered
    missing = [name for name in module_state if name not in gathered and module_state[name].numel() == 0]
    if missing:
        raise CorruptCheckpointError(f"{ckpt}: the shards do not hold {', '.join(missing[:5])}")
    return {name: gathered[name] if name in gathered else tensor for name, tensor in module_state.items()}


@contextlib.contextmanager
def without_tqdm_bars(module: Any) -> Iterator[None]:
    """The tqdm bars of ``module`` (one that calls ``tqdm`` by that name) off: consolidating a checkpoint takes
    a moment at every export, generate or validate of it, and its bars would print among the command's lines."""
    from tqdm import tqdm

    bars = module.tqdm
    module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        module.tqdm = bars


def deepspeed_model_states(directory: Path) -> Path:
    """The file of a DeepSpeed checkpoint directory that holds its client state."""
    candidates = sorted(directory.glob("*/*mp_rank_00_model_states.pt"))
    if not candidates:
        raise CorruptCheckpointError(
            f"{directory} is not a complete DeepSpeed checkpoint: no */*mp_rank_00_model_states.pt inside"
        )
    return candidates[0]


def check_deepspeed_shards(directory: Path, client_state: dict[str, Any]) -> None:
    """Raise CorruptCheckpointError unless every rank's optimiser shard is present."""
    world_size = (client_state.get(METADATA_KEY) or {}).get("world_size")
    if world_size is None:
        return
    shards = sorted(directory.glob("*/*_optim_states.pt"))
    missing = [rank for rank in range(world_size) if not any(_shard_rank(shard) == rank for shard in shards)]
    if missing:
        files = ", ".join(str(_shard_of_rank(directory, shards, rank)) for rank in missing[:3])
        ranks = f"rank {missing[0]}'s optimiser shard" if len(missing) == 1 else (
            f"the optimiser shards of ranks {', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}")
        raise CorruptCheckpointError(f"{directory} was written by {world_size} ranks but lacks {ranks}: {files}")
    if len(shards) != world_size:
        raise CorruptCheckpointError(f"{directory} was written by {world_size} rank{'s' * (world_size != 1)} but "
                                     f"holds {len(shards)} optimiser shards")


_RANK_IN_SHARD_NAME = re.compile(r"zero_pp_rank_(\d+)_")


def _shard_rank(shard: Path) -> int | None:
    match = _RANK_IN_SHARD_NAME.search(shard.name)
    return int(match[1]) if match else None


def _shard_of_rank(directory: Path, shards: list[Path], rank: int) -> Path:
    """The file a rank's optimiser shard would be, named as the other ranks' are (``bf16_`` or not)."""
    if shards:
        return shards[0].with_name(_RANK_IN_SHARD_NAME.sub(f"zero_pp_rank_{rank}_", shards[0].name, count=1))
    return deepspeed_model_states(directory).parent / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# --- checking a checkpoint against the model ----------------------------------------------------


def check_resumable(checkpoint: dict[str, Any], pl_module: LightningModule, where: str) -> None:
    """Raise when ``checkpoint`` was made by a model with other parameters, codec or text encoder.

    CodecMismatchError for another codec, CheckpointMismatchError otherwise; a checkpoint without
    flowvid metadata is only checked by Lightning's own loading.
    """
    metadata = checkpoint.get(METADATA_KEY)
    if metadata is None:
        rank_zero_info(f"{where} carries no flowvid metadata; skipping the model and codec checks")
        return
    codec = fixed_codec(pl_module)
    if codec is not None and metadata.get("codec") is not None:
        check_codec_identity(codec.identity(), metadata["codec"], where)
    text_encoder = _first(pl_module, TextEncoder)
    if text_encoder is not None and metadata.get("text_encoder") is not None:
        if not same_text_encoder(dict(metadata["text_encoder"]), dict(text_encoder.identity())):
            raise CheckpointMismatchError(text_encoder_mismatch(dict(metadata["text_encoder"]),
                                                                dict(text_encoder.identity()), where))
    stored, current = metadata.get("parameters"), parameter_shapes(pl_module)
    if stored is None or not current:  # no parameters yet: built later in configure_model
        return
    check_adapters(stored, current, where)
    problems = _shape_differences(stored, current)
    if problems:
        # The settings first: they say what to change, the parameters only what it does.
        settings = _config_differences(checkpoint.get("hyper_parameters") or {}, dict(pl_module.hparams))
        raise CheckpointMismatchError(
            f"{where} was made by a different model configuration"
            + (f", whose settings differ in {settings}" if settings else "")
            + f"; the parameters differ, {'; '.join(problems)}"
        )


def text_encoder_mismatch(recorded: dict[str, str], current: dict[str, str], where: str) -> str:
    """Which keys of the text encoders' identities differ, with both values, and what to do about it."""
    keys = sorted(key for key in recorded.keys() & current.keys() if recorded[key] != current[key])
    text = (f"{where} was trained with another text encoder than this model's: they differ in "
            f"{differences(recorded, current, keys)}")
    if keys == ["vocabulary_sha256"]:
        return (text + "; its weights keep the vocabulary they were trained with (words outside it read as <unk>): "
                "leave out the config or option that gives text_encoder a vocabulary, or train from scratch "
                "to learn new words")
    return text + "; give the text encoder the settings it was trained with"


def check_adapters(stored: dict[str, list[int]], current: dict[str, list[int]], where: str) -> None:
    """Raise when the checkpoint holds LoRA adapters and the model has none: the run that wrote it added them
    (the ``LoRA`` callback), which a config without it does not; its parameters would read as another model's."""
    adapters = [name for name in stored if is_adapter_key(name)]
    if adapters and not any(is_adapter_key(name) for name in current):
        raise CheckpointMismatchError(
            f"{where} holds LoRA adapters ({len(adapters)} tensors, such as {adapters[0]}), which this model lacks: "
            "add the LoRA callback of the run that wrote it, e.g. --config recipes/finetune/lora.yaml after the "
            "other --config files"
        )


def _shape_differences(stored: dict[str, list[int]], current: dict[str, list[int]], limit: int = 3) -> list[str]:
    missing = [name for name in current if name not in stored]
    unexpected = [name for name in stored if name not in current]
    reshaped = [f"{name} {tuple(stored[name])} in the checkpoint vs {tuple(shape)} in the model"
                for name, shape in current.items() if name in stored and list(stored[name]) != list(shape)]
    problems = []
    for label, names in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                         ("different shapes", reshaped)):
        if names:
            more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
            problems.append(f"{label}: {', '.join(names[:limit])}{more}")
    return problems


def _config_differences(stored: dict[str, Any], current: dict[str, Any], limit: int = 6) -> str:
    """The first ``limit`` differing settings, by their dotted names, with both values, and how many more."""
    flat_stored, flat_current = dict(_flatten(stored)), dict(_flatten(current))
    keys = sorted((k for k in flat_stored.keys() | flat_current.keys()
                   if not k.split(".")[-1].startswith("_") and flat_stored.get(k) != flat_current.get(k)),
                  key=lambda k: ("." not in k, k))  # the parts' settings first: they build the parameters
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return differences(flat_stored, flat_current, keys[:limit]) + more


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


# --- writing checkpoints -------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<path>.partial``, flushes it to disk, then renames it to ``<path>`` and flushes the folder.

    A crash mid-write leaves the previous checkpoint as it was (and a ``.partial`` file that resuming
    ignores). Reading a damaged file raises CorruptCheckpointError naming it; ``check(checkpoint,
    path)``, when given, vets every checkpoint read before Lightning loads anything from it.
    """

    def __init__(self, check: Callable[[dict[str, Any], str], None] | None = None):
        super().__init__()
        self.check = check

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction does the same job
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
            sync_folder(target.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if Path(path).is_dir():
            raise CheckpointStrategyError(
                f"{path} is a DeepSpeed ZeRO checkpoint (a directory of shards), which only "
                "flowvid.lit.strategies.ZeroStrategy loads: run with the ZeRO overlay that wrote it (--config "
                "recipes/distributed/zero2.yaml or zero3.yaml), or `flowvid export` it and fine-tune from the export"
            )
        checkpoint = read_checkpoint_file(path, map_location=map_location or "cpu", weights_only=bool(weights_only))
        if self.check is not None:
            self.check(checkpoint, str(path))
        return checkpoint


class RunCheckpoint(ModelCheckpoint):
    """Periodic, atomic, self-describing checkpoints of a run; keeps the last ``keep_last_k``.

    Args:
        dirpath: where to write; default ``<trainer.default_root_dir>/checkpoints``, a place that
            does not change between restarts (unlike a logger's ``version_N`` folder), so that
            ``resume: auto`` finds it.
        every_n_train_steps: save after every this many optimiser steps.
        keep_last_k: how many of the newest checkpoints to keep (-1 keeps all).
        save_on_train_end: also save when training stops at a step that is not a multiple: at
            ``max_steps``, or where a callback stops it (``trainer.should_stop``: EarlyStopping, a Timer's
            ``max_time``). The run continues from there (with a larger limit) exactly as if it had not stopped.
        save_on_sigterm: when a process of the run receives SIGTERM (a preemption, a cluster's time
            limit, ``kill``) or a first Ctrl-C, save after the step in progress and stop every process
            there, so that ``resume: auto`` continues from that step. ``flowvid fit`` then exits with
            status 143, or 130 after a Ctrl-C, as a shell reports those signals. A second Ctrl-C stops at
            once, without saving.

    With gradient accumulation a step ends with the last batch of its window. The gradients of the
    batches before it are in no checkpoint, so saving and stopping, whatever asks for it, wait for it.

    ``run_config`` (the resolved CLI config, set by ``FlowvidCLI``) is stored in every checkpoint and
    becomes ``config.yaml`` on export. ``resuming_from`` (the checkpoint ``fit`` resumes from, also set by
    ``FlowvidCLI``) tells a resume, which expects checkpoints in ``dirpath``, from a run that finds some there.
    ``continued_by`` (also set by ``FlowvidCLI``) says how the run continues after a stop by a signal, in the
    line that names the step saved.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000, keep_last_k: int = 3,
                 save_on_train_end: bool = True, save_on_sigterm: bool = True):
        if keep_last_k == 0 or keep_last_k < -1:
            raise ValueError(f"keep_last_k must be a positive count or -1 (keep all), got {keep_last_k}")
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename="{step:08d}", monitor="step", mode="max",
                         save_top_k=keep_last_k, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=False)
        self.keep_last_k = keep_last_k
        self.save_on_train_end = save_on_train_end
        self.save_on_sigterm = save_on_sigterm
        self._signal: str | None = None  # "SIGTERM" or "Ctrl-C", noted by the handlers on_train_start installs
        self._stop_held = False  # a trainer.should_stop that waits for the end of the accumulation window
        self.run_config: dict[str, Any] | None = None
        self.resuming_from: str | None = None
        self.continued_by: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.dirpath = self._checkpoint_dir(trainer)
        with warnings.catch_warnings():
            if self._resumes_own_checkpoint():
                # Lightning warns of a checkpoint folder that is not empty, which is where a resume finds it.
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_writable(self.dirpath)
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            # ZeroStrategy writes atomically and checks what it resumes from itself.
            if not hasattr(strategy, "cpu_shm_allreduce"):
                rank_zero_warn("only flowvid.lit.strategies.ZeroStrategy writes DeepSpeed checkpoints atomically")
        elif type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO(
                check=lambda checkpoint, path: check_resumable(checkpoint, pl_module, f"checkpoint {path}")
            )

    def _checkpoint_dir(self, trainer: Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        # As Lightning resolves a given dirpath: the checkpoints it keeps are matched by their folder,
        # which must not change with the spelling of default_root_dir (relative, absolute, a symlink).
        return os.path.realpath(os.path.join(trainer.default_root_dir, CHECKPOINT_SUBDIR))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """What ``trainer.fit(ckpt_path="last")`` and ``trainer.validate(ckpt_path="last")`` take from this
        callback: the newest readable step. Lightning looks for a ``last.ckpt``, which this callback does
        not write, and without one would start afresh (or validate the model as initialised)."""
        folder = self._checkpoint_dir(trainer)
        found = list_checkpoints(folder)
        if not found:
            return set()
        return {str(newest_readable(found, f"{folder} holds {len(found)} checkpoint(s)"))}

    def _resumes_own_checkpoint(self) -> bool:
        """Whether the run resumes from a checkpoint in this callback's folder (``dirpath``, not yet resolved
        by Lightning when given)."""
        if self.resuming_from is None or "://" in str(self.resuming_from) or "://" in str(self.dirpath):
            return False
        return Path(self.resuming_from).resolve().parent == Path(self.dirpath).resolve()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not self._window_closed_or_stop_held(trainer, pl_module):
            return
        with warnings.catch_warnings():
            # Lightning warns that manual optimisation saves the weights after the step: that is the intent.
            warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # The last step's checkpoint is written here, not in on_train_end: by then Lightning has closed
        # the epoch, so a run continued with a larger max_steps would start a new epoch of data.
        self._save_if_training_stops(trainer)
        if self.save_on_sigterm and self._stopping(trainer):
            self._save_step(trainer)
            continued = f"; {self.continued_by}" if self.continued_by else ""
            rank_zero_info(f"{self._signal or 'a signal to another process'}: stopping after step "
                           f"{trainer.global_step}, saved in {shown(self.dirpath)}{continued}")

    # EarlyStopping decides after a validation or at the end of an epoch, after this batch's
    # on_train_batch_end: the step it stops after is saved there, before Lightning closes the epoch.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._window_closed_or_stop_held(trainer, pl_module):
            self._save_if_training_stops(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._window_closed_or_stop_held(trainer, pl_module):
            self._save_if_training_stops(trainer)

    def _save_if_training_stops(self, trainer: Trainer) -> None:
        if self.save_on_train_end and self._training_stops(trainer):
            self._save_step(trainer)

    def _window_closed_or_stop_held(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether the batch that just ran ended an accumulation window (without accumulation, every batch
        does). Inside a window, a stop that a callback asked for (``trainer.should_stop``) is held back
        until the window's end."""
        if not closes_accumulation_window(trainer, pl_module):
            self._stop_held = self._stop_held or trainer.should_stop
            trainer.should_stop = False
            return False
        trainer.should_stop = trainer.should_stop or self._stop_held
        self._stop_held = False
        return True

    @staticmethod
    def _training_stops(trainer: Trainer) -> bool:
        """Whether training ends after this step: at max_steps, or because a callback stopped it."""
        reached_max_steps = 0 < trainer.max_steps <= trainer.global_step
        # Lightning trains on past a should_stop until min_steps and min_epochs are met.
        return reached_max_steps or (trainer.should_stop and trainer.fit_loop._can_stop_early)

    def _save_step(self, trainer: Trainer) -> None:
        """Save this step, unless it is saved already (or Lightning saves nothing now: a sanity check,
        fast_dev_run)."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signal, self._stop_held = None, False
        # Lightning does not restore this on resume; left at 0, a resumed run would save its first step
        # again (as step=N-v1.ckpt) when that step is skipped or, with accumulation, inside the window.
        self._last_global_step_saved = trainer.global_step
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm(trainer))
            # Lightning restores the handlers it found when fit ends. Where SIGINT is ignored (a
            # background job), it stays so.
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._note_ctrl_c)

    def _note_sigterm(self, trainer: Trainer) -> Callable[[int, Any], None]:
        """A SIGTERM handler that only notes the signal (and passes it to the processes this one launched).

        Lightning's own handler stops a process at the end of the step the signal finds it in, and
        broadcasts from rank 0 inside the handler, wherever the signal arrives: a process that stops
        alone, or a broadcast paired with another collective, hangs a multi-process run (Lightning
        issue #20806). Here the processes agree at the end of a step instead (``_stopping``).
        """

        def note(signum: int, frame: Any) -> None:
            launcher = trainer.strategy.launcher
            if self._signal != "SIGTERM" and launcher is not None:
                launcher.kill(signum)
            self._signal = "SIGTERM"

        return note

    def _note_ctrl_c(self, signum: int, frame: Any) -> None:
        """A first Ctrl-C stops the run as SIGTERM does; the next one raises KeyboardInterrupt at once.

        Not passed on to launched processes: a terminal sends Ctrl-C to all of them, and one passed on
        would arrive as a second one there (``_stopping`` tells every process of a signal anyway).
        """
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._signal = self._signal or "Ctrl-C"
        rank_zero_info("Ctrl-C: saving after the step in progress, then stopping; Ctrl-C again stops at once "
                       "without saving")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException):  # the stop _stopping asked for; flowvid fit's exit status
            exception.stopped_by = self._signal  # "SIGTERM", "Ctrl-C", or None (a signal to another process)

    def _stopping(self, trainer: Trainer) -> bool:
        """Whether any process has noted a signal; if so every one stops after this step (Lightning raises
        its SIGTERMException at the end of the step once ``received_sigterm`` is set). With several
        processes this costs one boolean all-reduce a step, beside the broadcast Lightning makes anyway."""
        stop = self._signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer._signal_connector.received_sigterm = True
        return stop

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = run_metadata(pl_module, self.run_config)

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        """The checkpoint a run resumed from goes too, once ``keep_last_k`` newer ones are written.

        Lightning keeps it for good, so a run resumed after every preemption would keep one more checkpoint
        each time, until the disk is full.
        """
        resumed = trainer.ckpt_path is not None and "://" not in previous and previous != current and (
            Path(previous).absolute() == Path(trainer.ckpt_path).absolute())
        if resumed:
            return Path(self.dirpath).absolute() in Path(previous).absolute().parents
        return super()._should_remove_checkpoint(trainer, previous, current)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Training stopped where none of the hooks above saw it: the data ran out (max_epochs), or the
        # LightningModule's own on_train_batch_end set should_stop.
        if self.save_on_train_end:
            self._save_step(trainer)


def check_writable(dirpath: str | os.PathLike) -> None:
    """Raise CheckpointFolderError unless a checkpoint can be written into ``dirpath`` (created if missing).

    Checked before the first step: the first save comes ``every_n_train_steps`` later, hours into a run.
    """
    if "://" in str(dirpath):  # remote storage: its write permissions show only in a write
        return
    try:
        Path(dirpath).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dirpath, prefix=".write-test-"):  # a name of its own on every rank
            pass
    except OSError as err:
        raise CheckpointFolderError(
            f"cannot write checkpoints into {dirpath} ({err.strerror or err}): set trainer.default_root_dir (or "
            "the RunCheckpoint's dirpath) to a folder this run can write to"
        ) from err


def closes_accumulation_window(trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether the training batch that just ran was the last of an optimiser step's accumulation window."""
    if pl_module.automatic_optimization:  # Lightning's trainer.accumulate_grad_batches
        return not trainer.fit_loop.epoch_loop._should_accumulate()
    # A module that optimises itself (FlowModule) counts its windows from the batch its fit started at.
    size = pl_module.hparams.get("accumulate_grad_batches", 1)
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready - getattr(pl_module, "accumulation_start", 0)
    return batches % size == 0


# --- resuming ------------------------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Finished checkpoints in ``directory``, oldest first (by the step in the name, else by time). A link
    to one of them is not another checkpoint, and a link to nothing is none: both are left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    named = [p for p in directory.iterdir()
             if p.name.endswith(".ckpt") and not p.name.endswith((PARTIAL_SUFFIX, ".old"))]
    found = [p for p in named if not _dangling(p) and not _second_name_of_one_of(p, named)]

    def order(path: Path) -> tuple[int, float]:
        match = _STEP_IN_NAME.search(path.name)
        return (int(match.group(1)) if match else -1, path.stat().st_mtime)

    return sorted(found, key=order)


def _dangling(path: Path) -> bool:
    """Whether ``path`` is a link to nothing (a ``last.ckpt`` whose checkpoint ``keep_last_k`` removed, say),
    which is then passed over with a warning naming both."""
    if not path.is_symlink() or path.exists():
        return False
    rank_zero_warn(f"passing over {path}: it links to {os.readlink(path)}, which does not exist")
    return True


def _second_name_of_one_of(path: Path, others: list[Path]) -> bool:
    """Whether ``path`` links to one of ``others`` (Lightning's ``last.ckpt`` with ``save_last="link"``): listed
    twice, one checkpoint would count as two, older and newer than itself."""
    return path.is_symlink() and any(path.resolve() == other.resolve() for other in others if not other.is_symlink())


def resolve_resume(checkpoint_dir: str | os.PathLike, resume: str | None, validating: bool = False) -> str | None:
    """The checkpoint to resume from: ``"auto"`` (the newest readable one in ``checkpoint_dir``, or
    None for a fresh start), ``None`` / ``"none"`` (fresh start) or a path (which must exist): a
    checkpoint, or a run directory for its newest one (``resolve_checkpoint``).

    ``auto`` passes over checkpoints that cannot be read (a file truncated by a full disk, say) with a
    warning naming each, and resumes from the newest good one; when none can be read it stops.
    ``validating`` words what it says for ``flowvid validate``, which continues nothing.
    """
    if resume is None or str(resume).lower() in ("none", "false", ""):
        return None
    if resume == "auto":
        return _newest_readable(checkpoint_dir, validating)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume: {resume} does not exist (use 'auto', 'none' or a checkpoint path)")
    return str(resolve_checkpoint(path))


def _newest_readable(checkpoint_dir: str | os.PathLike, validating: bool = False) -> str | None:
    found = list_checkpoints(checkpoint_dir)
    if not found:
        if not validating:  # validate warns that it validates the model as initialised
            rank_zero_info(f"resume: auto found no checkpoint in {checkpoint_dir}; starting from scratch")
        return None
    path = newest_readable(found, f"resume: auto found {len(found)} checkpoint(s) in {checkpoint_dir}")
    rank_zero_info(f"resume: auto {'validates' if validating else 'continues from'} {path}")
    return str(path)


def newest_readable(found: list[Path], found_where: str) -> Path:
    """The newest of ``found`` (oldest first) that can be read, passing over the others with a warning."""
    for path in reversed(found):
        try:
            load_client_state(path)
        except CorruptCheckpointError as err:
            rank_zero_warn(f"passing over an unreadable checkpoint: {err}")
            continue
        return path
    raise CorruptCheckpointError(f"{found_where}, and none can be read; move them away or name one that can")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint that ``path`` names: itself when it is a checkpoint (a file, or a DeepSpeed
    checkpoint directory); for a run directory, or the ``checkpoints/`` folder inside it, the newest
    checkpoint there that can be read. Lets a command take ``--ckpt runs/my_run``."""
    path = Path(path)
    if not path.is_dir() or path.name.endswith(".ckpt") or any(path.glob("*/*mp_rank_00_model_states.pt")):
        return path
    for folder in (path, path / "checkpoints"):
        found = list_checkpoints(folder)
        if found:
            newest = newest_readable(found, f"{folder} holds {len(found)} checkpoint(s)")
            rank_zero_info(f"using the newest checkpoint of {path}: {newest}")
            return newest
    raise FileNotFoundError(f"{path} is a directory without a checkpoint: give a checkpoint file, a DeepSpeed "
                            "checkpoint directory or a run directory with *.ckpt in it or in its checkpoints/")


def has_run_checkpoint(trainer: Trainer) -> bool:
    return any(isinstance(callback, RunCheckpoint) for callback in trainer.checkpoint_callbacks)


def checkpoint_dir_of(trainer: Trainer) -> str:
    """Where this trainer's RunCheckpoint writes (``<default_root_dir>/checkpoints`` by default)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RunCheckpoint) and callback.dirpath is not None:
            return str(callback.dirpath)
    return os.path.join(trainer.default_root_dir, CHECKPOINT_SUBDIR)


# --- diverged runs -------------------------------------------------------------------------------


def record_divergence(checkpoint_dir: str | os.PathLike, step: int, consecutive_skips: int, reason: str) -> None:
    """Note that the run stopped at ``step`` after ``consecutive_skips`` skips in a row. The stop saves no
    checkpoint, so a restart reads the count from here (``recorded_skips_in_a_row``). Remote folders are
    left out."""
    if "://" in str(checkpoint_dir):
        return
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "consecutive_skips": consecutive_skips, "reason": reason}
    write_atomically(folder / DIVERGED_RECORD, lambda path: path.write_text(json.dumps(record) + "\n"))


def recorded_skips_in_a_row(checkpoint_dir: str | os.PathLike, step: int) -> int:
    """The skips in a row of a diverged stop recorded at ``step``; 0 when none was, or at another step."""
    try:
        record = json.loads((Path(checkpoint_dir) / DIVERGED_RECORD).read_text())
        return int(record["consecutive_skips"]) if record["step"] == step else 0
    except (OSError, ValueError, KeyError, TypeError):  # none, remote, or unreadable: count from 0
        return 0


def forget_divergence(checkpoint_dir: str | os.PathLike) -> None:
    """A step succeeded after the recorded stop: restarts count from 0 again."""
    if "://" not in str(checkpoint_dir):
        (Path(checkpoint_dir) / DIVERGED_RECORD).unlink(missing_ok=True)
