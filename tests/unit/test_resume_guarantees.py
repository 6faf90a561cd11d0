"""What a resume relies on: the newest checkpoint is the one of the highest step, the last step is saved
before its epoch closes, the count of skips in a row restarts after a good step, a resumed run with
another schedule length trains its first step at the new schedule's rate, and scores gathered from
several processes come out as one process gives them."""

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import flowvid.lit.module as module_file
import flowvid.score as score_file
from flowvid.lit.checkpointing import RunCheckpoint, list_checkpoints, resolve_checkpoint, resolve_resume
from flowvid.lit.schedule import warmup_cosine
from test_train_resume import NaNLatentsInBatches, batches, make_module, trainer


# --- the newest checkpoint ----------------------------------------------------------------------


def readable_checkpoint(path: Path, step: int, age_s: float) -> None:
    """A checkpoint that ``resolve_resume`` can read, written ``age_s`` seconds ago."""
    torch.save({"global_step": step}, path)
    when = path.stat().st_mtime - age_s
    os.utime(path, (when, when))


@pytest.mark.parametrize("older, newer", [
    ("epoch=0-step=99.ckpt", "epoch=0-step=100.ckpt"),  # Lightning's own names: the step is not padded
    ("step=99999999.ckpt", "step=100000000.ckpt"),  # a step past RunCheckpoint's 8 padded digits
])
def test_the_newest_checkpoint_is_the_one_of_the_highest_step_not_the_last_name(tmp_path, older, newer):
    readable_checkpoint(tmp_path / older, 99, age_s=0)
    readable_checkpoint(tmp_path / newer, 100, age_s=60)  # written earlier: the time cannot pick it
    assert [path.name for path in list_checkpoints(tmp_path)] == [older, newer]
    assert Path(resolve_resume(tmp_path, "auto")).name == newer
    assert resolve_checkpoint(tmp_path).name == newer


# --- the last step's checkpoint -----------------------------------------------------------------


class EpochOfFirstBatch(L.Callback):
    def __init__(self):
        self.epoch = None

    def on_train_batch_start(self, trainer, *args):
        if self.epoch is None:
            self.epoch = trainer.current_epoch


def fit_saving_the_last_step(max_steps: int, run_dir: Path, resume: Path | None = None) -> EpochOfFirstBatch:
    """10 batches an epoch; RunCheckpoint saves no step on its period, only the last one."""
    first_batch = EpochOfFirstBatch()
    run = trainer(max_steps=max_steps, default_root_dir=run_dir, enable_checkpointing=True,
                  callbacks=[first_batch, RunCheckpoint(every_n_train_steps=1000)])
    run.fit(make_module(), batches(10), ckpt_path=resume)
    return first_batch


def test_the_last_step_is_saved_inside_its_epoch_so_a_longer_run_continues_that_epoch(tmp_path):
    """Saved after Lightning closes the epoch, the checkpoint would send a run continued with a larger
    max_steps into the next epoch of data, 7 batches early."""
    fit_saving_the_last_step(3, tmp_path)
    last = tmp_path / "checkpoints" / "step=00000003.ckpt"
    fit_loop = torch.load(last, weights_only=False)["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"]["completed"] == 0
    assert fit_loop["epoch_loop.batch_progress"]["current"]["processed"] == 3

    continued = fit_saving_the_last_step(5, tmp_path, resume=last)
    assert continued.epoch == 0


# --- skips in a row -----------------------------------------------------------------------------


def test_skips_separated_by_good_steps_never_stop_a_healthy_run(tmp_path, monkeypatch):
    """Only skips in a row stop a run: counted over the whole run, an occasional skip would add up to
    the limit and stop a run that trains well."""
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 2)
    module = make_module()
    module.__class__ = NaNLatentsInBatches
    module.poisoned = (2, 4, 6)  # every other batch, counted from 1
    run = trainer(max_steps=4)
    run.fit(module, batches(7))
    assert module.skipped_steps == 3 and run.global_step == 4
    run.save_checkpoint(tmp_path / "end.ckpt")
    assert torch.load(tmp_path / "end.ckpt", weights_only=False)["flowvid"]["consecutive_skips"] == 0


# --- the schedule of a resumed run --------------------------------------------------------------


class RateOfFirstBatch(L.Callback):
    def __init__(self):
        self.rate = None

    def on_train_batch_start(self, trainer, *args):
        if self.rate is None:
            self.rate = trainer.optimizers[0].param_groups[0]["lr"]


def test_a_run_resumed_with_a_longer_schedule_trains_its_first_step_at_the_new_schedules_rate(tmp_path):
    """The checkpoint restores the rate the old schedule set for the step it resumes at (here its floor);
    left as it is, the first resumed step trains at the old schedule's rate."""
    rates = dict(lr=1e-2, min_lr=1e-4, warmup_steps=2, schedule_steps=None)  # the schedule spans max_steps
    first = trainer(max_steps=4, default_root_dir=tmp_path, enable_checkpointing=True,
                    callbacks=[RunCheckpoint(every_n_train_steps=1000)])
    first.fit(make_module(**rates), batches(8))
    resumed_rate = RateOfFirstBatch()
    with pytest.warns(UserWarning, match="schedule changes length from the checkpoint's 4 optimiser steps to 8"):
        trainer(max_steps=8, callbacks=[resumed_rate]).fit(
            make_module(**rates), batches(8), ckpt_path=tmp_path / "checkpoints" / "step=00000004.ckpt")
    assert resumed_rate.rate == pytest.approx(warmup_cosine(4, 2, 8, 1e-2, 1e-4), rel=1e-12)
    assert resumed_rate.rate != pytest.approx(warmup_cosine(4, 2, 4, 1e-2, 1e-4))


# --- scores gathered from several processes -----------------------------------------------------


class TwoProcessGroup:
    """``torch.distributed`` as rank 0 of 2 sees it, the other rank having scored the odd inputs."""

    def __init__(self, other_ranks_records):
        self.other_ranks_records = other_ranks_records

    def is_initialized(self):
        return True

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 2

    def all_gather_object(self, parts, mine):
        parts[0], parts[1] = mine, self.other_ranks_records


def score_record(work, bits_per_dim=None):
    if bits_per_dim is None:
        return [{"path": str(work.path), "error": "unreadable"}]
    return [{"path": str(work.path), "bits_per_dim": bits_per_dim}]


def test_scores_gathered_from_two_processes_are_ordered_as_one_process_orders_them(monkeypatch):
    """``all_gather_object`` gives rank 0's inputs first (0, 2, 4, 1, 3): ties of bits/dim and the error
    records must still come out in the order of the inputs."""
    inputs = [Path(f"video{index}.mp4") for index in range(5)]
    # Inputs 1 and 2 tie, 3 and 4 cannot be read: each pair was scored by both ranks.
    bits = dict(zip(inputs, [2.0, 1.5, 1.5, None, None]))
    monkeypatch.setattr(score_file, "score_work",
                        lambda module, work, *args: score_record(work, bits[work.path]))
    module = SimpleNamespace(text_encoder=None, codec=SimpleNamespace(name="pixel"))
    one_process = score_file.score_listed(module, inputs)

    odd_inputs = {index: score_record(score_file.Work(inputs[index]), bits[inputs[index]]) for index in (1, 3)}
    monkeypatch.setattr(score_file, "dist", TwoProcessGroup(odd_inputs))
    two_processes = score_file.score_listed(module, inputs)
    assert [record["path"] for record in one_process] == [f"video{index}.mp4" for index in range(5)]
    assert two_processes == one_process
