"""Scale end to end: ZeRO-2/3 against DDP on two processes, with gradient accumulation, an EMA, LoRA
and sharded checkpoints (validated, resumed on as many or fewer processes, exported).

The runs are subprocesses of ``flowvid fit`` (``scale_runs``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flowvid.lit.checkpointing import consolidated_state_dict, load_client_state

from scale_runs import (ACCUMULATE, REPO, TWO_PROCESSES, assert_same_tensors, checkpoint_names, fit, logged, losses,
                        needs_deepspeed, recipe, resume_on, run_fit, shards)  # noqa: F401 (shards: a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Path:
    """The reference: DDP on 2 processes, 4 steps, with a denoiser and an EMA."""
    run_dir = tmp_path_factory.mktemp("ddp")
    fit(recipe(shards, run_dir, denoiser=True, max_steps=4), "recipes/distributed/ddp.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
    return run_dir


@pytest.fixture(scope="module")
def zero_runs(shards, tmp_path_factory) -> dict[int, Path]:
    """ZeRO-2 and ZeRO-3 on 2 processes, the DDP run's config otherwise (run on first use)."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}")
            fit(recipe(shards, run_dir, denoiser=True, max_steps=4), f"recipes/distributed/zero{stage}.yaml",
                args=(*TWO_PROCESSES, "--trainer.precision", "32-true"))
            runs[stage] = run_dir
        return runs[stage]

    return run


@pytest.fixture(scope="module")
def accumulating_runs(shards, tmp_path_factory):
    """2 processes, 2 optimiser steps of 2 batches each, under DDP or ZeRO-2/3 (run on first use);
    with a denoiser and an EMA, or without either."""
    runs: dict[str, Path] = {}

    def run(strategy: str, denoiser: bool) -> Path:
        key = f"{strategy}{'_denoiser' if denoiser else ''}"
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(key)
            weights = {"class_path": "scale_runs.WeightsLog", "init_args": {"path": str(run_dir / "weights")}}
            fit(recipe(shards, run_dir, denoiser=denoiser, max_steps=2, extra_callbacks=[weights]),
                f"recipes/distributed/{strategy}.yaml", args=(*TWO_PROCESSES, *ACCUMULATE))
            runs[key] = run_dir
        return runs[key]

    return run


# --- ZeRO equals DDP ------------------------------------------------------------------------------


def test_a_batch_bad_on_one_rank_is_skipped_by_every_rank(shards, tmp_path):
    weights = {"class_path": "scale_runs.WeightsLog", "init_args": {"path": str(tmp_path / "weights")}}
    poison = {"class_path": "scale_runs.PoisonBatch", "init_args": {"rank": 1, "batch_idx": 1}}
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
        reference = {"class_path": "scale_runs.ReferenceEMA",
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


# --- sharded checkpoints --------------------------------------------------------------------------


@needs_deepspeed
def test_validate_reads_a_zero3_checkpoint_as_the_ddp_checkpoint_of_the_same_run(shards, ddp_run, zero_runs, tmp_path):
    """Outside training DeepSpeed cannot load its own ZeRO-3 checkpoints; rank 0 consolidates the shards instead
    (whatever the number of processes, which this test keeps at the two that wrote them)."""

    def validate(run_dir: Path, strategy: str) -> list[float]:
        log = {"class_path": "scale_runs.ValidationLog", "init_args": {"path": str(tmp_path / strategy)}}
        config = tmp_path / f"{strategy}.yaml"
        config.write_text(yaml.safe_dump(recipe(shards, tmp_path / strategy, denoiser=True, max_steps=4,
                                                extra_callbacks=[log])))
        run_fit([config, REPO / "recipes" / "distributed" / f"{strategy}.yaml"],
                (*TWO_PROCESSES, "--trainer.precision", "32-true",
                 "--ckpt_path", str(run_dir / "checkpoints" / "step=00000002.ckpt")), cwd=REPO, subcommand="validate")
        return [json.loads(line)["bits_per_dim"] for line in (tmp_path / f"{strategy}.jsonl").read_text().splitlines()]

    expected = validate(ddp_run, "ddp")
    assert len(expected) == 2  # one line per process
    assert validate(zero_runs(3), "zero3") == pytest.approx(expected, rel=1e-5)


def test_a_sigterm_to_one_of_two_processes_stops_both_after_the_same_saved_step(shards, ddp_run, tmp_path):
    sigterm = {"class_path": "scale_runs.SigtermAt", "init_args": {"step": 2, "rank": 1}}
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=4, extra_callbacks=[sigterm]), "recipes/distributed/ddp.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true"), expect_rc=143)
    assert checkpoint_names(tmp_path) == ["step=00000002.ckpt", "step=00000003.ckpt"]
    for rank in (0, 1):
        assert losses(tmp_path, rank) == {step: losses(ddp_run, rank)[step] for step in (1, 2, 3)}
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=4), "recipes/distributed/ddp.yaml",
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
    fit(recipe(shards, tmp_path, denoiser=True, max_steps=4), f"recipes/distributed/{strategy}.yaml",
        args=(*TWO_PROCESSES, "--trainer.precision", "32-true", "--resume", "auto"))
    for rank in (0, 1):
        resumed = losses(tmp_path, rank)
        assert sorted(resumed) == [3, 4]
        assert resumed == {step: losses(whole, rank)[step] for step in (3, 4)}


@needs_deepspeed
def test_a_zero3_checkpoint_of_two_processes_resumes_on_one_as_the_ddp_checkpoint_does(shards, ddp_run, zero_runs,
                                                                                        tmp_path):
    """ZeRO shards fit the number of processes that wrote them: a run continued on fewer devices has them
    re-partitioned, and trains on as a DDP checkpoint of the same run does (plain Lightning restores that)."""
    step2 = "checkpoints/step=00000002.ckpt"
    reference = resume_on(shards, 1, "ddp", ddp_run / step2, tmp_path / "ddp", denoiser=True)
    resumed = resume_on(shards, 1, "zero3", zero_runs(3) / step2, tmp_path / "zero3", denoiser=True)
    assert sorted(losses(reference)) == [3, 4]
    for key in ("loss", "denoiser_loss"):  # two parameter groups: each keeps its learning rate and betas
        assert losses(resumed, key=key) == pytest.approx(losses(reference, key=key), rel=1e-6, abs=1e-7)
    # The last step's update shows in the weights alone: every group's Adam step counts once per step.
    checkpoint = "checkpoints/step=00000004.ckpt"
    expected = torch.load(reference / checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    actual = consolidated_state_dict(resumed / checkpoint, load_client_state(resumed / checkpoint))
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    leftovers = [p.name for p in (tmp_path / "zero3" / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]
    assert not leftovers  # the re-partitioned copy is removed once loaded


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
    validations = {"class_path": "scale_runs.ValidationLog", "init_args": {"path": str(tmp_path / "val")}}
    fit(recipe(shards, tmp_path, denoiser=False, max_steps=6, extra_callbacks=[best, validations]))
    scores = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [score["step"] for score in scores] == [2, 4, 6]
    lowest = min(scores, key=lambda score: score["bits_per_dim"])
    [kept] = list((tmp_path / "best").iterdir())
    assert kept.name == f"step={lowest['step']}.ckpt"
    assert checkpoint_names(tmp_path)[-1] == "step=00000006.ckpt"  # resume: auto
    exported = load_exported(export_checkpoint(kept, tmp_path / "export" / "model.safetensors"))
    assert exported.flow.nll(torch.rand(1, 4, 8, 8, 3)).isfinite().all()
