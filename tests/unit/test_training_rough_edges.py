"""What ``flowvid fit`` says when a run diverges, resumes at its end, or is stopped by a signal."""

import logging
import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

import flowvid.lit.module as module_file
from flowvid.lit import cli_support
from flowvid.lit.checkpointing import DIVERGED_RECORD, RunCheckpoint, resolve_resume
from flowvid.lit.cli_support import FitSummary
from flowvid.lit.module import TrainingDiverged
from test_train_resume import batches, make_module


def run_trainer(root, max_steps: int, *callbacks: L.Callback, every_n_train_steps: int = 100) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=max_steps,
                     default_root_dir=root,
                     callbacks=[RunCheckpoint(every_n_train_steps=every_n_train_steps, keep_last_k=-1), *callbacks])


def diverging_module():
    module = make_module()
    module.latents_of = lambda batch, key="": torch.full((2, 3, 2, 3, 12), float("nan"))
    return module


def test_skips_in_a_row_name_the_batch_and_the_count_in_a_row_and_stop_with_the_summary(
        tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 3)
    with caplog.at_level(logging.WARNING, logger="flowvid.train"), pytest.raises(TrainingDiverged) as stopped:
        run_trainer(tmp_path, 10, FitSummary()).fit(diverging_module(), batches(5))
    skips = [record.getMessage() for record in caplog.records if "skipped an optimiser step" in record.getMessage()]
    assert len(set(skips)) == 3, skips  # the optimiser step stays at 0: each line names another batch
    assert "batch 0 of epoch 0; 1 in a row (the run stops at 3)" in skips[0]
    assert "batch 2 of epoch 0; 3 in a row" in skips[2]
    assert "lower the learning rate" in str(stopped.value) and "--resume auto" not in str(stopped.value)
    assert str(stopped.value).endswith("then run it again: it saved no checkpoint, so it starts from scratch")
    assert capsys.readouterr().out == "stopped at step 0; wrote no checkpoint\n"


def resume_auto(root) -> str | None:
    return resolve_resume(root / "checkpoints", "auto")


def test_a_diverged_run_restarted_with_resume_auto_stops_at_its_first_skip(tmp_path, monkeypatch):
    """The stop saves no checkpoint: the count in a row it reached is recorded beside the checkpoints."""
    run_trainer(tmp_path, 1).fit(make_module(), batches(5))
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step=00000001.ckpt\) with --resume auto"):
        run_trainer(tmp_path, 10).fit(diverging_module(), batches(5), ckpt_path=resume_auto(tmp_path))
    restarted = diverging_module()
    with pytest.raises(TrainingDiverged, match="stopped at step 1: 4 optimiser steps in a row"):
        run_trainer(tmp_path, 10).fit(restarted, batches(5), ckpt_path=resume_auto(tmp_path))
    assert restarted.skipped_steps == 1  # the checkpoint's 0, and the one skip of this restart


def test_a_diverged_run_without_a_checkpoint_restarted_stops_at_its_first_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(TrainingDiverged):
        run_trainer(tmp_path, 10).fit(diverging_module(), batches(5))
    restarted = diverging_module()
    with pytest.raises(TrainingDiverged, match="stopped at step 0: 4 optimiser steps in a row"):
        run_trainer(tmp_path, 10).fit(restarted, batches(5), ckpt_path=resume_auto(tmp_path))
    assert restarted.skipped_steps == 1


def test_a_restart_that_steps_or_resumes_at_another_step_counts_from_0(tmp_path, monkeypatch):
    run_trainer(tmp_path, 2, every_n_train_steps=1).fit(make_module(), batches(5))
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(TrainingDiverged, match="stopped at step 2"):
        run_trainer(tmp_path, 10).fit(diverging_module(), batches(5), ckpt_path=resume_auto(tmp_path))
    earlier = diverging_module()
    with pytest.raises(TrainingDiverged, match="3 optimiser steps in a row"):
        run_trainer(tmp_path, 10).fit(earlier, batches(5), ckpt_path=tmp_path / "checkpoints" / "step=00000001.ckpt")
    assert earlier.skipped_steps == 3  # resumed at step 1, not at the stop's step 2

    record = tmp_path / "checkpoints" / DIVERGED_RECORD
    assert record.exists()  # the stop at step 1
    healthy = make_module()
    run_trainer(tmp_path, 3).fit(healthy, batches(5), ckpt_path=tmp_path / "checkpoints" / "step=00000001.ckpt")
    assert healthy.global_step == 3 and healthy._consecutive_skips == 0
    assert not record.exists()  # its steps succeeded: a later restart at step 1 counts from 0


def test_a_diverged_run_resumed_names_the_checkpoint_it_resumed_from(tmp_path, monkeypatch, capsys):
    run_trainer(tmp_path, 1).fit(make_module(), batches(5))
    checkpoint = tmp_path / "checkpoints" / "step=00000001.ckpt"
    monkeypatch.setattr(module_file, "MAX_CONSECUTIVE_SKIPS", 2)
    with pytest.raises(TrainingDiverged):
        run_trainer(tmp_path, 10, FitSummary()).fit(diverging_module(), batches(5), ckpt_path=checkpoint)
    assert capsys.readouterr().out == f"stopped at step 1; saved no checkpoint; newest {checkpoint}\n"


def test_flowvid_fit_reports_a_diverged_run_in_one_line_with_status_1(monkeypatch, capsys):
    def diverged_run(*args, **kwargs):
        raise TrainingDiverged("stopped at step 0: 50 optimiser steps in a row were skipped")

    monkeypatch.setattr(cli_support, "FlowvidCLI", diverged_run)
    monkeypatch.delenv("FLOWVID_TRACEBACK", raising=False)
    assert cli_support.main(["fit"]) == 1
    assert capsys.readouterr().err == "flowvid fit: error: stopped at step 0: 50 optimiser steps in a row were skipped\n"


def test_resuming_a_run_at_its_end_says_there_is_nothing_to_train_and_names_its_checkpoint(tmp_path, capsys):
    run_trainer(tmp_path, 2).fit(make_module(), batches(5))
    checkpoint = tmp_path / "checkpoints" / "step=00000002.ckpt"
    capsys.readouterr()
    run_trainer(tmp_path, 2, FitSummary()).fit(make_module(), batches(5), ckpt_path=checkpoint)
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path} is already at step 2 (max_steps 2): nothing to train; "
                          f"newest checkpoint {checkpoint}\nnext:\n  flowvid export --ckpt {checkpoint} "), out
    assert "wrote no checkpoint" not in out


class TermAtBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(("command", "resumes_auto", "first_command"), [
    (["fit", "--config", "my recipe.yaml"], False, "flowvid fit --config 'my recipe.yaml' --resume auto"),
    (["fit", "--resume", "auto"], True, "the same command (it has resume: auto) continues the run"),
])
def test_a_stopped_run_names_the_command_that_continues_it_first(tmp_path, capsys, command, resumes_auto,
                                                                  first_command):
    summary = FitSummary(command, resumes_auto=resumes_auto)
    with pytest.raises(SIGTERMException):
        run_trainer(tmp_path, 4, TermAtBatch(), summary).fit(make_module(), batches(5))
    out = capsys.readouterr().out
    assert f"\nnext:\n  {first_command}\n  flowvid export --ckpt " in out, out
