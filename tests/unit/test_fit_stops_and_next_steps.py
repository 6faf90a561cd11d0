"""What `flowvid fit` says and does when a run stops, and what it offers next, for flow and VideoVAE runs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from flowvid.codecs import VideoVAE
from flowvid.codecs.pixel import PixelCodec
from flowvid.codecs.vae_training import VideoVAEModule
from flowvid.denoise import CausalDenoiser
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit import cli_support
from flowvid.lit.checkpointing import (METADATA_KEY, CheckpointMismatchError, RunCheckpoint, check_resumable,
                                       list_checkpoints, resolve_resume)
from flowvid.lit.finetune import Freeze, InitFromExport, LoRA
from flowvid.text import LearnedTextEncoder

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "codecs" / "video_vae_shapes.yaml"


ORIGINAL_TRAINING_STEP = VideoVAEModule.training_step


@pytest.fixture(autouse=True)
def no_pytest_arguments(monkeypatch):
    monkeypatch.setattr("sys.argv", ["flowvid"])


def tiny_vae_fit(tmp_path: Path, max_steps: int, *extra: str) -> int:
    overrides = {
        "trainer.max_steps": max_steps, "trainer.val_check_interval": 2, "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false", "trainer.default_root_dir": str(tmp_path / "run"),
        "data.init_args.root": str(tmp_path / "data"), "data.init_args.num_videos": 8,
        "data.init_args.val_videos": 4, "data.init_args.size": 16, "data.init_args.frames": 5,
        "data.init_args.shard_samples": 4, "data.init_args.batch_size": 2, "data.init_args.val_batches": 1,
        "data.init_args.batches_per_epoch": 8,
        "model.init_args.latent_channels": 8, "model.init_args.width": 16, "model.init_args.depth": 1,
    }
    return cli_support.main(["fit", "--config", str(RECIPE), *(f"--{k}={v}" for k, v in overrides.items()), *extra])


@contextlib.contextmanager
def said_lines() -> Iterator[list[str]]:
    """What Lightning's rank_zero_info and flowvid's messages through it say, line by line."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT as in a terminal's foreground job (RunCheckpoint leaves an ignored SIGINT alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_at_step(monkeypatch, step: int, times: int = 1) -> None:
    """Press Ctrl-C ``times`` times as the training step after ``step`` starts."""
    original = VideoVAEModule.training_step
    pressed = []

    def training_step(self, batch, index):
        if self.trainer.global_step == step and not pressed:
            pressed.append(step)
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, index)

    monkeypatch.setattr(VideoVAEModule, "training_step", training_step)


def saved(tmp_path: Path) -> list[str]:
    return [path.name for path in list_checkpoints(tmp_path / "run" / "checkpoints")]


def test_the_vae_recipe_saves_on_ctrl_c_continues_with_resume_auto_and_offers_its_codec(
        tmp_path, monkeypatch, capsys, ctrl_c_interrupts):
    ctrl_c_at_step(monkeypatch, 1)
    with said_lines() as lines:
        assert tiny_vae_fit(tmp_path, 4) == 130
    assert saved(tmp_path) == ["step=00000002.ckpt"]
    checkpoints = os.path.realpath(tmp_path / "run" / "checkpoints")
    assert (f"Ctrl-C: stopping after step 2, saved in {checkpoints}; the same command with --resume auto continues "
            "from there") in lines
    resume = capsys.readouterr().out.split("next:\n")[1].splitlines()[0]
    assert resume.startswith("  flowvid fit --config ") and resume.endswith(" --resume auto")  # the summary agrees
    monkeypatch.setattr(VideoVAEModule, "training_step", ORIGINAL_TRAINING_STEP)

    assert tiny_vae_fit(tmp_path, 4, "--resume", "auto") == 0
    assert saved(tmp_path) == ["step=00000002.ckpt", "step=00000004.ckpt"]
    out = capsys.readouterr().out
    checkpoint = tmp_path / "run" / "checkpoints" / "step=00000004.ckpt"
    next_commands = out.split("next:\n")[1]
    assert "flowvid export" not in next_commands and "flowvid generate" not in next_commands
    assert "--codec video_vae --codec-args" in next_commands and f"VideoVAE.from_checkpoint(\"{checkpoint}\")" in out
    assert VideoVAE.from_checkpoint(checkpoint).latent_shape(5, 16, 16) == (2, 4, 4, 8)


def test_a_second_ctrl_c_exits_as_the_first_does(tmp_path, monkeypatch, capsys, ctrl_c_interrupts):
    ctrl_c_at_step(monkeypatch, 1, times=2)
    assert tiny_vae_fit(tmp_path, 4) == 130
    assert saved(tmp_path) == []


def test_export_of_a_vae_checkpoint_is_refused_in_one_line_naming_what_it_is(tmp_path, monkeypatch, capsys):
    from flowvid.cli import UserError
    from flowvid.export import main as export_main

    assert tiny_vae_fit(tmp_path, 2) == 0
    with pytest.raises(UserError, match=r"holds a flowvid\.codecs\.vae_training\.VideoVAEModule, not a flow video "
                                        r"generator; .*--codec video_vae.*VideoVAE\.from_checkpoint"):
        export_main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "exported" / "model.safetensors")])
    assert not (tmp_path / "exported").exists()


class SigtermAtSecondStep(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, index):
        if self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_run_checkpoint_outside_flowvid_fit_gives_no_resume_advice(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=4, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[RunCheckpoint(every_n_train_steps=100)])
    with said_lines() as lines, pytest.raises(SIGTERMException):
        trainer.fit(SigtermAtSecondStep(), DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=2))
    checkpoints = os.path.realpath(tmp_path / "checkpoints")
    assert f"SIGTERM: stopping after step 2, saved in {checkpoints}" in lines


def test_lightnings_warning_of_frozen_parts_in_eval_mode_is_left_out():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_support.quiet_benign_messages()
        warnings.warn("Found 44 module(s) in eval mode at the start of training. This may lead to unexpected "
                      "behavior during training.", PossibleUserWarning)
    assert caught == []


# --- flow models: LoRA, Freeze, the learned text encoder's vocabulary ------------------------------------

VIDEO = (3, 4, 6)


def tiny_flow_module() -> FlowModule:
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=16)
    return FlowModule(flow, PixelCodec(patch_size=2), LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8),
                      CausalDenoiser(12, (2, 3), width=16, depth=1, head_dim=8, text_width=16), video_shape=VIDEO)


def test_lora_says_how_many_parameters_are_adapters_and_how_many_train_in_all():
    module = tiny_flow_module()
    with said_lines() as lines:
        LoRA(rank=2).setup(SimpleNamespace(), module, "fit")
    adapters = sum(p.numel() for name, p in module.named_parameters() if name.endswith(("lora_a", "lora_b")))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert adapters < trainable
    [said] = [line for line in lines if line.startswith("LoRA:")]
    assert said.endswith(f"({adapters:,} adapter parameters); {trainable:,} parameters train in all, adapters included")


def test_a_lora_runs_next_commands_include_the_adapters_only_export(tmp_path):
    module = tiny_flow_module()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    plain = cli_support.commands_taking_on(trainer, module, str(tmp_path / "step=00000002.ckpt"))
    assert not any("--adapters-only" in command for command in plain)
    LoRA(rank=2).setup(SimpleNamespace(), module, "fit")
    adapted = cli_support.commands_taking_on(trainer, module, str(tmp_path / "step=00000002.ckpt"))
    assert [command for command in adapted if command.endswith("--adapters-only")] == [
        f"flowvid export --ckpt {tmp_path}/step=00000002.ckpt --out {tmp_path}/exported/adapters.safetensors "
        "--adapters-only"]


def test_validate_says_what_it_validates_and_not_what_trains(tmp_path):
    (tmp_path / "step=00000004.ckpt").write_bytes(b"")  # listed by name; validate reads it later
    with said_lines() as lines, pytest.MonkeyPatch.context() as patch:
        patch.setattr("flowvid.lit.checkpointing.newest_readable", lambda found, where: found[-1])
        resolve_resume(tmp_path, "auto", validating=True)
        Freeze("deep").setup(SimpleNamespace(), tiny_flow_module(), "validate")
        LoRA(rank=2).setup(SimpleNamespace(), tiny_flow_module(), "validate")
    assert f"resume: auto validates {tmp_path / 'step=00000004.ckpt'}" in lines
    assert not any("continues" in line or "froze" in line or "train" in line for line in lines)


def test_fine_tuning_from_an_export_says_new_words_stay_unknown(tmp_path):
    module = tiny_flow_module()
    callback = InitFromExport(str(tmp_path / "missing.safetensors"))
    callback.resuming = True  # the export is not read again; the vocabulary is still the export's
    callback.setup(SimpleNamespace(ckpt_path=None), module, "fit")
    module.text_encoder.train()
    with pytest.warns(UserWarning) as warned:
        module.text_encoder(["a glowing ball rolls"])
    [said] = [str(warning.message) for warning in warned]
    assert "cannot change when fine-tuning: these words stay <unk>" in said
    assert "flowvid data vocabulary" not in said


def test_a_checkpoint_of_another_vocabulary_is_refused_naming_the_key_and_what_to_do():
    module = tiny_flow_module()
    recorded = dict(module.text_encoder.identity(), vocabulary_sha256="0123456789abcdef")
    with pytest.raises(CheckpointMismatchError) as refused:
        check_resumable({METADATA_KEY: {"text_encoder": recorded}}, module, "the export exported/model.safetensors")
    message = str(refused.value)
    current = module.text_encoder.identity()["vocabulary_sha256"]
    assert message.startswith("the export exported/model.safetensors was trained with another text encoder than "
                              f"this model's: they differ in vocabulary_sha256 ('0123456789abcdef' there, "
                              f"'{current}' here); ")
    assert "leave out the config or option that gives text_encoder a vocabulary" in message
    assert "{" not in message  # no identity dicts to compare by eye


# --- a refused run leaves no folders of its own -------------------------------------------------------------


def trainer_of_a_run_in(root: Path) -> Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return Trainer(accelerator="cpu", default_root_dir=root, logger=TensorBoardLogger(root),
                   callbacks=[RunCheckpoint(every_n_train_steps=10)], enable_progress_bar=False)


def write_what_setup_writes(trainer: Trainer) -> Path:
    """The event file and config a run writes before its first step, and its empty checkpoint folder."""
    version = Path(trainer.logger.log_dir)
    version.mkdir(parents=True)
    (version / "events.out.tfevents.1796312770.vm.26628.0").write_bytes(b"\0" * 88)
    (version / "config.yaml").write_text("model: {}\n")
    Path(trainer.default_root_dir, "checkpoints").mkdir()
    return version


def test_a_refused_run_removes_the_folders_it_made_and_nothing_else(tmp_path):
    earlier = tmp_path / "earlier" / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("model: {}\n")  # an earlier run's, made before this one's trainer
    for root in (tmp_path / "new", tmp_path / "earlier"):
        trainer = trainer_of_a_run_in(root)
        made = cli_support.folders_a_run_makes(trainer)
        write_what_setup_writes(trainer)
        cli_support.remove_what_a_refused_run_made(made)
    assert not (tmp_path / "new").exists()
    assert sorted(path.name for path in (tmp_path / "earlier").rglob("*")) == ["config.yaml", "lightning_logs",
                                                                              "version_0"]


def test_a_folder_a_refused_run_made_is_kept_when_it_holds_more_than_its_setup_wrote(tmp_path):
    trainer = trainer_of_a_run_in(tmp_path / "run")
    made = cli_support.folders_a_run_makes(trainer)
    version = write_what_setup_writes(trainer)
    (version / "notes.txt").write_text("mine")
    cli_support.remove_what_a_refused_run_made(made)
    assert (version / "notes.txt").exists() and (version / "config.yaml").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # empty: nothing of value in it
