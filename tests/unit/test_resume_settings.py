"""What a resumed run says of the settings it changes: another noise_std is refused, the other settings that
change what it trains (the trainer's precision included) are warned of with both values, once; an architecture
mismatch names the settings first; a ZeRO recipe is quiet where nothing steps."""

import warnings
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.data import VideoShardDataModule, write_synthetic_dataset
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.checkpointing import METADATA_KEY, CheckpointMismatchError, check_resumable, parameter_shapes
from flowvid.lit.resumed_settings import check_resumed_settings

VIDEO = (3, 4, 6)  # frames, height, width -> PixelCodec(2): latents (3, 2, 3, 12)
SETTINGS = {"warmup_steps": 1, "schedule_steps": 100, "noise_std": 0.1, "text_dropout": 0.1}


def make_module(flow_width: int | None = None, **overrides) -> FlowModule:
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3),
                                       **({"deep_width": flow_width} if flow_width else {}))
    return FlowModule(flow, PixelCodec(patch_size=2), video_shape=VIDEO, **{**SETTINGS, **overrides})


def batches(count: int = 4) -> DataLoader:
    videos = torch.randint(0, 256, (count, 2, *VIDEO, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return DataLoader([{"video": video} for video in videos], batch_size=None)


def trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**settings, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One optimiser step of a bf16-mixed run, without a moving average."""
    run = trainer(max_steps=1, precision="bf16-mixed")
    run.fit(make_module(), batches())
    path = tmp_path_factory.mktemp("run") / "step1.ckpt"
    run.save_checkpoint(path)
    return path


def resume_messages(checkpoint, precision="bf16-mixed", **overrides) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, precision=precision).fit(make_module(**overrides), batches(), ckpt_path=checkpoint)
    return [str(warning.message) for warning in caught if str(warning.message).startswith(("resuming", "the checkp"))]


def test_a_resume_with_another_noise_std_is_refused_naming_both_values_and_the_way_to_train_at_it(checkpoint):
    with pytest.raises(ValueError) as refused:
        trainer(max_steps=2, precision="bf16-mixed").fit(make_module(noise_std=0.2), batches(), ckpt_path=checkpoint)
    message = str(refused.value)
    assert message.startswith("resuming with noise_std=0.2 where the run had 0.1: noise_std is the sigma")
    assert "--model.init_args.noise_std 0.1" in message and "InitFromExport" in message
    # Validating the checkpoint at another sigma continues no run: it measures the weights there.
    module = make_module(noise_std=0.2)
    module.validation_step = lambda batch, batch_idx: None
    trainer(limit_val_batches=1).validate(module, batches(1), ckpt_path=checkpoint)


def test_each_changed_setting_and_the_precision_are_warned_of_once_with_both_values(checkpoint):
    assert resume_messages(checkpoint) == []
    messages = resume_messages(checkpoint, precision="32-true", text_dropout=0.5, latent_norm_penalty=0.01)
    assert sorted(message.split(":")[0] for message in messages) == [
        "resuming with latent_norm_penalty=0.01 where the run had 0.0",
        "resuming with precision='32-true' where the run had 'bf16-mixed'",
        "resuming with text_dropout=0.5 where the run had 0.1",
    ]


def test_a_moving_average_set_on_resume_says_it_starts_from_the_resumed_weights(checkpoint):
    messages = resume_messages(checkpoint, ema_decay=0.5)
    assert len(messages) == 1
    assert messages[0].startswith("the checkpoint holds no moving average of the weights (its run had ema_decay "
                                  "null): this model's average (ema_decay=0.5) starts from the resumed weights")


def test_settings_an_older_checkpoint_lacks_are_not_compared():
    check_resumed_settings({"noise_std": 0.1}, {"noise_std": 0.1, "precision": "32-true", "text_dropout": 0.3})
    check_resumed_settings({"video_shape": [3, 4, 6]}, {"video_shape": (3, 4, 6)})  # YAML's list, Python's tuple


def test_an_architecture_mismatch_names_the_settings_first_and_a_few_parameters_with_a_count():
    saved, module = make_module(flow_width=64), make_module(flow_width=32)
    changed = {f"setting_{i}": i for i in range(8)}
    checkpoint = {"hyper_parameters": {**module.hparams, **changed, "flow": {"init_args": {"deep_width": 64}}},
                  METADATA_KEY: {"parameters": parameter_shapes(saved)}}
    with pytest.raises(CheckpointMismatchError) as refused:
        check_resumable(checkpoint, module, "checkpoint c")
    message = str(refused.value)
    assert message.startswith("checkpoint c was made by a different model configuration, whose settings differ in "
                              "flow.init_args.deep_width (64 there, absent here), setting_0 (0 there, absent here)")
    assert "setting_4 (4 there, absent here) (+3 more); the parameters differ, different shapes: " in message
    shapes = message.split("different shapes: ")[1]
    assert shapes.count(" in the checkpoint vs ") == 3 and shapes.endswith("more)")


def deepspeed_setup_warnings(stage: str) -> list[str]:
    module = make_module(skip_threshold=100.0)
    strategy = mock.MagicMock(spec=DeepSpeedStrategy, root_device=torch.device("cpu"))
    module._trainer = SimpleNamespace(precision="32-true", strategy=strategy, world_size=1, datamodule=None,
                                      callbacks=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup(stage)
    return [str(warning.message) for warning in caught if "skip_threshold" in str(warning.message)]


def test_skip_threshold_under_deepspeed_is_warned_of_when_fitting_only():
    assert len(deepspeed_setup_warnings("fit")) == 1
    assert deepspeed_setup_warnings("validate") == []


def test_a_data_order_change_on_resume_is_said_by_rank_zero_alone(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8, seed=0)
    data = VideoShardDataModule(str(tmp_path / "train"), batch_size=2)
    data.setup("fit")
    state = {**data.state_dict(), "batch_size": 4}
    for rank, expected in ((1, 0), (0, 1)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        data._loaded_state = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.load_state_dict(state)
        said = [w for w in caught if "the data order will differ" in str(w.message)]
        assert len(said) == expected, rank
