"""Scale and durability end to end: ZeRO-2/3 against DDP, resume after a crash, export of sharded checkpoints.

Every run is ``python -m flowvid.lit.cli_support fit`` (what ``flowvid fit`` runs) in a subprocess on
a tiny FlowModule and 4-frame 8x8 synthetic clips; multi-process runs are 2 CPU processes over gloo.
The runs log their losses per rank to JSON-lines files through ``LossLog`` below (the subprocesses
import this file by putting its folder on PYTHONPATH).
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

pytestmark = pytest.mark.slow
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs DeepSpeed: pip install 'flowvid[deepspeed]'")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


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


# --- helpers ------------------------------------------------------------------------------------


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
                {"class_path": "test_scale_training.LossLog", "init_args": {"path": str(run_dir / "losses")}},
                {"class_path": "flowvid.lit.throughput.TrainingThroughput"},
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


def losses(run_dir: Path, rank: int = 0, key: str = "loss") -> dict[int, float]:
    """Loss per step (``key="denoiser_loss"``: the denoiser's); a step logged twice (redone after a
    resume) keeps its last value."""
    lines = (run_dir / f"losses.rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record[key] for record in map(json.loads, lines)}


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, different


TWO_PROCESSES = ("--trainer.devices", "2")


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Path:
    """The reference: DDP on 2 processes, 4 steps, without a denoiser."""
    run_dir = tmp_path_factory.mktemp("ddp")
    fit(recipe(shards, run_dir, denoiser=False, max_steps=4), "recipes/distributed/ddp.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
    return run_dir


@pytest.fixture(scope="module")
def zero_runs(shards, tmp_path_factory) -> dict[int, Path]:
    """ZeRO-2 and ZeRO-3 on 2 processes, the DDP run's config otherwise (run on first use)."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}")
            fit(recipe(shards, run_dir, denoiser=False, max_steps=4), f"recipes/distributed/zero{stage}.yaml",
                args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
            runs[stage] = run_dir
        return runs[stage]

    return run


@pytest.fixture(scope="module")
def single_run(shards, tmp_path_factory) -> Path:
    """One process, with a denoiser, 6 steps: the run the others are compared with."""
    run_dir = tmp_path_factory.mktemp("single")
    fit(recipe(shards, run_dir, denoiser=True, max_steps=6))
    return run_dir


# --- ZeRO equals DDP ------------------------------------------------------------------------------


def test_a_batch_bad_on_one_rank_is_skipped_by_every_rank(shards, tmp_path):
    weights = {"class_path": "test_scale_training.WeightsLog", "init_args": {"path": str(tmp_path / "weights")}}
    poison = {"class_path": "test_scale_training.PoisonBatch", "init_args": {"rank": 1, "batch_idx": 1}}
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=3, extra_callbacks=[weights, poison]),
        "recipes/distributed/ddp.yaml", args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
    ranks = [torch.load(tmp_path / f"weights.rank{rank}.pt") for rank in (0, 1)]
    assert_same_tensors(*ranks)  # rank 0's batch was fine, yet it skipped with rank 1
    for rank in (0, 1):
        steps = [json.loads(line)["step"] for line in (tmp_path / f"losses.rank{rank}.jsonl").read_text().splitlines()]
        assert steps == [1, 1, 2, 3]  # the second batch took no step, on either rank


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_processes_gives_the_ddp_losses(stage, ddp_run, zero_runs):
    run_dir = zero_runs(stage)
    for rank in (0, 1):
        expected = losses(ddp_run, rank)
        assert sorted(expected) == [1, 2, 3, 4]
        assert losses(run_dir, rank) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # Sharded checkpoints: one optimiser shard per rank, written under their final names only.
    checkpoint = run_dir / "checkpoints" / "step=00000004.ckpt"
    assert len(list(checkpoint.glob("checkpoint/*optim_states.pt"))) == 2
    assert not list((run_dir / "checkpoints").glob("*.partial"))


@needs_deepspeed
def test_tokens_seen_count_every_process(ddp_run, zero_runs):
    tokens_per_step = 2 * 4 * 4 * 8 * 8  # processes x videos x frames x 8 x 8 tokens
    for run_dir in (ddp_run, zero_runs(3)):
        for rank in (0, 1):
            assert losses(run_dir, rank, key="tokens_seen") == {step: step * tokens_per_step for step in (1, 2, 3, 4)}


@needs_deepspeed
def test_zero_with_a_denoiser_gives_the_single_process_losses(shards, single_run, tmp_path):
    """One backward pass per step trains both the flow and the denoiser, as ZeRO requires."""
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), "recipes/distributed/zero2.yaml",
        args=("--trainer.devices", "1", "--trainer.precision", "32-true"))
    assert losses(tmp_path) == pytest.approx(losses(single_run), rel=1e-6)
    assert losses(tmp_path, key="denoiser_loss") == pytest.approx(losses(single_run, key="denoiser_loss"), rel=1e-5)


ACCUMULATE = ("--trainer.precision", "32-true", "--model.init_args.accumulate_grad_batches", "2")


@pytest.fixture(scope="module")
def accumulating_runs(shards, tmp_path_factory):
    """2 processes, 2 optimiser steps of 2 batches each, under DDP or ZeRO-2/3 (run on first use);
    with a denoiser and an EMA, or without either."""
    runs: dict[str, Path] = {}

    def run(strategy: str, denoiser: bool) -> Path:
        key = f"{strategy}{'_denoiser' if denoiser else ''}"
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(key)
            weights = {"class_path": "test_scale_training.WeightsLog", "init_args": {"path": str(run_dir / "weights")}}
            fit(recipe(shards, run_dir, denoiser=denoiser, max_steps=2, extra_callbacks=[weights]),
                f"recipes/distributed/{strategy}.yaml", args=(*TWO_PROCESSES, *ACCUMULATE))
            runs[key] = run_dir
        return runs[key]

    return run


def logged(run_dir: Path, key: str = "loss", rank: int = 0) -> list[float | None]:
    """Every batch's logged value, in order (``losses`` keeps one per step); None before it is logged."""
    lines = (run_dir / f"losses.rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line).get(key) for line in lines]


def test_ddp_with_gradient_accumulation_keeps_the_ranks_in_step(accumulating_runs):
    run_dir = accumulating_runs("ddp", denoiser=True)
    ranks = [torch.load(run_dir / f"weights.rank{rank}.pt") for rank in (0, 1)]
    # Only every second backward pass reduces gradients; the ranks still take identical steps.
    assert_same_tensors(*ranks)
    steps = [json.loads(line)["step"] for line in (run_dir / "losses.rank0.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 1, 2]  # four batches, two optimiser steps
    start = torch.load(run_dir / "checkpoints" / "step=00000002.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(start[name], ranks[0][name]) for name in start)  # the checkpoint is the last step's


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_gradient_accumulation_gives_the_ddp_losses(stage, accumulating_runs):
    denoiser = stage == 2
    ddp, zero = accumulating_runs("ddp", denoiser), accumulating_runs(f"zero{stage}", denoiser)
    for rank in (0, 1):
        assert logged(zero, rank=rank) == pytest.approx(logged(ddp, rank=rank), rel=1e-6)
        if denoiser:
            assert logged(zero, "denoiser_loss", rank) == pytest.approx(logged(ddp, "denoiser_loss", rank), rel=1e-5)
        else:  # the engine's norm of the window's gradients is their mean's, as under DDP (flow only here)
            norms = [norm for norm in logged(zero, "grad_norm", rank) if norm is not None]
            assert len(norms) == 3  # from the first step on: batches 2, 3 and 4
            assert norms == pytest.approx([n for n in logged(ddp, "flow_grad_norm", rank) if n is not None], rel=1e-5)


# --- resume ---------------------------------------------------------------------------------------


def test_a_run_killed_mid_training_resumes_with_auto_to_the_same_losses(shards, single_run, tmp_path):
    crash = {"class_path": "test_scale_training.CrashAt", "init_args": {"step": 3}}
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[crash]), expect_rc=17)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=00000002.ckpt"]
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    expected = losses(single_run)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path) == expected  # bit for bit: weights, AdamW, schedule, data position, noise
    assert losses(tmp_path, key="tokens_seen") == losses(single_run, key="tokens_seen")
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000006.ckpt", map_location="cpu", weights_only=False)
                      for run in (single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])
    assert_same_tensors(whole["flowvid"]["ema"], resumed["flowvid"]["ema"])


@pytest.mark.parametrize("during", ["train", "validation"])
def test_a_sigterm_saves_the_step_in_progress_and_resume_auto_continues_to_the_same_losses(during, shards,
                                                                                          single_run, tmp_path):
    # In training step 3, or in the validation after step 2, which finishes, and then step 3 too.
    sigterm = {"class_path": "test_scale_training.SigtermAt", "init_args": {"step": 2, "during": during}}
    done = fit(recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[sigterm]), expect_rc=143)
    assert "SIGTERM: stopping after step 3" in done.stderr + done.stdout
    # Step 3 is no multiple of the checkpoint interval (2): saved because of the signal, and nothing after it.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=00000002.ckpt", "step=00000003.ckpt"]
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    assert losses(tmp_path) == losses(single_run)  # bit for bit, steps 4 to 6 included
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000006.ckpt", map_location="cpu", weights_only=False)
                      for run in (single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])


@pytest.mark.parametrize(("during", "step"), [("train", 3), ("validation", 3), ("epoch_end", 4)])
def test_a_run_a_callback_stops_resumes_with_auto_to_the_same_losses(during, step, shards, single_run, tmp_path):
    """A stop through trainer.should_stop (a Timer's max_time, EarlyStopping) saves the step it stops after
    before Lightning closes the epoch: the resumed run takes the rest of the epoch's batches, or the next
    epoch's (4 batches an epoch)."""
    stop = {"class_path": "test_scale_training.StopAt", "init_args": {"step": step, "during": during}}
    stopped = recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[stop])
    stopped["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # saved because of the stop only
    stopped["trainer"]["val_check_interval"] = 3  # a validation after step 3 (StepSeed: no effect on training)
    fit(stopped)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step={step:08d}.ckpt"]
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    assert losses(tmp_path) == losses(single_run)
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000006.ckpt", map_location="cpu", weights_only=False)
                      for run in (single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])


@pytest.fixture(scope="module")
def accumulating_single_run(shards, tmp_path_factory) -> Path:
    """One process, 4 optimiser steps of 2 batches each."""
    run_dir = tmp_path_factory.mktemp("accumulating_single")
    fit(recipe(shards, run_dir, denoiser=False, max_steps=4), args=ACCUMULATE)
    return run_dir


def test_a_sigterm_inside_an_accumulation_window_saves_at_its_end_and_resumes_to_the_same_weights(
        shards, accumulating_single_run, tmp_path):
    # In the first batch of step 2's window, whose gradients no checkpoint could hold before its last batch.
    sigterm = {"class_path": "test_scale_training.SigtermAt", "init_args": {"step": 1}}
    done = fit(recipe(shards, tmp_path, denoiser=False, max_steps=4, extra_callbacks=[sigterm]), args=ACCUMULATE,
               expect_rc=143)
    assert "SIGTERM: stopping after step 2" in done.stderr + done.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=00000002.ckpt"]
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=4), args=(*ACCUMULATE, "--resume", "auto"))
    # Resumed at a window's start: no second checkpoint of step 2 (step=00000002-v1.ckpt) inside the next one.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=00000002.ckpt", "step=00000004.ckpt"]
    assert logged(tmp_path) == logged(accumulating_single_run)  # every batch's loss, bit for bit
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000004.ckpt", map_location="cpu", weights_only=False)
                      for run in (accumulating_single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])


def test_validate_takes_a_run_directory_for_its_newest_checkpoint(shards, single_run, tmp_path):
    log = {"class_path": "test_scale_training.ValidationLog", "init_args": {"path": str(tmp_path / "val")}}
    config = tmp_path / "validate.yaml"
    config.write_text(yaml.safe_dump(recipe(shards, single_run, denoiser=True, max_steps=6, extra_callbacks=[log])))
    for ckpt in (single_run, *(single_run / "checkpoints" / f"step=0000000{step}.ckpt" for step in (6, 4))):
        run_fit([config], ("--ckpt_path", str(ckpt)), cwd=REPO, subcommand="validate")
    run_fit([config], ("--resume", "auto"), cwd=REPO, subcommand="validate")  # as a recipe's resume: auto says
    by_directory, newest, older, by_resume = map(json.loads, (tmp_path / "val.jsonl").read_text().splitlines())
    assert by_directory == newest == by_resume != older


@needs_deepspeed
def test_validate_reads_a_zero3_checkpoint_as_the_ddp_checkpoint_of_the_same_run(shards, ddp_run, zero_runs, tmp_path):
    """Outside training DeepSpeed cannot load its own ZeRO-3 checkpoints; rank 0 consolidates the shards instead
    (whatever the number of processes, which this test keeps at the two that wrote them)."""

    def validate(run_dir: Path, strategy: str) -> list[float]:
        log = {"class_path": "test_scale_training.ValidationLog", "init_args": {"path": str(tmp_path / strategy)}}
        config = tmp_path / f"{strategy}.yaml"
        config.write_text(yaml.safe_dump(recipe(shards, tmp_path / strategy, denoiser=False, max_steps=4,
                                                extra_callbacks=[log])))
        run_fit([config, REPO / "recipes" / "distributed" / f"{strategy}.yaml"],
                (*TWO_PROCESSES, "--trainer.precision", "32-true",
                 "--ckpt_path", str(run_dir / "checkpoints" / "step=00000002.ckpt")), cwd=REPO, subcommand="validate")
        return [json.loads(line)["bits_per_dim"] for line in (tmp_path / f"{strategy}.jsonl").read_text().splitlines()]

    expected = validate(ddp_run, "ddp")
    assert len(expected) == 2  # one line per process
    assert validate(zero_runs(3), "zero3") == pytest.approx(expected, rel=1e-5)


def test_a_sigterm_to_one_of_two_processes_stops_both_after_the_same_saved_step(shards, ddp_run, tmp_path):
    sigterm = {"class_path": "test_scale_training.SigtermAt", "init_args": {"step": 2, "rank": 1}}
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=4, extra_callbacks=[sigterm]), "recipes/distributed/ddp.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true"), expect_rc=143)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=00000002.ckpt", "step=00000003.ckpt"]
    for rank in (0, 1):
        assert losses(tmp_path, rank) == {step: losses(ddp_run, rank)[step] for step in (1, 2, 3)}
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=4), "recipes/distributed/ddp.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true", "--resume", "auto"))
    for rank in (0, 1):
        assert losses(tmp_path, rank) == losses(ddp_run, rank)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero3", marks=needs_deepspeed)])
def test_two_processes_resume_from_the_newest_checkpoint_to_the_same_losses(strategy, shards, ddp_run, zero_runs,
                                                                             tmp_path):
    whole = ddp_run if strategy == "ddp" else zero_runs(3)
    # What a run killed after step 2 leaves behind: its run directory with the step-2 checkpoint.
    (tmp_path / "checkpoints").mkdir()
    copy = shutil.copytree if strategy == "zero3" else shutil.copy
    copy(whole / "checkpoints" / "step=00000002.ckpt", tmp_path / "checkpoints" / "step=00000002.ckpt")
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=4), f"recipes/distributed/{strategy}.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true", "--resume", "auto"))
    for rank in (0, 1):
        resumed = losses(tmp_path, rank)
        assert sorted(resumed) == [3, 4]
        assert resumed == {step: losses(whole, rank)[step] for step in (3, 4)}


def resume_on(shards: Path, devices: int, strategy: str, checkpoint: Path, run_dir: Path, *, denoiser: bool) -> Path:
    """Continue ``checkpoint`` (taken after step 2) to step 4 on ``devices`` processes, from a copy of it in
    ``run_dir``'s checkpoint folder, as ``resume: auto`` finds it after a restart on other machines; the
    validation after step 4 is logged to ``run_dir/validation.jsonl``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    copy = shutil.copytree if checkpoint.is_dir() else shutil.copy
    copy(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    validation = {"class_path": "test_scale_training.ValidationLog", "init_args": {"path": str(run_dir / "validation")}}
    fit(recipe(shards, run_dir, denoiser=denoiser, max_steps=4, extra_callbacks=[validation]),
        f"recipes/distributed/{strategy}.yaml",
        args=("--trainer.devices", str(devices), "--trainer.precision", "32-true", "--resume", "auto"))
    return run_dir


@needs_deepspeed
def test_resuming_a_checkpoint_under_the_other_kind_of_strategy_says_what_to_do_in_one_line(shards, tmp_path):
    zero2 = ("recipes/distributed/zero2.yaml",)
    for written_under, resumed_under, message in (
            ((), zero2, "is a Lightning checkpoint file (one device or DDP), which ZeroStrategy cannot load"),
            (zero2, (), "is a DeepSpeed ZeRO checkpoint (a directory of shards), which only "
                        "flowvid.lit.strategies.ZeroStrategy loads")):
        run_dir = tmp_path / ("zero2" if written_under else "plain")
        precision = ("--trainer.precision", "32-true")
        fit(recipe(shards, run_dir, denoiser=False, max_steps=1), *written_under, args=precision)
        failed = fit(recipe(shards, run_dir, denoiser=False, max_steps=2), *resumed_under,
                     args=(*precision, "--resume", "auto"), expect_rc=2)
        line = failed.stderr.strip().splitlines()[-1]
        assert line.startswith("flowvid fit: error: ") and message in line and "flowvid export" in line


@needs_deepspeed
def test_a_zero3_checkpoint_of_two_processes_resumes_on_one_as_the_ddp_checkpoint_does(shards, ddp_run, zero_runs,
                                                                                        tmp_path):
    """ZeRO shards fit the number of processes that wrote them: a run continued on fewer devices has them
    re-partitioned, and trains on as a DDP checkpoint of the same run does (plain Lightning restores that)."""
    step2 = "checkpoints/step=00000002.ckpt"
    reference = resume_on(shards, 1, "ddp", ddp_run / step2, tmp_path / "ddp", denoiser=False)
    resumed = resume_on(shards, 1, "zero3", zero_runs(3) / step2, tmp_path / "zero3", denoiser=False)
    assert sorted(losses(reference)) == [3, 4]
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)
    leftovers = [p.name for p in (tmp_path / "zero3" / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]
    assert not leftovers  # the re-partitioned copy is removed once loaded


@needs_deepspeed
def test_a_zero2_checkpoint_of_one_process_resumes_on_two_with_the_denoiser_and_ema(shards, single_run, tmp_path):
    one = tmp_path / "one"
    fit(recipe(shards, one, denoiser=True, max_steps=2), "recipes/distributed/zero2.yaml",
        args=("--trainer.devices", "1", "--trainer.precision", "32-true"))
    step2 = "checkpoints/step=00000002.ckpt"
    reference = resume_on(shards, 2, "ddp", single_run / step2, tmp_path / "ddp", denoiser=True)
    resumed = resume_on(shards, 2, "zero2", one / step2, tmp_path / "zero2", denoiser=True)
    for rank in (0, 1):
        assert sorted(losses(reference, rank)) == [3, 4]
        for key in ("loss", "denoiser_loss"):
            assert losses(resumed, rank, key) == pytest.approx(losses(reference, rank, key), rel=1e-5)
    # Validation runs on the moving average of the weights, which came back whole from one process's shard.
    reference, resumed = ([json.loads(line) for line in (tmp_path / run / "validation.jsonl").read_text().splitlines()]
                          for run in ("ddp", "zero2"))
    assert [record["step"] for record in reference] == [4, 4]  # one line per process
    assert [record["bits_per_dim"] for record in resumed] == pytest.approx(
        [record["bits_per_dim"] for record in reference], rel=1e-5)

    # A damaged shard stops every process with one message, rather than leaving the others waiting.
    damaged = tmp_path / "damaged" / "checkpoints" / "step=00000002.ckpt"
    shutil.copytree(one / step2, damaged)
    shard = next(damaged.glob("checkpoint/*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    failed = fit(recipe(shards, damaged.parents[1], denoiser=True, max_steps=4), "recipes/distributed/zero2.yaml",
                 args=(*TWO_PROCESSES, "--trainer.precision", "32-true", "--resume", "auto"), expect_rc=1)
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: cannot re-partition {damaged}, written by 1 process, for 2" in failed.stderr
    assert [p.name for p in damaged.parent.iterdir()] == [damaged.name]


@needs_deepspeed
def test_an_ema_under_zero3_averages_every_shard_saves_whole_weights_and_resumes(shards, tmp_path):
    """Each rank averages its ZeRO-3 shards (of the deep block's large weights, which DeepSpeed gathers
    only while they are used, and of the small ones, which it keeps gathered between steps); validation
    runs on the averages, a checkpoint holds the whole averages, and a resumed run's averages are the
    uninterrupted run's."""
    from flowvid.lit.checkpointing import load_client_state

    args = (*TWO_PROCESSES, "--trainer.precision", "32-true")
    runs = {name: tmp_path / name for name in ("whole", "resumed")}
    for name, run_dir in runs.items():
        reference = {"class_path": "test_scale_training.ReferenceEMA",
                     "init_args": {"path": str(run_dir / "reference"), "decay": 0.9}}
        config = recipe(shards, run_dir, denoiser=False, max_steps=4, extra_callbacks=[reference])
        config["model"]["init_args"]["ema_decay"] = 0.9
        config["model"]["init_args"]["flow"]["init_args"]["deep_width"] = 192  # 192 x 576 > 1e5: gathered when used
        if name == "resumed":  # what a run killed after step 2 leaves behind
            shutil.copytree(runs["whole"] / "checkpoints" / "step=00000002.ckpt",
                            run_dir / "checkpoints" / "step=00000002.ckpt")
        fit(config, "recipes/distributed/zero3.yaml", args=(*args, "--resume", "auto") if name == "resumed" else args)
    averages = {name: load_client_state(run_dir / "checkpoints" / "step=00000004.ckpt")["flowvid"]["ema"]
                for name, run_dir in runs.items()}
    reference = torch.load(runs["whole"] / "reference.rank0.pt")
    assert reference["sharded"] == len(reference["average"])
    assert averages["whole"].keys() == reference["average"].keys()
    for name, expected in reference["average"].items():
        assert averages["whole"][name].dtype == torch.float32
        torch.testing.assert_close(averages["whole"][name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_tensors(averages["whole"], averages["resumed"])
    # Throughput counts the whole weights' FLOPs, not the shards' (the flow is all there is to train).
    whole_parameters = sum(weight.numel() for weight in reference["average"].values())
    for rank in (0, 1):
        assert set(losses(runs["whole"], rank, key="flops_per_token").values()) == {6.0 * whole_parameters}


# --- export ---------------------------------------------------------------------------------------


@needs_deepspeed
def test_export_of_a_zero3_checkpoint_loads_in_one_process_with_the_ddp_likelihood(ddp_run, zero_runs, tmp_path):
    from flowvid.export import export_checkpoint, load_exported

    checkpoint = "checkpoints/step=00000004.ckpt"
    sharded = export_checkpoint(zero_runs(3) / checkpoint, tmp_path / "z3" / "model.safetensors")
    single = export_checkpoint(ddp_run / checkpoint, tmp_path / "ddp" / "model.safetensors")
    batch = torch.rand(2, 4, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_sharded = load_exported(sharded).flow.nll(batch)
        from_single = load_exported(single).flow.nll(batch)
    assert torch.allclose(from_sharded, from_single, rtol=1e-6, atol=0)
    config = yaml.safe_load((tmp_path / "z3" / "config.yaml").read_text())
    assert config["trainer"]["strategy"]["init_args"]["stage"] == 3


def test_a_best_checkpoint_by_validation_bits_per_dim_beside_the_run_checkpoints_exports(shards, tmp_path):
    from flowvid.export import export_checkpoint, load_exported

    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "best"), "filename": "{step}", "monitor": "val/bits_per_dim",
                          "mode": "min", "save_top_k": 1}}
    validations = {"class_path": "test_scale_training.ValidationLog", "init_args": {"path": str(tmp_path / "val")}}
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=6, extra_callbacks=[best, validations]))
    scores = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [score["step"] for score in scores] == [2, 4, 6]
    lowest = min(scores, key=lambda score: score["bits_per_dim"])
    [kept] = list((tmp_path / "best").iterdir())
    assert kept.name == f"step={lowest['step']}.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step=00000006.ckpt"  # resume: auto
    exported = load_exported(export_checkpoint(kept, tmp_path / "export" / "model.safetensors"))
    assert exported.flow.nll(torch.rand(1, 4, 8, 8, 3)).isfinite().all()


# --- fine-tuning ----------------------------------------------------------------------------------


def test_the_finetune_recipe_starts_from_the_export_and_keeps_the_frozen_blocks(shards, single_run, tmp_path):
    from safetensors.torch import load_file

    from flowvid.export import export_checkpoint

    exported = export_checkpoint(single_run / "checkpoints" / "step=00000006.ckpt",
                                 tmp_path / "exported" / "model.safetensors")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "custom").symlink_to(shards, target_is_directory=True)
    # The commands of the recipe's header, run where its relative paths point.
    run_fit([tmp_path / "exported" / "config.yaml", REPO / "recipes" / "finetune" / "custom_shards.yaml"],
            ("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0",
             "--data.init_args.batches_per_epoch", "4", "--data.init_args.val_batches", "1"), cwd=tmp_path)
    start = load_file(exported)
    tuned = torch.load(tmp_path / "runs" / "finetune_custom" / "checkpoints" / "step=00000002.ckpt",
                       map_location="cpu", weights_only=False)["state_dict"]
    assert set(tuned) == set(start)
    changed = {name for name in start if not torch.equal(tuned[name], start[name])}
    assert not any(name.startswith("flow.shallow.") for name in changed)  # frozen by the recipe
    assert any(name.startswith("flow.deep.") for name in changed)
    assert any(name.startswith("denoiser.") for name in changed)


def test_the_lora_recipe_trains_adapters_only_resumes_exactly_and_exports_the_adapted_model(shards, single_run,
                                                                                             tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from flowvid.export import build_module, export_checkpoint, load_exported
    from flowvid.lit.finetune import LoRA

    start = export_checkpoint(single_run / "checkpoints" / "step=00000006.ckpt",
                              tmp_path / "exported" / "model.safetensors")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "custom").symlink_to(shards, target_is_directory=True)
    configs = [tmp_path / "exported" / "config.yaml", REPO / "recipes" / "finetune" / "custom_shards.yaml",
               REPO / "recipes" / "finetune" / "lora.yaml"]
    quiet = ("--trainer.val_check_interval", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar",
             "false", "--data.init_args.num_workers", "0", "--data.init_args.batches_per_epoch", "4",
             "--data.init_args.val_batches", "1", "--model.init_args.schedule_steps", "4")
    run_fit(configs, (*quiet, "--trainer.max_steps", "4", "--trainer.default_root_dir", "whole"), cwd=tmp_path)
    for steps in ("2", "4"):  # stopped after step 2, then the same command again: it resumes
        run_fit(configs, (*quiet, "--trainer.max_steps", steps, "--trainer.default_root_dir", "resumed"), cwd=tmp_path)
    final = "checkpoints/step=00000004.ckpt"
    whole, resumed = (torch.load(tmp_path / run / final, map_location="cpu", weights_only=False)
                      for run in ("whole", "resumed"))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])
    assert_same_tensors(whole["flowvid"]["ema"], resumed["flowvid"]["ema"])

    exported, tuned = load_file(start), whole["state_dict"]
    adapters = {name for name in tuned if name.rpartition(".")[2] in ("lora_a", "lora_b", "lora_scale")}
    assert set(tuned) == set(exported) | adapters and adapters
    assert all(torch.equal(tuned[name], exported[name]) for name in exported if name.startswith("flow."))
    assert any(tuned[name].abs().max() > 0 for name in adapters if name.endswith("lora_b"))  # trained from zero
    assert any(not torch.equal(tuned[name], exported[name]) for name in exported if name.startswith("denoiser."))

    merged = export_checkpoint(tmp_path / "whole" / final, tmp_path / "merged" / "model.safetensors",
                               weights="trained")
    assert set(load_file(merged)) == set(exported)  # the architecture of the model adapted
    adapted = build_module(yaml.safe_load((tmp_path / "exported" / "config.yaml").read_text()))
    LoRA(rank=16, alpha=16).setup(SimpleNamespace(), adapted, "fit")
    adapted.load_state_dict(tuned)
    batch = torch.rand(2, 4, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_exported(merged).flow.nll(batch), adapted.flow.nll(batch), rtol=1e-5, atol=1e-6)


@needs_deepspeed
def test_lora_under_zero3_gives_the_ddp_losses_and_exports_the_merged_model(shards, tmp_path):
    from safetensors.torch import load_file

    from flowvid.export import export_checkpoint

    lora = {"class_path": "flowvid.lit.finetune.LoRA", "init_args": {"rank": 4}}
    runs = {strategy: tmp_path / strategy for strategy in ("ddp", "zero3")}
    for strategy, run_dir in runs.items():
        fit(recipe(shards, run_dir, denoiser=False, max_steps=4, extra_callbacks=[lora]),
            f"recipes/distributed/{strategy}.yaml", args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
    assert losses(runs["zero3"]) == pytest.approx(losses(runs["ddp"]), rel=1e-6)
    checkpoint = "checkpoints/step=00000004.ckpt"
    exports = {strategy: load_file(export_checkpoint(run_dir / checkpoint, run_dir / "export" / "model.safetensors"))
               for strategy, run_dir in runs.items()}
    assert not any("lora" in name for name in exports["zero3"])  # adapters merged from the shards
    for name, weight in exports["ddp"].items():
        torch.testing.assert_close(exports["zero3"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
