"""What ``flowvid fit`` shows: the run's step out of max_steps instead of Lightning's ``Epoch 3/-2``, and
none of Lightning's messages that ask nothing of the user."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from flowvid.lit.cli_support import FlowvidCLI, quiet_benign_messages
from flowvid.lit.progress import StepProgressBar

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


@pytest.fixture(autouse=True)
def no_pytest_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["flowvid"])  # the CLI reads args= only; pytest's would be ignored


def built_cli(*args: str) -> FlowvidCLI:
    return FlowvidCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=["--config", str(RECIPE), *args], run=False)


def bar_of(cli: FlowvidCLI):
    bar = cli.trainer.progress_bar_callback
    bar._trainer = cli.trainer  # what Lightning's setup hook does when fitting starts
    return bar


def test_a_step_bounded_run_shows_its_step_and_no_epoch_total():
    cli = built_cli("--trainer.max_steps", "640")
    bar = bar_of(cli)
    assert isinstance(bar, StepProgressBar)
    assert bar._get_train_description(3).strip() == "Epoch 3"
    metrics = bar.get_metrics(cli.trainer, cli.model)
    assert metrics["step"] == "0/640" and "v_num" not in metrics


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_batch_total_counts_the_batches_of_the_steps_left(accumulate):
    cli = built_cli("--trainer.max_steps", "6", "--model.init_args.accumulate_grad_batches", str(accumulate))
    bar = bar_of(cli)
    cli.trainer.strategy.connect(cli.model)  # what fitting does before the bar asks
    cli.trainer.fit_loop.max_batches = 100  # batches in an epoch
    assert bar.total_train_batches == 6 * accumulate


@pytest.mark.parametrize("accumulate", [1, 2])
def test_after_a_resume_the_bar_counts_and_totals_the_same_batches(accumulate):
    """Resumed at step 4 of 7: the bar's count (batch_idx + 1) goes on from the batches of those 4 steps, and
    its total counts from the epoch's start too (it read 3 steps' batches: ``7/3``), whenever it is read."""
    cli = built_cli("--trainer.max_steps", "7", "--model.init_args.accumulate_grad_batches", str(accumulate))
    bar = bar_of(cli)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.fit_loop.max_batches = 100
    batches = cli.trainer.fit_loop.epoch_loop.batch_progress
    steps = cli.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
    steps.completed = 4
    batches.total.ready = batches.current.ready = 4 * accumulate  # what the checkpoint restores
    assert bar.total_train_batches == 7 * accumulate
    for batch in range(4 * accumulate, 7 * accumulate):  # the rest of the run, a batch at a time
        batches.total.ready += 1
        batches.current.ready += 1
        steps.completed += (batch + 1) % accumulate == 0
        assert bar.total_train_batches == 7 * accumulate
    assert batches.current.ready == bar.total_train_batches


def test_an_epoch_bounded_run_keeps_lightnings_description():
    cli = built_cli("--trainer.max_steps", "-1", "--trainer.max_epochs", "4")
    bar = bar_of(cli)
    assert bar._get_train_description(1).strip() == "Epoch 1/3"
    assert "step" not in bar.get_metrics(cli.trainer, cli.model)


@pytest.mark.parametrize("callbacks", [
    ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"],  # added to the recipe's list
    ["--trainer.callbacks=lightning.pytorch.callbacks.TQDMProgressBar"],  # the only callback, not in a list
])
def test_a_progress_bar_the_recipe_chose_is_kept(callbacks):
    cli = built_cli(*callbacks)
    bars = [callback for callback in cli.trainer.callbacks if isinstance(callback, (TQDMProgressBar, StepProgressBar))]
    assert [type(bar) for bar in bars] == [TQDMProgressBar]


def test_lightnings_messages_that_ask_nothing_of_the_user_are_left_out(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_benign_messages()
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
        warnings.warn("a warning that matters")
    assert [str(warning.message) for warning in caught] == ["a warning that matters"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
