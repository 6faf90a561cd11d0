"""The training curves share the optimiser-step axis with validation, whatever the accumulation."""

import math
from collections import defaultdict

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger

from test_train_resume import batches, make_module, trainer


class RecordedLogger(Logger):
    """Keeps every (step, value) logged, by tag."""

    def __init__(self):
        super().__init__()
        self.points: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "recorded"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for tag, value in metrics.items():
            self.points[tag].append((step, float(value)))

    def steps(self, tag: str) -> list[int]:
        return [step for step, _ in self.points[tag]]


class BatchLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, *args):
        self.losses.append(trainer.callback_metrics["train/loss"].item())


def fit_logged(accumulate: int, steps: int, **settings) -> tuple[RecordedLogger, BatchLosses]:
    logger, losses = RecordedLogger(), BatchLosses()
    run = trainer(max_steps=steps, logger=logger, callbacks=[losses, *settings.pop("callbacks", [])], **settings)
    run.fit(make_module(accumulate_grad_batches=accumulate), batches(steps * accumulate),
            val_dataloaders=batches(1))
    return logger, losses


def test_with_accumulation_the_train_curves_are_on_the_optimiser_steps_of_the_val_curves():
    logger, losses = fit_logged(2, 6, log_every_n_steps=1, limit_val_batches=1, val_check_interval=6)
    assert logger.steps("val/bits_per_dim") == [3, 6]  # after the 6th and 12th batch
    for tag in ("train/loss", "train/bits_per_dim", "train/flow_lr", "train/flow_grad_norm", "sigma/deep_mean"):
        assert logger.steps(tag) == [0, 1, 2, 3, 4, 5], tag  # one point per step, as without accumulation
    # Each point is the mean of its window's batches, not the last batch's value.
    window_means = [(a + b) / 2 for a, b in zip(losses.losses[::2], losses.losses[1::2])]
    assert [value for _, value in logger.points["train/loss"]] == pytest.approx(window_means)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_log_every_n_steps_counts_optimiser_steps_where_it_counted_batches_without_accumulation(accumulate):
    logger, _ = fit_logged(accumulate, 6, log_every_n_steps=2, limit_val_batches=0)
    assert logger.steps("train/loss") == [1, 3, 5]
    assert logger.steps("train/flow_lr") == [1, 3, 5]


def test_a_skipped_window_logs_nan_at_the_step_it_failed_to_take():
    module = make_module(accumulate_grad_batches=2)
    encode = module.latents_of

    def nan_in_batch_2(batch, key=""):
        latents = encode(batch, key)
        third = module.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 3
        return latents * float("nan") if third else latents

    module.latents_of = nan_in_batch_2
    logger = RecordedLogger()
    trainer(max_steps=2, log_every_n_steps=1, logger=logger).fit(module, batches(6))
    losses = logger.points["train/loss"]
    assert [step for step, _ in losses] == [0, 1, 1]  # the window of batches 2-3 failed to take step 1
    assert math.isfinite(losses[0][1]) and math.isnan(losses[1][1]) and math.isfinite(losses[2][1])
    assert logger.points["train/skipped_steps"] == [(0, 0.0), (1, 1.0), (1, 1.0)]


def test_the_skip_warning_gives_the_gradient_norm_and_the_threshold(caplog):
    module = make_module(skip_threshold=1e-6)
    with caplog.at_level("WARNING", logger="flowvid.train"):
        trainer(max_steps=1, max_epochs=1).fit(module, batches(1))
    (skip,) = [record.getMessage() for record in caplog.records if "skipped an optimiser step" in record.getMessage()]
    norm = float(skip.split("gradient norm ")[1].split()[0])
    assert math.isfinite(norm) and norm > 1e-6, skip
    assert "above skip_threshold 1e-06 in batch 0 of epoch 0" in skip, skip


@pytest.mark.parametrize("accumulate", [1, 2])
def test_throughput_and_the_counts_seen_are_logged_beside_the_losses_of_their_step(accumulate):
    from flowvid.lit.throughput import TrainingThroughput

    logger, _ = fit_logged(accumulate, 4, log_every_n_steps=1, limit_val_batches=0,
                           callbacks=[TrainingThroughput(window=2, peak_flops=1e12)])
    assert logger.steps("train/tokens_seen") == logger.steps("train/loss") == [0, 1, 2, 3]
    assert logger.steps("throughput/tokens_per_sec") == [1, 2, 3]  # a rate needs two steps' ends
    tokens = [value for _, value in logger.points["train/tokens_seen"]]
    assert tokens == [tokens[0] * (step + 1) for step in range(4)]  # one point per step, at its end


def test_tensorboard_compares_runs_by_validation_bits_per_dim_not_a_placeholder(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from flowvid.lit.tensorboard import without_placeholder_metric

    logger = TensorBoardLogger(tmp_path)  # as Lightning builds its default one
    run = trainer(max_steps=2, logger=logger, limit_val_batches=1, val_check_interval=2)
    without_placeholder_metric(run)
    run.fit(make_module(), batches(2), val_dataloaders=batches(1))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]
    assert [event.step for event in events.Scalars("val/bits_per_dim")] == [2]  # one point, with the settings
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert [info.name.tag for info in experiment.metric_infos] == ["val/bits_per_dim"]
    assert {hparam.name for hparam in experiment.hparam_infos} >= {"noise_std", "lr"}
