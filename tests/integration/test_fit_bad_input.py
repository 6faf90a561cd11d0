"""`flowvid fit` refuses what it cannot train before the first step, in one line, and resumes safely."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from flowvid.data import VideoShardDataModule, write_synthetic_dataset
from flowvid.lit.checkpointing import METADATA_KEY
from flowvid.lit.cli_support import main as fit_main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


def fit(*args: str) -> int:
    with mock.patch.object(sys, "argv", ["flowvid"]):  # pytest's own arguments are not the CLI's
        return fit_main(["fit", "--config", str(RECIPE), *args])


@pytest.mark.parametrize("override, message", [
    ("--data.init_args.batch_size=0", "data.init_args.batch_size must be >= 1, got 0"),
    ("--model.init_args.sampler=jacobbi", "unknown sampler 'jacobbi'; registered: jacobi"),
    ("--model.init_args.sampler={name: jacobi, init_args: {tol: 2}}", "tol must be a number in (0, 1)"),
    ("--model.init_args.guidance=-3", "model.init_args.guidance must be a finite number >= 0, got -3.0"),
    ("--model.init_args.video_shape=[0,16,16]", "model.init_args.video_shape is (frames, height, width), each >= 1"),
    ("--resume=/no/such.ckpt", "resume: /no/such.ckpt does not exist"),
    ("--model.init_args.accumulate_grad_batches=0", "model.init_args.accumulate_grad_batches must be an integer >= 1, got 0"),
    ("--trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4 applies only to automatic optimisation; "
                                            "FlowModule optimises itself: set model.init_args.accumulate_grad_batches"),
    ("--trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0 applies only to automatic optimisation; "
                                        "FlowModule optimises itself: set model.init_args.grad_clip"),
    ("--model.init_args.schedule_steps=0", "model.init_args.schedule_steps must be an integer >= 1, or null"),
    ("--model.init_args.warmup_steps=-5", "model.init_args.warmup_steps must be an integer >= 0, got -5"),
    ("--model.init_args.weight_decay=-0.1", "model.init_args.weight_decay must be a finite number >= 0, got -0.1"),
    ("--model.init_args.denoiser.init_args.depth=0", "CausalDenoiser depth must be an int >= 1, got 0"),
    ("--ckpt_path=/no/such.ckpt", "ckpt_path /no/such.ckpt does not exist"),
    ("--data.init_args.train_dir=null", "data.init_args.train_dir is not set, so there is nothing to train on; "
                                        "give the training shards with --data.init_args.train_dir"),
])
def test_a_bad_value_is_one_line_before_training(override, message, tmp_path, capsys):
    assert fit(override, f"--trainer.default_root_dir={tmp_path}") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"flowvid fit: error: {message}")
    assert "Traceback" not in "\n".join(error)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("option", ["--optimizer=torch.optim.SGD", "--lr_scheduler=torch.optim.lr_scheduler.StepLR"])
def test_lightnings_optimizer_and_scheduler_options_are_not_offered(option, tmp_path, capsys):
    """The model's own two parameter groups and schedule would be replaced, or the option ignored."""
    with pytest.raises(SystemExit) as stopped:
        fit(option, f"--trainer.default_root_dir={tmp_path}")
    assert stopped.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err


def test_a_config_error_names_the_wrong_option_without_the_whole_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        fit('--model.init_args.codec={"class_path": "flowvid.codecs.PixelCodec", "init_args": {"patchsize": 2}}',
            f"--trainer.default_root_dir={tmp_path}")
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "Option 'patchsize' is not accepted" in error and "flowvid fit --help" in error
    assert "usage:" not in error and len(error.splitlines()) < 25


def test_resume_auto_without_a_run_checkpoint_is_refused(tmp_path, capsys):
    no_run_checkpoint = "--trainer.callbacks=[]"
    assert fit("--resume=auto", no_run_checkpoint, f"--trainer.default_root_dir={tmp_path}") == 2
    error = capsys.readouterr().err
    assert "resume: auto needs a flowvid.lit.checkpointing.RunCheckpoint" in error
    assert "replaces the list of the configs before it" in error and "--trainer.callbacks+=" in error


@pytest.mark.parametrize("resume", [[], ["--resume=none"]], ids=["default", "none"])
def test_a_fresh_run_among_an_earlier_runs_checkpoints_is_refused(tmp_path, capsys, resume):
    """Its checkpoints would mix with the earlier run's, and the newest step could be the other run's."""
    earlier = tmp_path / "checkpoints" / "step=00000005.ckpt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier run")
    assert fit(*resume, f"--trainer.default_root_dir={tmp_path}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"flowvid fit: error: {tmp_path / 'checkpoints'} holds 1 checkpoint(s) of an earlier run (newest: "
                     "step=00000005.ckpt); continue it with --resume auto, or start afresh in another "
                     "--trainer.default_root_dir (or remove them)")
    assert [p.name for p in earlier.parent.iterdir()] == [earlier.name]


@pytest.mark.parametrize("missing", ["codec", "text_encoder"])
def test_missing_model_files_are_found_before_any_part_of_the_model_is_built(missing, tmp_path, capsys, monkeypatch):
    """The 7B recipe's flow takes minutes and tens of GB to build; its VAE and T5 folders are checked first."""
    from flowvid.flows.global_local import GlobalLocalFlow

    built = []
    original = GlobalLocalFlow.__init__
    monkeypatch.setattr(GlobalLocalFlow, "__init__", functools.wraps(original)(
        lambda self, *args, **kwargs: built.append(1) or original(self, *args, **kwargs)))
    vae = tmp_path / "vae"
    if missing == "text_encoder":  # a folder that passes the check (the check reads no file)
        vae.mkdir()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            (vae / name).write_text("{}")
    recipe = RECIPE.parents[1] / "starflow_v" / "t2v_480p.yaml"
    with mock.patch.object(sys, "argv", ["flowvid"]):
        status = fit_main(["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path}",
                           f"--model.init_args.codec.init_args.path={vae}",
                           f"--model.init_args.text_encoder.init_args.path={tmp_path / 't5'}"])
    assert status == 2 and not built
    error = capsys.readouterr().err.strip().splitlines()[-1]
    expected = {"codec": f"Wan VAE directory {vae} does not exist",
                "text_encoder": f"T5 directory {tmp_path / 't5'} does not exist"}[missing]
    assert expected in error
    assert missing == "codec" or "save_pretrained" in error  # and how to make one


def test_resuming_from_a_checkpoint_with_newer_ones_beside_it_is_refused(tmp_path, capsys):
    """The newer checkpoints of the branch left behind would be taken for the new branch's by resume: auto."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (95, 120):
        torch.save({"step": step}, folder / f"step={step:08d}.ckpt")
    assert fit(f"--resume={folder / 'step=00000095.ckpt'}", f"--trainer.default_root_dir={tmp_path}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"flowvid fit: error: {folder} holds 1 checkpoint(s) newer than step=00000095.ckpt "
                            "(step=00000120.ckpt)")


@pytest.mark.parametrize("ckpt_path", ["last", "run directory"])
def test_ckpt_path_last_and_a_run_directory_continue_from_the_newest_checkpoint(ckpt_path, tmp_path, capsys):
    """Lightning's "last" finds no last.ckpt among RunCheckpoint's and starts afresh beside them."""
    newest = tmp_path / "checkpoints" / "step=00000008.ckpt"
    newest.parent.mkdir()
    newest.write_bytes(b"\0" * 100)  # unreadable: the run stops where it reads it, before training
    given = "last" if ckpt_path == "last" else str(tmp_path)
    assert fit(f"--ckpt_path={given}", f"--trainer.default_root_dir={tmp_path}") == 2
    assert "none can be read" in capsys.readouterr().err


def test_a_ckpt_path_is_checked_like_resume_and_never_replaces_the_configured_model(tmp_path, capsys):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=8, size=16, seed=0)
    run = [f"--data.init_args.train_dir={tmp_path / 'train'}", f"--data.init_args.val_dir={tmp_path / 'val'}",
           f"--trainer.default_root_dir={tmp_path / 'run'}"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"\0" * 100)
    assert fit(f"--ckpt_path={truncated}", *run) == 2
    assert f"flowvid fit: error: cannot read checkpoint {truncated}" in capsys.readouterr().err
    other_model = tmp_path / "other_model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"noise_std": 0.5},
                METADATA_KEY: {"parameters": {"flow.deep.proj_in.weight": [64, 12]}}}, other_model)
    assert fit(f"--ckpt_path={other_model}", *run) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"flowvid fit: error: checkpoint {other_model} was made by a different model configuration")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_shards_that_hold_no_usable_sample_are_refused_at_setup(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8, seed=0)
    for shard in (tmp_path / "val").glob("*.tar"):
        shard.write_bytes(b"\xff" * 4096)
    data = VideoShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), batch_size=2)
    with pytest.raises(ValueError, match=f"shards in {tmp_path / 'val'} hold no usable sample"):
        data.setup("fit")
    VideoShardDataModule(str(tmp_path / "train"), batch_size=2).setup("fit")  # the good folder alone is fine


def test_the_error_keeps_its_context_when_it_wraps_another(tmp_path, capsys):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=8, size=16, seed=0)
    for shard in (tmp_path / "val").glob("*.tar"):
        shard.write_bytes(b"\xff" * 4096)
    assert fit(f"--data.init_args.train_dir={tmp_path / 'train'}", f"--data.init_args.val_dir={tmp_path / 'val'}",
               f"--trainer.default_root_dir={tmp_path / 'run'}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"flowvid fit: error: the shards in {tmp_path / 'val'} hold no usable sample")


def test_a_mixture_of_folders_that_do_not_fit_together_is_one_line_before_training(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "a", num_videos=4, frames=8, size=16, seed=0)
    write_synthetic_dataset(tmp_path / "b", num_videos=4, frames=4, size=16, seed=1)
    train = f"[{tmp_path / 'a' / 'train'}, {tmp_path / 'b' / 'train'}]"
    assert fit(f"--data.init_args.train_dir={train}", f"--data.init_args.val_dir={tmp_path / 'a' / 'val'}",
               "--data.init_args.train_weights=[1, 1]", f"--trainer.default_root_dir={tmp_path / 'run'}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"flowvid fit: error: the shards in {tmp_path / 'a' / 'train'} hold clips of (8, 16, 16) "
                            f"but those in {tmp_path / 'b' / 'train'} (4, 16, 16)"), error
    assert fit(f"--data.init_args.train_dir={train}", "--data.init_args.train_weights=[1]",
               f"--trainer.default_root_dir={tmp_path / 'run'}") == 2
    assert "train_weights has 1 weight(s) for 2 train_dir folder(s)" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "0.0"])
def test_validating_no_batch_is_refused_rather_than_a_silent_success(limit, tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=8, size=16, val_videos=2)
    with mock.patch.object(sys, "argv", ["flowvid"]):
        status = fit_main(["validate", "--config", str(RECIPE), f"--trainer.default_root_dir={tmp_path / 'run'}",
                           f"--data.init_args.train_dir={tmp_path / 'shapes' / 'train'}",
                           f"--data.init_args.val_dir={tmp_path / 'shapes' / 'val'}",
                           f"--trainer.limit_val_batches={limit}"])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == ("flowvid validate: error: trainer.limit_val_batches=0 validates no batch; give a number of "
                         "batches, or a fraction of them (--trainer.limit_val_batches 1.0 for all)")
