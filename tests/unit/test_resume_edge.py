"""Resuming among links and unwritable folders: a link to a checkpoint is not a second checkpoint, a link
to nothing is passed over, and a folder that cannot take checkpoints stops a run before its first step."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.lit.checkpointing import (
    AtomicCheckpointIO,
    CheckpointFolderError,
    RunCheckpoint,
    list_checkpoints,
    resolve_resume,
)
from flowvid.lit.cli_support import check_no_later_checkpoints


def save_steps(folder, *steps: int) -> None:
    for step in steps:
        AtomicCheckpointIO().save_checkpoint({"step": step}, folder / f"step={step:08d}.ckpt")


def test_a_last_ckpt_link_to_a_removed_checkpoint_is_passed_over_with_a_warning_naming_both(tmp_path):
    """keep_last_k removes the checkpoint a ModelCheckpoint's last.ckpt links to: resume: auto stopped on the
    link with a bare FileNotFoundError."""
    save_steps(tmp_path, 2, 4)
    os.symlink(tmp_path / "step=00000006.ckpt", tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match=r"passing over .*last\.ckpt: it links to .*step=00000006\.ckpt, which does "
                                         "not exist"):
        assert resolve_resume(tmp_path, "auto") == str(tmp_path / "step=00000004.ckpt")


def test_a_last_ckpt_link_to_the_newest_checkpoint_does_not_block_resuming_from_it(tmp_path):
    """Listed as a checkpoint of its own, the link made the newest checkpoint newer than itself, and the resume
    was refused for 'checkpoints newer than step=00000004.ckpt (step=00000002.ckpt, step=00000004.ckpt)'."""
    save_steps(tmp_path, 2, 4)
    os.symlink("step=00000004.ckpt", tmp_path / "last.ckpt")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step=00000002.ckpt", "step=00000004.ckpt"]
    resumed = resolve_resume(tmp_path, "auto")
    assert resumed == str(tmp_path / "step=00000004.ckpt")
    check_no_later_checkpoints(str(tmp_path), resumed)


def test_a_link_to_a_checkpoint_outside_the_folder_still_counts(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_steps(elsewhere, 8)
    run = tmp_path / "run"
    run.mkdir()
    save_steps(run, 2)
    os.symlink(elsewhere / "step=00000008.ckpt", run / "step=00000008.ckpt")
    assert resolve_resume(run, "auto") == str(run / "step=00000008.ckpt")


class TrainableTiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.codec = PixelCodec(patch_size=1)
        self.flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(4, 4), deep_width=32)

    def training_step(self, batch, batch_idx):
        return self.flow.nll(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class CountSteps(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, *args):
        self.batches += 1


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run_before_its_first_step(tmp_path):
    """The first save, every_n_train_steps in (hours into a real run), was where the folder was found unwritable."""
    blocking_file = tmp_path / "not_a_folder"
    blocking_file.write_text("a file where the run folder would go")
    steps = CountSteps()
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[RunCheckpoint(dirpath=str(blocking_file / "checkpoints"), every_n_train_steps=2),
                                 steps])
    data = DataLoader(TensorDataset(torch.rand(4, 2, 4, 4, 3)), batch_size=2)
    with pytest.raises(CheckpointFolderError, match=r"cannot write checkpoints into .*not_a_folder/checkpoints "
                                                    r".*trainer\.default_root_dir"):
        trainer.fit(TrainableTiny(), data)
    assert steps.batches == 0


def test_the_folder_check_leaves_nothing_behind_but_the_folder(tmp_path):
    checkpoints = RunCheckpoint()
    trainer = Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False)
    checkpoints.setup(trainer, TrainableTiny(), "fit")
    assert (tmp_path / "checkpoints").is_dir() and list((tmp_path / "checkpoints").iterdir()) == []


def plain_trainer(root, max_steps: int) -> Trainer:
    return Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root,
                   callbacks=[RunCheckpoint(every_n_train_steps=2)])


def test_ckpt_path_last_in_a_trainer_of_ones_own_continues_from_the_newest_run_checkpoint(tmp_path):
    """RunCheckpoint writes no last.ckpt, so Lightning found no 'last', warned and trained from step 0."""
    data = DataLoader(TensorDataset(torch.rand(8, 2, 4, 4, 3)), batch_size=2)
    plain_trainer(tmp_path, 4).fit(TrainableTiny(), data)
    (tmp_path / "checkpoints" / "step=00000002.ckpt").unlink()  # the newest stays; keep_last_k would do this
    resumed = plain_trainer(tmp_path, 6)
    steps = CountSteps()
    resumed.callbacks.append(steps)
    resumed.fit(TrainableTiny(), data, ckpt_path="last")
    assert resumed.ckpt_path == str(tmp_path / "checkpoints" / "step=00000004.ckpt")
    assert steps.batches == 2


def test_ckpt_path_last_passes_over_an_unreadable_newest_checkpoint(tmp_path):
    data = DataLoader(TensorDataset(torch.rand(8, 2, 4, 4, 3)), batch_size=2)
    plain_trainer(tmp_path, 4).fit(TrainableTiny(), data)
    (tmp_path / "checkpoints" / "step=00000004.ckpt").write_bytes(b"cut short by a full disk")
    resumed = plain_trainer(tmp_path, 4)
    with pytest.warns(UserWarning, match="passing over an unreadable checkpoint"):
        resumed.fit(TrainableTiny(), data, ckpt_path="last")
    assert resumed.ckpt_path == str(tmp_path / "checkpoints" / "step=00000002.ckpt")
