"""Loading and `flowvid fit` messages: the weights a loader is asked for, what a model was made with, and the
one-line errors and quiet output of the command line."""

import copy
import importlib.util
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from flowvid.cli import main
from flowvid.export import build_module, export_checkpoint, load_exported
from flowvid.lit.cli_support import main as lightning_main, one_line_error, quiet_benign_messages
from flowvid.loading import load_model
from flowvid.registry import class_path_for

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"

CONFIG = {
    "model": {
        "class_path": "flowvid.lit.FlowModule",
        "init_args": {
            "flow": {"class_path": "flowvid.flows.GlobalLocalFlow",
                     "init_args": {"latent_channels": 12, "frame_size": [4, 4], "num_shallow": 1, "shallow_width": 32,
                                   "shallow_depth": 1, "deep_width": 32, "deep_depth": 1, "head_dim": 16}},
            "codec": {"class_path": "flowvid.codecs.PixelCodec", "init_args": {"patch_size": 2}},
            "video_shape": [4, 8, 8],
        },
    }
}
#: What a run that used a plugin's block records (``run_metadata``).
MADE_WITH = {"flowvid_version": "0.1.0", "plugins": {"my-blocks": "0.1.0"}}


def save_checkpoint(path, config, state_dict, **metadata):
    torch.save({"state_dict": state_dict, "flowvid_run": {"config": config, **metadata}}, path)
    return path


@pytest.fixture(scope="module")
def trained_weights():
    torch.manual_seed(0)
    return build_module(CONFIG).state_dict()


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory, trained_weights):
    """A run that kept a moving average unlike its trained weights."""
    ema = {name: tensor + 1.0 if tensor.is_floating_point() else tensor for name, tensor in trained_weights.items()}
    path = tmp_path_factory.mktemp("ema") / "ema.ckpt"
    torch.save({"state_dict": trained_weights, "flowvid": {"ema": ema}, "flowvid_run": {"config": CONFIG}}, path)
    return path


def with_plugin_block(config):
    """``config`` with a deep block that only a plugin package (not installed here) registers."""
    config = copy.deepcopy(config)
    config["model"]["init_args"]["flow"]["init_args"]["deep_block"] = "wide-mlp"
    return config


# --- load_model(weights=...) ----------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["EMA", "Trained", "ema ", "raw"])
def test_load_model_refuses_weights_other_than_ema_or_trained(ema_checkpoint, weights):
    with pytest.raises(ValueError, match=rf"^weights must be one of ema, trained, got {weights!r}$"):
        load_model(ema_checkpoint, weights=weights)


def test_load_model_refuses_an_unknown_weights_value_for_an_export_too(ema_checkpoint, tmp_path):
    exported = export_checkpoint(ema_checkpoint, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"^weights must be one of ema, trained, got 'ema2'$"):
        load_model(exported, weights="ema2")


def test_load_model_still_takes_ema_and_trained(ema_checkpoint):
    assert load_model(ema_checkpoint, weights="ema").weights_used == "ema"
    assert load_model(ema_checkpoint, weights="trained").weights_used == "trained"


# --- what a model was made with ---------------------------------------------------------------------


def test_a_checkpoint_of_a_plugin_block_not_installed_names_the_plugin_packages(tmp_path, trained_weights, capsys):
    ckpt = save_checkpoint(tmp_path / "wide.ckpt", with_plugin_block(CONFIG), trained_weights, **MADE_WITH)
    assert main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert "unknown block 'wide-mlp'" in err
    assert "It was trained with flowvid 0.1.0 and the plugin packages my-blocks 0.1.0" in err
    assert not (tmp_path / "samples").exists()


def test_a_checkpoint_and_its_export_say_the_same_of_the_plugins_they_were_made_with(tmp_path, trained_weights):
    good = save_checkpoint(tmp_path / "good.ckpt", CONFIG, trained_weights, **MADE_WITH)
    exported = export_checkpoint(good, tmp_path / "exported" / "model.safetensors")
    wide_config = tmp_path / "wide.yaml"
    wide_config.write_text(yaml.safe_dump(with_plugin_block(CONFIG)))
    with pytest.raises(ValueError) as from_export:
        load_exported(exported, config=wide_config)
    wide = save_checkpoint(tmp_path / "wide.ckpt", with_plugin_block(CONFIG), trained_weights, **MADE_WITH)
    with pytest.raises(ValueError) as from_checkpoint:
        load_model(wide)
    export_says, checkpoint_says = (str(err.value).splitlines()[-1] for err in (from_export, from_checkpoint))
    assert export_says == checkpoint_says.replace("trained", "exported")
    assert checkpoint_says.endswith("the plugin packages my-blocks 0.1.0")


def test_a_checkpoint_that_records_no_version_adds_no_made_with_sentence(tmp_path, trained_weights):
    wide = save_checkpoint(tmp_path / "wide.ckpt", with_plugin_block(CONFIG), trained_weights)
    with pytest.raises(ValueError, match="unknown block 'wide-mlp'") as err:
        load_model(wide)
    assert "It was" not in str(err.value)


# --- one-line errors of `flowvid fit` ---------------------------------------------------------------


def fit_error(*args: str, capsys) -> str:
    """The error `flowvid fit ARGS` prints, which must stop it with status 2 while parsing."""
    with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit) as stopped:
        lightning_main(["fit", *args])
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_short_name_as_class_path_names_the_class_it_registers_and_what_to_write(capsys):
    err = fit_error("--config", str(RECIPE), "--model.init_args.codec.class_path=pixel", capsys=capsys)
    assert err.count("\n") == 1 and err.startswith("flowvid fit: error: model.init_args.codec: ")
    assert "'pixel' is the short name of the codec flowvid.codecs.PixelCodec" in err
    assert "write class_path: flowvid.codecs.PixelCodec" in err
    assert "Expected a dot import path string" not in err


def test_a_short_name_of_a_text_encoder_as_class_path_names_its_class():
    assert class_path_for("learned").endswith("write class_path: flowvid.text.LearnedTextEncoder")
    assert "the text encoder flowvid.text.LearnedTextEncoder" in class_path_for("learned")


def test_a_class_path_that_is_no_registered_name_keeps_the_parsers_report(capsys):
    err = fit_error("--config", str(RECIPE), "--model.init_args.codec.class_path=PixelCodecc", capsys=capsys)
    assert "Expected a dot import path string: PixelCodecc" in err and "short name" not in err
    assert class_path_for("PixelCodecc") is None


def test_an_option_into_a_listed_callback_is_shown_as_given_and_says_how_to_change_one(capsys):
    err = fit_error("--config", str(RECIPE), "--trainer.callbacks.0.init_args.every_n_train_steps=3", capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith("flowvid fit: error: unrecognized arguments: "
                          "--trainer.callbacks.0.init_args.every_n_train_steps=3")
    assert "overlay" in err and "--trainer.callbacks+=" in err and "adds an item, it does not edit one" in err


def test_an_unrecognized_top_level_option_is_still_shown_with_the_likely_one():
    assert one_line_error("unrecognized arguments: --trainer.max_stepz=1", {}, ["trainer.max_steps"]) == (
        "unrecognized arguments: --trainer.max_stepz=1 (did you mean 'trainer.max_steps'?)")


# --- quiet output -----------------------------------------------------------------------------------


def test_torchs_deprecation_of_the_collectives_zero_calls_is_left_out_and_other_warnings_are_not(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_benign_messages()
            dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
            dist.reduce_scatter_tensor(torch.zeros(1), torch.ones(1))
            warnings.warn("`torch.distributed.something_else` is deprecated", FutureWarning)
    finally:
        dist.destroy_process_group()
    assert [str(warning.message) for warning in caught] == ["`torch.distributed.something_else` is deprecated"]


def lightning_saves_zero3_shards(self, checkpoint, filepath, storage_options=None):
    """What DeepSpeedStrategy.save_checkpoint says and writes, without an engine."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    rank_zero_warn("When saving the DeepSpeed Stage 3 checkpoint, each worker will save a shard of the checkpoint "
                   "within a directory. If a single file is required after training, see https://lightning.ai")
    Path(filepath).mkdir()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_zero3_run_says_once_that_flowvid_export_consolidates_its_checkpoints(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from flowvid.lit import strategies

    said = []
    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", lightning_saves_zero3_shards)
    monkeypatch.setattr(strategies, "rank_zero_info", said.append)
    strategy = strategies.ZeroStrategy(stage=3, parallel_devices=[torch.device("cpu")] * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (2, 4):
            strategy.save_checkpoint({}, tmp_path / f"step={step:08d}.ckpt")
    assert not [warning for warning in caught if "single file" in str(warning.message)]
    assert len(said) == 1 and "`flowvid export --ckpt DIR` consolidates it into one file" in said[0]
