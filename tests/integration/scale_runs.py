"""Runs of ``flowvid fit`` for the scale and durability tests, and what they log.

Every run is ``python -m flowvid.lit.cli_support fit`` (what ``flowvid fit`` runs) in a subprocess on
a tiny FlowModule and 4-frame 8x8 synthetic clips; multi-process runs are 2 CPU processes over gloo.
The runs log their losses per rank to JSON-lines files through ``LossLog`` below: the subprocesses load
the callbacks of this module by class path (``scale_runs.LossLog``), with its folder on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs DeepSpeed: pip install 'flowvid[deepspeed]'")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

TWO_PROCESSES = ("--trainer.devices", "2")
ACCUMULATE = ("--trainer.precision", "32-true", "--model.init_args.accumulate_grad_batches", "2")


# --- callbacks the subprocesses load by class path ----------------------------------------------


class LossLog(Callback):
    """Appends ``{"step", "loss", "denoiser_loss", "flow_grad_norm" or "grad_norm"}`` (those logged) and the
    module's ``tokens_seen`` and ``model_flops_per_token`` after every training batch to ``<path>.rank<R>.jsonl``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        record = {"step": trainer.global_step, "loss": float(metrics["train/loss"]),
                  "tokens_seen": pl_module.tokens_seen, "flops_per_token": pl_module.model_flops_per_token}
        for name in ("denoiser_loss", "flow_grad_norm", "grad_norm"):
            if f"train/{name}" in metrics:
                record[name] = float(metrics[f"train/{name}"])
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


class ValidationLog(Callback):
    """Appends ``{"step", "bits_per_dim"}`` after every validation to ``<path>.jsonl``."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        record = {"step": trainer.global_step, "bits_per_dim": float(trainer.callback_metrics["val/bits_per_dim"])}
        with open(f"{self.path}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


class WeightsLog(Callback):
    """Saves the module's weights at the end of training to ``<path>.rank<R>.pt``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                   f"{self.path}.rank{trainer.global_rank}.pt")


class ReferenceEMA(Callback):
    """The moving average of the whole weights in float64, after every step, saved at the end of training
    to ``<path>.rank<R>.pt`` with the number of parameters ZeRO-3 sharded (gathered on every rank)."""

    def __init__(self, path: str, decay: float):
        self.path, self.decay, self.average = path, decay, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from flowvid.lit.ema import is_sharded

        params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        self.sharded = sum(map(is_sharded, params.values()))
        gathered = contextlib.nullcontext()
        if self.sharded:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()))
        with gathered:
            weights = {name: p.detach().double().clone() for name, p in params.items()}
        if not self.average:
            self.average = weights
            return
        for name, weight in weights.items():
            self.average[name] = self.decay * self.average[name] + (1 - self.decay) * weight

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"average": self.average, "sharded": self.sharded}, f"{self.path}.rank{trainer.global_rank}.pt")


class CrashAt(Callback):
    """Kills the process without any cleanup when training is about to take step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


class SigtermAt(Callback):
    """Sends SIGTERM to process ``rank`` while it takes step ``step + 1`` (or, ``during="validation"``,
    while it validates after step ``step``), as a preemption would."""

    def __init__(self, step: int, rank: int = 0, during: str = "train"):
        self.step, self.rank, self.during = step, rank, during

    def _send(self, trainer, during: str) -> None:
        if (trainer.global_step, trainer.global_rank, during) == (self.step, self.rank, self.during):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(trainer, "validation")


class StopAt(Callback):
    """Stops training after step ``step`` through ``trainer.should_stop``, as a Timer's max_time does after a
    batch (``during="train"``) and EarlyStopping after a validation (``during="validation"``) or at the end of
    an epoch (``during="epoch_end"``)."""

    def __init__(self, step: int, during: str = "train"):
        self.step, self.during = step, during

    def _stop(self, trainer, during: str) -> None:
        if (trainer.global_step, during) == (self.step, self.during):
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._stop(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stop(trainer, "validation")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop(trainer, "epoch_end")


class PoisonBatch(Callback):
    """Makes batch ``batch_idx``'s latents NaN on rank ``rank`` only."""

    def __init__(self, rank: int, batch_idx: int):
        self.rank, self.batch_idx = rank, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch_idx:
            encode = type(pl_module).latents_of
            pl_module.latents_of = lambda *args: encode(pl_module, *args).fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        pl_module.__dict__.pop("latents_of", None)


# --- runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from flowvid.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(root, num_videos=32, frames=4, size=8, val_videos=16, shard_samples=8)
    return root


def recipe(shards: Path, run_dir: Path, *, denoiser: bool, max_steps: int, extra_callbacks: list | None = None) -> dict:
    """A complete fit config: tiny flow (+ denoiser), checkpoints every 2 steps, validation every 2."""
    model = {
        "flow": {"class_path": "flowvid.flows.global_local.GlobalLocalFlow",
                 "init_args": {"latent_channels": 3, "frame_size": [8, 8], "num_shallow": 2, "shallow_width": 32,
                               "shallow_depth": 1, "deep_width": 32, "deep_depth": 2, "head_dim": 16}},
        "codec": {"class_path": "flowvid.codecs.pixel.PixelCodec"},
        "video_shape": [4, 8, 8],
        "lr": 1e-3,
        "warmup_steps": 2,
        "grad_clip": None,  # DeepSpeed clips inside its engine; compare strategies without clipping
    }
    if denoiser:  # the full-featured model: a denoiser and a moving average of the weights
        model["ema_decay"] = 0.9
        model["denoiser"] = {
            "class_path": "flowvid.denoise.CausalDenoiser",
            "init_args": {"channels": 3, "frame_size": [8, 8], "width": 32, "depth": 1, "head_dim": 16},
        }
    return {
        "seed_everything": 0,
        "model": {"class_path": "flowvid.lit.FlowModule", "init_args": model},
        "data": {"class_path": "flowvid.data.VideoShardDataModule",
                 "init_args": {"train_dir": str(shards / "train"), "val_dir": str(shards / "val"), "batch_size": 4,
                               "batches_per_epoch": 4, "val_batches": 1, "shuffle_buffer": 8}},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
            "default_root_dir": str(run_dir), "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "val_check_interval": 2,
            "callbacks": [
                {"class_path": "flowvid.lit.checkpointing.RunCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "keep_last_k": -1}},
                {"class_path": "flowvid.lit.step_seed.StepSeed"},
                {"class_path": "scale_runs.LossLog", "init_args": {"path": str(run_dir / "losses")}},
                # A peak given: measuring one costs every run a second (its figures are tested elsewhere).
                {"class_path": "flowvid.lit.throughput.TrainingThroughput", "init_args": {"peak_flops": 1e11}},
                *(extra_callbacks or []),
            ],
        },
    }


def fit(config: dict, *overlays: str, args: tuple[str, ...] = (), expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Write ``config`` into its run directory and fit it, with recipe overlays from the repository."""
    run_dir = Path(config["trainer"]["default_root_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return run_fit([config_path, *(REPO / overlay for overlay in overlays)], args, cwd=REPO, expect_rc=expect_rc)


def run_fit(configs: list[Path], args: tuple[str, ...], cwd: Path, expect_rc: int = 0,
            subcommand: str = "fit") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flowvid.lit.cli_support", subcommand]
    for config in configs:
        command += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == expect_rc, f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def resume_on(shards: Path, devices: int, strategy: str, checkpoint: Path, run_dir: Path, *, denoiser: bool) -> Path:
    """Continue ``checkpoint`` (taken after step 2) to step 4 on ``devices`` processes, from a copy of it in
    ``run_dir``'s checkpoint folder, as ``resume: auto`` finds it after a restart on other machines; the
    validation after step 4 is logged to ``run_dir/validation.jsonl``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    copy = shutil.copytree if checkpoint.is_dir() else shutil.copy
    copy(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    validation = {"class_path": "scale_runs.ValidationLog", "init_args": {"path": str(run_dir / "validation")}}
    fit(recipe(shards, run_dir, denoiser=denoiser, max_steps=4, extra_callbacks=[validation]),
        f"recipes/distributed/{strategy}.yaml",
        args=("--trainer.devices", str(devices), "--trainer.precision", "32-true", "--resume", "auto"))
    return run_dir


# --- what the runs left -------------------------------------------------------------------------


def losses(run_dir: Path, rank: int = 0, key: str = "loss") -> dict[int, float]:
    """Loss per step (``key="denoiser_loss"``: the denoiser's); a step logged twice (redone after a
    resume) keeps its last value."""
    lines = (run_dir / f"losses.rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record[key] for record in map(json.loads, lines)}


def logged(run_dir: Path, key: str = "loss", rank: int = 0) -> list[float | None]:
    """Every batch's logged value, in order (``losses`` keeps one per step); None before it is logged."""
    lines = (run_dir / f"losses.rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line).get(key) for line in lines]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, different


def assert_same_final_weights(expected_run: Path, run: Path, step: int = 6) -> None:
    expected, actual = (torch.load(run_dir / "checkpoints" / f"step={step:08d}.ckpt", map_location="cpu",
                                   weights_only=False)["state_dict"] for run_dir in (expected_run, run))
    assert_same_tensors(expected, actual)
