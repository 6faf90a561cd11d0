"""Durability end to end: a run crashed, preempted (SIGTERM) or stopped by a callback resumes with
``resume: auto`` to the losses and weights of the uninterrupted run, bit for bit; checkpoints of one
process continue on two, or under the other kind of strategy with a clear error; fine-tuning starts
from an export.

The runs are subprocesses of ``flowvid fit`` (``scale_runs``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from scale_runs import (ACCUMULATE, REPO, TWO_PROCESSES, assert_same_final_weights, assert_same_tensors,
                        checkpoint_names, fit, logged, losses, needs_deepspeed, recipe, resume_on, run_fit,
                        shards)  # noqa: F401 (shards: a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_run(shards, tmp_path_factory) -> Path:
    """One process, with a denoiser, 6 steps: the run the others are compared with."""
    run_dir = tmp_path_factory.mktemp("single")
    fit(recipe(shards, run_dir, denoiser=True, max_steps=6))
    return run_dir


@pytest.fixture(scope="module")
def zero2_single_run(shards, tmp_path_factory) -> Path:
    """The single run's config under ZeRO-2 on one process."""
    run_dir = tmp_path_factory.mktemp("zero2_single")
    fit(recipe(shards, run_dir, denoiser=True, max_steps=6), "recipes/distributed/zero2.yaml",
        args=("--trainer.devices", "1", "--trainer.precision", "32-true"))
    return run_dir


@pytest.fixture(scope="module")
def accumulating_single_run(shards, tmp_path_factory) -> Path:
    """One process, 4 optimiser steps of 2 batches each."""
    run_dir = tmp_path_factory.mktemp("accumulating_single")
    fit(recipe(shards, run_dir, denoiser=False, max_steps=4), args=ACCUMULATE)
    return run_dir


# --- resume equals uninterrupted --------------------------------------------------------------------


def test_a_run_killed_mid_training_resumes_with_auto_to_the_same_losses(shards, single_run, tmp_path):
    crash = {"class_path": "scale_runs.CrashAt", "init_args": {"step": 3}}
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[crash]), expect_rc=17)
    assert checkpoint_names(tmp_path) == ["step=00000002.ckpt"]
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    expected = losses(single_run)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path) == expected  # bit for bit: weights, AdamW, schedule, data position, noise
    assert losses(tmp_path, key="tokens_seen") == losses(single_run, key="tokens_seen")
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000006.ckpt", map_location="cpu", weights_only=False)
                      for run in (single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])
    assert_same_tensors(whole["flowvid"]["ema"], resumed["flowvid"]["ema"])


def test_a_sigterm_saves_the_step_in_progress_and_resume_auto_continues_to_the_same_losses(shards, single_run,
                                                                                          tmp_path):
    # In training step 3; then, resumed, in the validation after step 4, which finishes, and step 5 too.
    for during, step, saved in (("train", 2, 3), ("validation", 4, 5)):
        sigterm = {"class_path": "scale_runs.SigtermAt", "init_args": {"step": step, "during": during}}
        done = fit(recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[sigterm]),
                   args=("--resume", "auto") if saved > 3 else (), expect_rc=143)
        assert f"SIGTERM: stopping after step {saved}" in done.stderr + done.stdout
        # Steps 3 and 5 are no multiples of the checkpoint interval (2): saved because of the signal.
        assert checkpoint_names(tmp_path)[-2:] == [f"step={saved - 1:08d}.ckpt", f"step={saved:08d}.ckpt"]
        assert max(losses(tmp_path)) == saved  # and nothing after it
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    assert losses(tmp_path) == losses(single_run)  # bit for bit, steps 4 to 6 included
    assert_same_final_weights(single_run, tmp_path)


def test_a_run_that_callbacks_stop_three_times_resumes_with_auto_to_the_same_losses(shards, single_run, tmp_path):
    """A stop through trainer.should_stop (a Timer's max_time, EarlyStopping) saves the step it stops after
    before Lightning closes the epoch: the resumed run takes the rest of the epoch's batches, or the next
    epoch's (4 batches an epoch). One run stopped after a batch, after a validation and at an epoch's end,
    resumed each time, ends as the uninterrupted run."""
    saved = []
    for during, step in (("train", 2), ("validation", 3), ("epoch_end", 4)):
        stop = {"class_path": "scale_runs.StopAt", "init_args": {"step": step, "during": during}}
        stopped = recipe(shards, tmp_path, denoiser=True, max_steps=6, extra_callbacks=[stop])
        stopped["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # saved because of the stop only
        stopped["trainer"]["val_check_interval"] = 3  # a validation after step 3 (StepSeed: no effect on training)
        fit(stopped, args=("--resume", "auto") if saved else ())
        saved.append(f"step={step:08d}.ckpt")
        assert checkpoint_names(tmp_path) == saved
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=6), args=("--resume", "auto"))
    assert losses(tmp_path) == losses(single_run)
    assert_same_final_weights(single_run, tmp_path)


def test_a_sigterm_inside_an_accumulation_window_saves_at_its_end_and_resumes_to_the_same_weights(
        shards, accumulating_single_run, tmp_path):
    # In the first batch of step 2's window, whose gradients no checkpoint could hold before its last batch.
    sigterm = {"class_path": "scale_runs.SigtermAt", "init_args": {"step": 1}}
    done = fit(recipe(shards, tmp_path, denoiser=False, max_steps=4, extra_callbacks=[sigterm]), args=ACCUMULATE,
               expect_rc=143)
    assert "SIGTERM: stopping after step 2" in done.stderr + done.stdout
    assert checkpoint_names(tmp_path) == ["step=00000002.ckpt"]
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=4), args=(*ACCUMULATE, "--resume", "auto"))
    # Resumed at a window's start: no second checkpoint of step 2 (step=00000002-v1.ckpt) inside the next one.
    assert checkpoint_names(tmp_path) == ["step=00000002.ckpt", "step=00000004.ckpt"]
    assert logged(tmp_path) == logged(accumulating_single_run)  # every batch's loss, bit for bit
    whole, resumed = (torch.load(run / "checkpoints" / "step=00000004.ckpt", map_location="cpu", weights_only=False)
                      for run in (accumulating_single_run, tmp_path))
    assert_same_tensors(whole["state_dict"], resumed["state_dict"])


def test_validate_takes_a_run_directory_for_its_newest_checkpoint(shards, single_run, tmp_path):
    log = {"class_path": "scale_runs.ValidationLog", "init_args": {"path": str(tmp_path / "val")}}
    config = tmp_path / "validate.yaml"
    config.write_text(yaml.safe_dump(recipe(shards, single_run, denoiser=True, max_steps=6, extra_callbacks=[log])))
    for ckpt in (single_run, *(single_run / "checkpoints" / f"step=0000000{step}.ckpt" for step in (6, 4))):
        run_fit([config], ("--ckpt_path", str(ckpt)), cwd=REPO, subcommand="validate")
    run_fit([config], ("--resume", "auto"), cwd=REPO, subcommand="validate")  # as a recipe's resume: auto says
    by_directory, newest, older, by_resume = map(json.loads, (tmp_path / "val.jsonl").read_text().splitlines())
    assert by_directory == newest == by_resume != older


# --- one process under ZeRO, and from one process to two ----------------------------------------------


@needs_deepspeed
def test_zero_with_a_denoiser_gives_the_single_process_losses(single_run, zero2_single_run):
    """One backward pass per step trains both the flow and the denoiser, as ZeRO requires."""
    assert losses(zero2_single_run) == pytest.approx(losses(single_run), rel=1e-6)
    assert losses(zero2_single_run, key="denoiser_loss") == pytest.approx(losses(single_run, key="denoiser_loss"),
                                                                          rel=1e-5)


@needs_deepspeed
def test_resuming_a_checkpoint_under_the_other_kind_of_strategy_says_what_to_do_in_one_line(shards, single_run,
                                                                                          zero2_single_run, tmp_path):
    zero2 = ("recipes/distributed/zero2.yaml",)
    step2 = "checkpoints/step=00000002.ckpt"
    for written_by, resumed_under, message in (
            (single_run, zero2, "is a Lightning checkpoint file (one device or DDP), which ZeroStrategy cannot load"),
            (zero2_single_run, (), "is a DeepSpeed ZeRO checkpoint (a directory of shards), which only "
                                   "flowvid.lit.strategies.ZeroStrategy loads")):
        run_dir = tmp_path / written_by.name
        (run_dir / "checkpoints").mkdir(parents=True)
        copy = shutil.copytree if written_by == zero2_single_run else shutil.copy
        copy(written_by / step2, run_dir / step2)
        failed = fit(recipe(shards, run_dir, denoiser=True, max_steps=6), *resumed_under,
                     args=("--trainer.precision", "32-true", "--resume", "auto"), expect_rc=2)
        line = failed.stderr.strip().splitlines()[-1]
        assert line.startswith("flowvid fit: error: ") and message in line and "flowvid export" in line


@needs_deepspeed
def test_a_zero2_checkpoint_of_one_process_resumes_on_two_with_the_denoiser_and_ema(shards, single_run,
                                                                                  zero2_single_run, tmp_path):
    step2 = "checkpoints/step=00000002.ckpt"
    reference = resume_on(shards, 2, "ddp", single_run / step2, tmp_path / "ddp", denoiser=True)
    resumed = resume_on(shards, 2, "zero2", zero2_single_run / step2, tmp_path / "zero2", denoiser=True)
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
    shutil.copytree(zero2_single_run / step2, damaged)
    shard = next(damaged.glob("checkpoint/*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    failed = fit(recipe(shards, damaged.parents[1], denoiser=True, max_steps=4), "recipes/distributed/zero2.yaml",
                 args=(*TWO_PROCESSES, "--trainer.precision", "32-true", "--resume", "auto"), expect_rc=1)
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: cannot re-partition {damaged}, written by 1 process, for 2" in failed.stderr
    assert [p.name for p in damaged.parent.iterdir()] == [damaged.name]


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
             "--data.init_args.val_batches", "1", "--model.init_args.schedule_steps", "4",
             "--model.init_args.warmup_steps", "1")
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
