"""Checkpoint files: atomic writes, damaged files, resume: auto, and refusing the wrong model."""

from __future__ import annotations

import importlib.util
import os
import signal
import stat
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from flowvid.cli import UserError
from flowvid.codecs.base import CodecMismatchError
from flowvid.codecs.pixel import PixelCodec
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.lit.checkpointing import (
    METADATA_KEY,
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CheckpointStrategyError,
    CorruptCheckpointError,
    RunCheckpoint,
    check_resumable,
    list_checkpoints,
    load_client_state,
    resolve_resume,
    run_metadata,
)
from flowvid.export import main as export_main
from flowvid.lit.cli_support import check_no_later_checkpoints
from flowvid.lit.strategies import ZeroStrategy


class TinyModel(LightningModule):
    def __init__(self, deep_width: int = 32, patch_size: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.codec = PixelCodec(patch_size=patch_size)
        self.flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(4, 4), deep_width=deep_width)


def checkpoint_of(model: LightningModule) -> dict:
    return {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            METADATA_KEY: run_metadata(model)}


# --- atomic writes ---------------------------------------------------------------------------------


def test_a_crash_in_the_middle_of_a_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=00000002.ckpt"
    io.save_checkpoint({"step": 2, "weights": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip archive")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 4}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the partial file is gone


def test_the_file_is_on_disk_before_its_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    """A power cut, unlike a crash, loses what is not flushed: the file's bytes before the rename (else the
    name could point at an empty file), then its folder's entries (else the old file could come back)."""
    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *paths: (events.append("rename"), replace(*paths))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "file"), fsync(fd))[1])
    AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "step=00000002.ckpt")
    assert events == ["file", "rename", "folder"]


def test_a_hard_kill_mid_write_leaves_a_partial_file_that_resume_ignores(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 2}, tmp_path / "step=00000002.ckpt")
    (tmp_path / "step=00000004.ckpt.partial").write_bytes(b"PK\x03\x04 truncated")  # what a SIGKILL leaves
    assert resolve_resume(tmp_path, "auto") == str(tmp_path / "step=00000002.ckpt")
    with pytest.raises(CorruptCheckpointError, match="still being written"):
        load_client_state(tmp_path / "step=00000004.ckpt.partial")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_zero_strategy_writes_directories_atomically(tmp_path, monkeypatch):
    target = tmp_path / "step=00000004.ckpt"
    target.mkdir()
    (target / "old_shard.pt").write_text("the previous checkpoint")

    def writes_then_dies(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir()
        (Path(filepath) / "half_written_shard.pt").write_text("...")
        raise RuntimeError("node lost")

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", writes_then_dies)
    with pytest.raises(RuntimeError, match="node lost"):
        ZeroStrategy(stage=3).save_checkpoint({}, target)
    assert [p.name for p in target.iterdir()] == ["old_shard.pt"]

    def writes(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir()  # fails unless the half-written folder of the crash was cleared first
        (Path(filepath) / "shard.pt").write_text("new")

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", writes)
    ZeroStrategy(stage=3).save_checkpoint({}, target)
    assert [p.name for p in target.iterdir()] == ["shard.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# --- damaged checkpoints ---------------------------------------------------------------------------


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "step=00000002.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.randn(256)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptCheckpointError, match="cannot read checkpoint"):
        load_client_state(path)
    with pytest.raises(CorruptCheckpointError, match="step=00000002.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError, match="notes.ckpt: not a PyTorch checkpoint"):
        load_client_state(path)


def test_a_deepspeed_checkpoint_missing_a_rank_shard_is_a_clear_error(tmp_path):
    folder = tmp_path / "step=00000004.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({METADATA_KEY: {"world_size": 2}}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({}, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CorruptCheckpointError, match="2 ranks but lacks rank 1's optimiser shard: .*"
                                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        load_client_state(folder)
    empty = tmp_path / "empty.ckpt"
    empty.mkdir()
    with pytest.raises(CorruptCheckpointError, match="not a complete DeepSpeed checkpoint"):
        load_client_state(empty)


def test_a_deepspeed_checkpoint_without_deepspeed_installed_says_what_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "step=00000004.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({METADATA_KEY: {"world_size": 1}}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"step=00000004.ckpt is a DeepSpeed checkpoint.*flowvid\[deepspeed\]"):
        load_client_state(folder)
    with pytest.raises(UserError, match="reading it needs DeepSpeed"):  # the commands say it in one line
        export_main(["--ckpt", str(folder), "--out", str(tmp_path / "model.safetensors")])


def test_a_deepspeed_directory_under_another_strategy_says_how_to_load_it(tmp_path):
    folder = tmp_path / "step=00000004.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    with pytest.raises(CheckpointStrategyError, match=r"DeepSpeed ZeRO checkpoint .*recipes/distributed/zero2\.yaml"
                                                      r".*flowvid export"):
        AtomicCheckpointIO().load_checkpoint(folder)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_lightning_file_under_zero_says_how_to_load_it(tmp_path):
    path = tmp_path / "step=00000004.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    with pytest.raises(CheckpointStrategyError, match=r"Lightning checkpoint file .*without the ZeRO overlay"
                                                      r".*flowvid export"):
        ZeroStrategy(stage=2).load_checkpoint(path)


# --- resume: auto | none | path --------------------------------------------------------------------


def test_resume_auto_takes_the_highest_step_not_the_newest_file(tmp_path):
    for step in (10, 8, 9):  # written out of order: modification times disagree with steps
        AtomicCheckpointIO().save_checkpoint({"step": step}, tmp_path / f"step={step:08d}.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step={s:08d}.ckpt" for s in (8, 9, 10)]
    assert resolve_resume(tmp_path, "auto") == str(tmp_path / "step=00000010.ckpt")


def test_resume_auto_passes_over_a_truncated_newest_checkpoint(tmp_path):
    for step in (2, 4):
        checkpoint = {"step": step, "weights": torch.randn(256)}
        AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / f"step={step:08d}.ckpt")
    newest = tmp_path / "step=00000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:200])  # what a full disk leaves
    with pytest.warns(UserWarning, match="unreadable checkpoint.*step=00000004"):
        assert resolve_resume(tmp_path, "auto") == str(tmp_path / "step=00000002.ckpt")
    (tmp_path / "step=00000002.ckpt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="none can be read"):
        resolve_resume(tmp_path, "auto")


def test_resuming_past_a_truncated_checkpoint_sets_it_aside_and_refuses_a_readable_newer_one(tmp_path):
    """resume: auto passes over a truncated newest checkpoint; the run it resumes must not be refused for it."""
    for step in (2, 4, 6):
        AtomicCheckpointIO().save_checkpoint({"step": step}, tmp_path / f"step={step:08d}.ckpt")
    truncated = tmp_path / "step=00000006.ckpt"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        resumed = resolve_resume(tmp_path, "auto")
    with pytest.warns(UserWarning, match="set aside step=00000006.ckpt.unreadable"):
        check_no_later_checkpoints(str(tmp_path), resumed)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step=00000002.ckpt", "step=00000004.ckpt"]
    assert (tmp_path / "step=00000006.ckpt.unreadable").is_file()
    with pytest.raises(ValueError, match="holds 1 checkpoint.* newer than step=00000002.ckpt"):
        check_no_later_checkpoints(str(tmp_path), str(tmp_path / "step=00000002.ckpt"))


def test_resume_none_and_an_empty_run_start_fresh_and_a_missing_path_is_an_error(tmp_path):
    assert resolve_resume(tmp_path / "no-run-yet", "auto") is None
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="'auto', 'none' or a checkpoint path"):
        resolve_resume(tmp_path, str(tmp_path / "missing.ckpt"))


# --- the wrong model -------------------------------------------------------------------------------


def test_resuming_a_different_model_configuration_names_the_differences():
    saved = checkpoint_of(TinyModel(deep_width=32))
    check_resumable(saved, TinyModel(deep_width=32), "checkpoint c")  # the same model passes
    with pytest.raises(CheckpointMismatchError, match=r"settings differ in deep_width \(32 there, 64 here\); the "
                                                      r"parameters differ, different shapes: flow\.deep\."):
        check_resumable(saved, TinyModel(deep_width=64), "checkpoint c")


def test_resuming_with_another_codec_is_a_codec_mismatch():
    saved = checkpoint_of(TinyModel(patch_size=1))
    with pytest.raises(CodecMismatchError, match="checkpoint c was made with codec 'pixel'"):
        check_resumable(saved, TinyModel(patch_size=2), "checkpoint c")


def test_metadata_records_versions_codec_and_every_parameter_shape():
    model = TinyModel()
    metadata = run_metadata(model, config={"model": {"class_path": "x"}})
    import flowvid

    assert metadata["flowvid_version"] == flowvid.__version__
    assert metadata["codec"] == model.codec.identity()
    assert metadata["parameters"]["flow.deep.proj_in.weight"] == [32, 3]
    assert set(metadata["parameters"]) == {name for name, _ in model.named_parameters()}
    assert metadata["config"] == {"model": {"class_path": "x"}} and metadata["world_size"] == 1
    assert all(isinstance(v, str) for v in metadata["plugins"].values())



class TrainableTiny(TinyModel):
    def training_step(self, batch, batch_idx):
        return self.flow.nll(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_run_checkpoint_keeps_the_last_k_and_refuses_to_resume_another_model(tmp_path):
    data = DataLoader(TensorDataset(torch.rand(8, 2, 4, 4, 3)), batch_size=2)

    def trainer(max_steps):
        return Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=tmp_path, logger=False,
                       enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[RunCheckpoint(every_n_train_steps=1, keep_last_k=2)])

    first = trainer(3)
    first.fit(TrainableTiny(), data)
    assert isinstance(first.strategy.checkpoint_io, AtomicCheckpointIO)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step=00000002.ckpt", "step=00000003.ckpt"]
    assert load_client_state(kept[-1])[METADATA_KEY]["parameters"]["flow.deep.proj_in.weight"] == [32, 3]

    with pytest.raises(CheckpointMismatchError, match=r"deep_width \(32 there, 64 here\)"):
        trainer(4).fit(TrainableTiny(deep_width=64), data, ckpt_path=resolve_resume(tmp_path / "checkpoints", "auto"))


@pytest.mark.parametrize("resuming_from, warned", [
    ("run/checkpoints/step=00000002.ckpt", False),  # a resume finds its checkpoints there: nothing to warn of
    (None, True),  # a fresh run among an earlier run's checkpoints (FlowvidCLI refuses it)
    ("elsewhere/step=00000002.ckpt", True),  # a run continued from another folder's checkpoint
])
def test_lightnings_warning_of_a_checkpoint_folder_that_is_not_empty_is_left_out_on_a_resume(
        tmp_path, monkeypatch, resuming_from, warned):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step=00000002.ckpt").write_bytes(b"")
    checkpoints = RunCheckpoint()
    checkpoints.resuming_from = resuming_from
    trainer = Trainer(accelerator="cpu", default_root_dir="run", logger=False, callbacks=[checkpoints])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoints.setup(trainer, TinyModel(), "fit")
    assert any("exists and is not empty" in str(warning.message) for warning in caught) == warned


def test_keep_last_k_prunes_the_checkpoint_resumed_from_whatever_the_spelling_of_the_run_folder(tmp_path, monkeypatch):
    data = DataLoader(TensorDataset(torch.rand(8, 2, 4, 4, 3)), batch_size=2)
    monkeypatch.chdir(tmp_path)

    def fit(root, max_steps, ckpt_path=None):
        Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[RunCheckpoint(every_n_train_steps=1, keep_last_k=2)],
                ).fit(TrainableTiny(), data, ckpt_path=ckpt_path)

    fit("run", 2)
    fit(str(tmp_path / "run"), 4, ckpt_path=resolve_resume(tmp_path / "run" / "checkpoints", "auto"))
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step=00000003.ckpt", "step=00000004.ckpt"]


def test_every_recipe_that_checkpoints_a_run_seeds_its_steps():
    """Without StepSeed a run resumed from its RunCheckpoint draws other noise than it would have."""
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    checked = 0
    for recipe in sorted(recipes.rglob("*.yaml")):
        callbacks = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("callbacks") or []
        classes = [callback["class_path"].rsplit(".", 1)[-1] for callback in callbacks]
        if "RunCheckpoint" in classes:
            checked += 1
            assert "StepSeed" in classes, f"{recipe} checkpoints the run without flowvid.lit.step_seed.StepSeed"
    assert checked >= 4


# --- stopping and saving in training ---------------------------------------------------------------


def tiny_data(batches: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(2 * batches, 2, 4, 4, 3)), batch_size=2)


def tiny_trainer(root: Path, max_steps: int, *callbacks: Callback, every_n_train_steps: int = 100,
                 **options) -> Trainer:
    checkpoints = RunCheckpoint(every_n_train_steps=every_n_train_steps, keep_last_k=-1)
    return Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[checkpoints, *callbacks], **options)


class SignalAt(Callback):
    """Sends ``signum`` to this process at the start of training batch ``batch`` (counted over the run),
    ``times`` times."""

    def __init__(self, signum: int, batch: int, times: int = 1):
        self.signum, self.batch, self.times = signum, batch, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def saved(root: Path) -> list[str]:
    return [path.name for path in list_checkpoints(root / "checkpoints")]


def batches_in(checkpoint: Path) -> int:
    return load_client_state(checkpoint)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"]


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT as in a terminal's foreground job: a background job started without job control inherits it
    ignored, and a run then leaves Ctrl-C alone (RunCheckpoint.on_train_start)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_the_step_in_progress_and_stops(tmp_path, ctrl_c_interrupts):
    with pytest.raises(SIGTERMException) as stopped:
        tiny_trainer(tmp_path, 4, SignalAt(signal.SIGINT, batch=2)).fit(TrainableTiny(), tiny_data())
    assert saved(tmp_path) == ["step=00000002.ckpt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C interrupts again after fit
    assert stopped.value.stopped_by == "Ctrl-C"


def test_a_run_stopped_by_sigterm_names_the_checkpoint_of_the_step_it_stopped_after(tmp_path, capsys):
    from flowvid.lit.cli_support import FitSummary

    with pytest.raises(SIGTERMException):
        tiny_trainer(tmp_path, 4, SignalAt(signal.SIGTERM, batch=2), FitSummary()).fit(TrainableTiny(), tiny_data())
    checkpoint = tmp_path / "checkpoints" / "step=00000002.ckpt"
    assert saved(tmp_path) == [checkpoint.name]
    summary = capsys.readouterr().out
    # Export and generate take flow models only: for this module, the command that continues the run alone.
    assert summary == (f"stopped at step 2; saved {checkpoint}\nnext:\n"
                       "  the same command with --resume auto continues the run\n")


def test_a_run_that_saved_no_checkpoint_names_none(tmp_path, capsys):
    from flowvid.lit.cli_support import FitSummary

    unsaved = RunCheckpoint(every_n_train_steps=100, save_on_train_end=False)
    Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[unsaved, FitSummary()]).fit(TrainableTiny(), tiny_data())
    assert saved(tmp_path) == []
    assert capsys.readouterr().out == "trained to step 2; wrote no checkpoint\n"


@pytest.mark.parametrize(("stopped_by", "status"), [("Ctrl-C", 130), ("SIGTERM", 143), (None, 143)])
def test_flowvid_fit_exits_as_a_shell_reports_the_signal_that_stopped_the_run(stopped_by, status, monkeypatch):
    """143 after SIGTERM, also on a process that learnt of another's signal (None); 130 after Ctrl-C."""
    from flowvid.lit import cli_support

    def stopped_run(*args, **kwargs):
        exception = SIGTERMException()
        exception.stopped_by = stopped_by
        raise exception

    monkeypatch.setattr(cli_support, "FlowvidCLI", stopped_run)
    assert cli_support.main(["fit"]) == status


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, ctrl_c_interrupts):
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt
        tiny_trainer(tmp_path, 4, SignalAt(signal.SIGINT, batch=2, times=2)).fit(TrainableTiny(), tiny_data())
    assert saved(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_inside_an_accumulation_window_stops_and_saves_at_its_end(tmp_path):
    trainer = tiny_trainer(tmp_path, 4, SignalAt(signal.SIGTERM, batch=3), accumulate_grad_batches=2)
    with pytest.raises(SIGTERMException) as stopped:
        trainer.fit(TrainableTiny(), tiny_data())
    # The signal came in the first batch of the second window: its gradients are not in a checkpoint.
    assert saved(tmp_path) == ["step=00000002.ckpt"]
    assert batches_in(tmp_path / "checkpoints" / "step=00000002.ckpt") == 4
    assert stopped.value.stopped_by == "SIGTERM"


class StepsItself(TrainableTiny):
    """Optimises itself as FlowModule does: one step per ``accumulate_grad_batches`` batches, counted over the
    run; ``skip_first``: no step for the first window it trains on (as for a non-finite loss)."""

    def __init__(self, accumulate_grad_batches: int = 1, skip_first: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.hparams.accumulate_grad_batches = accumulate_grad_batches
        self.skip_next = skip_first

    def training_step(self, batch, batch_idx):
        size = self.hparams.accumulate_grad_batches
        self.manual_backward(self.flow.nll(batch[0]).mean() / size)
        if self.trainer.fit_loop.epoch_loop.batch_progress.total.ready % size:
            return  # inside the window
        optimizer = self.optimizers()
        if not self.skip_next:
            optimizer.step()
        optimizer.zero_grad()
        self.skip_next = False


class StopAtEpochEnd(Callback):
    """Stops training at the end of the first epoch, as EarlyStopping checking on train epoch end does."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_a_stop_at_an_epoch_end_inside_an_accumulation_window_waits_for_the_window_end(tmp_path):
    # Windows of 2 batches run across epochs of 3: the first epoch ends in the middle of the second window.
    tiny_trainer(tmp_path, 10, StopAtEpochEnd()).fit(StepsItself(accumulate_grad_batches=2), tiny_data(batches=3))
    assert saved(tmp_path) == ["step=00000002.ckpt"]
    assert batches_in(tmp_path / "checkpoints" / "step=00000002.ckpt") == 4


def test_a_resumed_run_does_not_save_the_step_it_resumed_from_again(tmp_path):
    tiny_trainer(tmp_path, 2, every_n_train_steps=2).fit(StepsItself(), tiny_data())
    tiny_trainer(tmp_path, 3, every_n_train_steps=2).fit(StepsItself(skip_first=True), tiny_data(),
                                                         ckpt_path=resolve_resume(tmp_path / "checkpoints", "auto"))
    assert saved(tmp_path) == ["step=00000002.ckpt", "step=00000003.ckpt"]  # no step=00000002-v1.ckpt
