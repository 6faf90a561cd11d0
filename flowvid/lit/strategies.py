"""DeepSpeed ZeRO that runs the same recipe on GPUs and, for tests and small machines, on CPUs.

Lightning's ``DeepSpeedStrategy`` refuses to start without CUDA, although DeepSpeed itself trains on
CPU over gloo. ``ZeroStrategy`` is the stock strategy on GPUs; on a CPU accelerator it lifts the three
CUDA-only assumptions (the accelerator check, device-index validation, a device index for
``deepspeed.initialize``) and gives the same results as DDP. A recipe names it once::

    trainer:
      strategy:
        class_path: flowvid.lit.strategies.ZeroStrategy
        init_args: {stage: 3}

Checkpoints are DeepSpeed directories written atomically: every rank writes its shard into
``<name>.partial`` and rank 0 renames the finished directory, so a crash mid-write leaves the previous
checkpoint untouched. Before resuming, the checkpoint is checked against the model (parameter shapes,
codec, text encoder) and for missing rank shards, with an error that says what differs. A checkpoint
written by another number of processes is re-partitioned for this run through DeepSpeed's universal
checkpoint format, so a run continues on fewer or more devices than it started on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from flowvid.lit.checkpointing import (
    CheckpointStrategyError,
    check_resumable,
    consolidated_state_dict,
    load_client_state,
)
from flowvid.paths import PARTIAL_SUFFIX

#: Suffix of the folder beside a checkpoint where it is re-partitioned for another number of processes
#: (removed once loaded; never taken for a checkpoint, whose names end in ``.ckpt``).
RESHARD_SUFFIX = ".resharding"

#: The start of Lightning's note, on saving a ZeRO-3 checkpoint, that points at its own conversion to one file.
LIGHTNING_SINGLE_FILE_HINT = r"When saving the DeepSpeed Stage 3 checkpoint, each worker will save a shard"
#: What a ZeRO-3 run says instead, once.
HOW_TO_CONSOLIDATE = ("ZeRO-3 saves each checkpoint as a folder of the processes' shards: `flowvid export --ckpt DIR` "
                      "consolidates it into one file (generate and score read the folder as it is)")


def skip_deepspeed_shm_op() -> None:
    """Make DeepSpeed use plain gloo collectives on CPU instead of JIT-compiling its shm-allreduce op.

    The op only helps many ranks on one multi-core host; building it needs g++ and takes about 45 s.
    """
    # `import deepspeed.comm.torch as m` would bind the torch package, not DeepSpeed's module.
    deepspeed_comm = importlib.import_module("deepspeed.comm.torch")
    deepspeed_comm.build_shm_op = lambda: None


def finish_distributed() -> None:
    """Tear the process group down at the end of a multi-process run.

    A gloo group left to the interpreter's exit sometimes aborts the process after training
    finished (``terminate called without an active exception``); destroying it first does not.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def check_deepspeed_runs_here(strategy: Any) -> None:
    """Refuse Lightning's own DeepSpeed strategy off CUDA before anything starts: it would stop the run with a
    traceback once its processes are up. ``ZeroStrategy`` runs the same ZeRO on CPUs."""
    if not isinstance(strategy, DeepSpeedStrategy) or isinstance(strategy, ZeroStrategy):
        return
    if isinstance(strategy.accelerator, CUDAAccelerator):
        return
    accelerator = type(strategy.accelerator).__name__.removesuffix("Accelerator") or "this"
    raise ValueError(f"trainer.strategy: Lightning's DeepSpeedStrategy runs only on CUDA GPUs, and this run's "
                     f"accelerator is {accelerator}: use flowvid.lit.strategies.ZeroStrategy, the same ZeRO on "
                     "CPUs too (--config recipes/distributed/zero2.yaml or zero3.yaml, in place of "
                     "--trainer.strategy deepspeed)")


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO (stage 1, 2 or 3) on CUDA GPUs, or on CPUs over gloo when no GPU is used.

    Args:
        stage: ZeRO stage: 1 shards optimiser states, 2 also gradients, 3 also parameters.
        cpu_shm_allreduce: on CPU, build and use DeepSpeed's shared-memory allreduce (needs g++);
            by default CPU runs use gloo collectives.
        **kwargs: any other ``lightning.pytorch.strategies.DeepSpeedStrategy`` argument.
    """

    def __init__(self, stage: int = 2, *, cpu_shm_allreduce: bool = False, **kwargs: Any):
        if isinstance(stage, bool) or stage not in (1, 2, 3):  # True == 1, and "2" reads as 2 in a message
            raise ValueError(f"ZeRO stage must be 1, 2 or 3 (a number), got {stage!r}; for data parallelism "
                             "without ZeRO use strategy: ddp")
        super().__init__(stage=stage, **kwargs)
        self.cpu_shm_allreduce = cpu_shm_allreduce
        self._said_how_to_consolidate = False
        self._refuse_offloading_a_client_optimizer()

    def _refuse_offloading_a_client_optimizer(self) -> None:
        # DeepSpeed's engine would refuse it with a traceback, on GPUs and CPUs alike, after the processes started
        # (unless a DeepSpeed config names its own optimizer or lifts the check).
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer") or {}
        lifted = "optimizer" in self.config or not self.config.get("zero_force_ds_cpu_optimizer", True)
        if offload.get("device") in ("cpu", "nvme") and not lifted:
            raise ValueError("ZeroStrategy offload_optimizer: DeepSpeed offloads only its own optimiser "
                             "(DeepSpeedCPUAdam), and FlowModule trains with torch's AdamW; leave offload_optimizer "
                             "off (offload_parameters, under stage 3, still moves the weights to host memory)")

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        if not self.cpu_shm_allreduce:
            skip_deepspeed_shm_op()
        DDPStrategy.setup_environment(self)  # skips the "only supported on CUDA GPUs" check

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        # The stock version validates device indices, which CPU devices do not have.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if not self.on_cpu:
            return super().root_device
        # deepspeed.initialize needs an index for its device rank; torch treats cpu:N as the CPU.
        return torch.device("cpu", self.local_rank)

    def _format_config(self) -> None:
        grad_clip = self.lightning_module.hparams.get("grad_clip")
        if grad_clip is not None and "gradient_clipping" not in self.config:
            # The engine holds the gradients and clips them in its step (the global norm of all groups):
            # Lightning would take trainer.gradient_clip_val, which a module that optimises itself leaves unset.
            self.config["gradient_clipping"] = float(grad_clip)
        super()._format_config()
        if self.lightning_module.hparams.get("accumulate_grad_batches", 1) > 1:
            # The module accumulates itself: a backward pass only adds up (ZeRO-2/3 still reduce and
            # partition each one), and the one step() per window is the accumulation boundary.
            self.config["managed_gradient_accumulation"] = False

    def _auto_select_batch_size(self) -> int:
        # Only feeds DeepSpeed's throughput log. The stock version reads the loader's batch_sampler,
        # which loaders that batch inside their dataset (WebDataset pipelines) do not have.
        datamodule = getattr(self.lightning_module.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        return batch_size if isinstance(batch_size, int) else super()._auto_select_batch_size()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(checkpoint_path).is_file() and not (self.load_full_weights and self.zero_stage_3):
            # DeepSpeed would only say that it is not a DeepSpeed checkpoint.
            raise CheckpointStrategyError(
                f"{checkpoint_path} is a Lightning checkpoint file (one device or DDP), which ZeroStrategy cannot "
                "load: run without the ZeRO overlay (the file loads on any number of devices), or `flowvid export` "
                "it and fine-tune from the export under ZeRO"
            )
        if not Path(checkpoint_path).is_dir():  # a consolidated file (load_full_weights)
            return super().load_checkpoint(checkpoint_path, weights_only)
        # Fail with a clear message before DeepSpeed reads shards into a model they do not fit.
        client_state = load_client_state(checkpoint_path)
        check_resumable(client_state, self.lightning_module, f"checkpoint {checkpoint_path}")
        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return self._load_weights(Path(checkpoint_path), client_state, weights_only)
        saved_world_size = len(list(Path(checkpoint_path).glob("*/*_optim_states.pt")))  # one shard per process
        if saved_world_size in (0, self.world_size):
            return super().load_checkpoint(checkpoint_path, weights_only)
        return self._load_resharded(Path(checkpoint_path), saved_world_size, weights_only)

    def _load_weights(self, checkpoint: Path, client_state: dict[str, Any], weights_only: bool | None) -> dict[str, Any]:
        """The weights alone, to validate or test. Under ZeRO-3 DeepSpeed's inference engine cannot load its own
        checkpoints (it asks its parameter-offload object to restore an optimiser it does not have), so rank 0
        consolidates the shards and ``load_model_state_dict`` hands each layer's weights to its partitions on
        every rank (the other ranks read none: rank 0's weights are broadcast layer by layer)."""
        if not self.zero_stage_3:
            return super().load_checkpoint(checkpoint, weights_only)
        weights = consolidated_state_dict(checkpoint, client_state) if self.is_global_zero else {}
        return {**client_state, "state_dict": weights}

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if self.zero_stage_3 and "state_dict" in checkpoint:  # consolidated by _load_weights
            self.model_to_device()
            self._restore_zero_state(checkpoint, strict=strict)
            return
        super().load_model_state_dict(checkpoint, strict)

    def _load_resharded(self, checkpoint: Path, saved_world_size: int, weights_only: bool | None) -> dict[str, Any]:
        """Load a checkpoint written by ``saved_world_size`` processes into this run's partitioning.

        DeepSpeed refuses ZeRO shards made for another world size. Rank 0 rewrites them as a universal
        checkpoint (every parameter's fp32 weights and optimiser moments whole) beside the checkpoint;
        every rank loads its own partition of that, and the folder is removed.
        """
        resharded = checkpoint.with_name(checkpoint.name + RESHARD_SUFFIX)
        error = None
        if self.is_global_zero:
            rank_zero_info(f"{checkpoint} was written by {_processes(saved_world_size)} and this run has "
                           f"{self.world_size}: re-partitioning its ZeRO states (DeepSpeed universal checkpoint)")
            try:
                write_universal_checkpoint(checkpoint, resharded)
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                error = f"{type(err).__name__}: {str(err).rstrip('.')}"
                shutil.rmtree(resharded, ignore_errors=True)
        error = self.broadcast(error)
        if error:
            raise RuntimeError(f"cannot re-partition {checkpoint}, written by {_processes(saved_world_size)}, for "
                               f"{_processes(self.world_size)}: {error}. Resume on as many devices as wrote it, or "
                               "export the checkpoint (flowvid export) and fine-tune from the export (with a new "
                               "optimiser state).")
        config = self.deepspeed_engine._config  # the engine reads the flag when it loads, and only then
        config.load_universal_checkpoint = True
        try:
            client_state = super().load_checkpoint(resharded, weights_only)
        finally:
            config.load_universal_checkpoint = False
        if self.zero_stage_3:
            self._repair_zero3_universal_load(resharded)
        self.barrier("ZeroStrategy.load_checkpoint:resharded")
        if self.is_global_zero:
            shutil.rmtree(resharded, ignore_errors=True)
        return client_state

    def _repair_zero3_universal_load(self, resharded: Path) -> None:
        """Undo two slips of DeepSpeed's ZeRO-3 loader of universal checkpoints. It gives every parameter
        group the settings of the first (the flow's learning rate, betas and group name for the denoiser's
        group): each gets its own back from the checkpoint. And it hands every group one and the same
        ``step`` tensor, which each group's update then advances, so that Adam's bias correction counted
        one step per group and step: each gets its own copy."""
        from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

        [path] = resharded.glob("*/zero/optimizer_state.pt")
        # The file also holds rank 0's partition of the fp32 weights and Adam moments, which DeepSpeed has just
        # loaded: mapped, not read again, since only the groups' settings are taken from it.
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        saved = state[OPTIMIZER_STATE_DICT]["param_groups"]
        optimizer = self.deepspeed_engine.optimizer.optimizer
        for group, settings in zip(optimizer.param_groups, saved, strict=True):
            group.update({key: value for key, value in settings.items() if key != "params"})
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        target = Path(self.broadcast(str(filepath)))
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # left by a run that died while writing
        self.barrier("ZeroStrategy.save_checkpoint:clean")
        self._say_how_to_consolidate()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LIGHTNING_SINGLE_FILE_HINT)
            super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("ZeroStrategy.save_checkpoint:written")
        if self.is_global_zero:
            _replace_directory(partial, target)
        self.barrier("ZeroStrategy.save_checkpoint:renamed")

    def _say_how_to_consolidate(self) -> None:
        """Once per run, in place of Lightning's note on a sharded checkpoint, which points at Lightning's own
        conversion to one file: for a flowvid run that is ``flowvid export``."""
        if self.zero_stage_3 and self._multi_device and not self._said_how_to_consolidate:
            self._said_how_to_consolidate = True
            rank_zero_info(HOW_TO_CONSOLIDATE)


def discard_gradients(engine: Any) -> None:
    """Drop every gradient a ZeRO engine holds, as DeepSpeed does itself after an overflow. Its optimiser's
    ``zero_grad`` alone leaves those it has reduced from the backward passes of an accumulation window,
    which would then be added to the next window's."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
        optimizer.reset_cpu_buffers()
    elif isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        optimizer.averaged_gradients = {}
    else:  # stages 1 and 2
        optimizer._release_preflattened_grad_buffers()
        for index in optimizer.averaged_gradients:
            optimizer.averaged_gradients[index] = None
            optimizer.all_grad_tensors[index] = None


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def write_universal_checkpoint(checkpoint: Path, target: Path) -> None:
    """Rewrite the DeepSpeed checkpoint directory ``checkpoint`` (Lightning's layout: ``latest`` names
    the tag folder) as a universal checkpoint in ``target``, which DeepSpeed loads on any world size."""
    from deepspeed.checkpoint import ds_to_universal

    tag = (checkpoint / "latest").read_text().strip()
    shutil.rmtree(target, ignore_errors=True)  # left by a run that died while converting
    target.mkdir(parents=True)
    options = argparse.Namespace(input_folder=str(checkpoint / tag), output_folder=str(target / tag),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                 strict=True, inject_missing_state=True)
    # It reports every step of the conversion, with progress bars; an error still raises.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(options)
    shutil.copy(checkpoint / "latest", target / "latest")  # what Lightning checks a DeepSpeed folder by


def _replace_directory(source: Path, target: Path) -> None:
    """Move the finished ``source`` directory to ``target``, replacing an older one there."""
    if target.exists():
        stale = target.with_name(target.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale)
    else:
        os.replace(source, target)
