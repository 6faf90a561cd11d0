"""The demo recipe parses with the CLI's own parser, builds the demo model, and its checkpoints reload."""

import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from flowvid.data import VideoShardDataModule, write_synthetic_dataset
from flowvid.flows import PRESETS
from flowvid.lit import FlowModule
from flowvid.lit.cli_support import main as cli_main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


def parse(*args: str) -> LightningCLI:
    """What ``flowvid fit --config ...`` builds (``flowvid.cli.run_lightning``), without running it."""
    with mock.patch.object(sys, "argv", ["flowvid"]):  # pytest's own arguments are not the CLI's
        return LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            save_config_kwargs={"overwrite": True}, run=False, args=list(args))


def test_the_demo_recipe_builds_the_demo_model_on_the_shapes_shards():
    cli = parse("--config", str(RECIPE))
    module, data = cli.model, cli.datamodule
    assert isinstance(module, FlowModule) and isinstance(data, VideoShardDataModule)
    flow = module.flow
    demo = PRESETS["demo"]
    assert len(flow.shallow) == demo["num_shallow"] and flow.text_width == demo["text_width"]
    assert flow.deep.spec.width == demo["deep_width"] and flow.deep.spec.depth == demo["deep_depth"]
    assert flow.shallow[0].spec.width == demo["shallow_width"] and flow.shallow[0].spec.depth == demo["shallow_depth"]
    assert module.latent_shape == (8, 8, 8, 12)
    assert module.denoiser is not None and module.denoiser.noise_std == module.noise_std
    assert (data.train_dir, data.val_dir) == ("data/shapes/train", "data/shapes/val")
    assert cli.trainer.max_steps > 0


def every_key(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from every_key(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            if isinstance(value, dict):
                yield from every_key(value, (*path, index))
    if path:
        yield path


def test_every_key_of_the_recipe_is_checked(tmp_path):
    """A misspelt copy of any key is refused, so no key of the recipe is silently ignored."""
    recipe = yaml.safe_load(RECIPE.read_text())
    leaves = [path for path in every_key(recipe) if isinstance(path[-1], str) and path[-1] not in ("class_path",)]
    assert len(leaves) > 40
    for path in leaves:
        broken = yaml.safe_load(RECIPE.read_text())
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1] + "_typo"] = parent.pop(path[-1])
        config = tmp_path / "broken.yaml"
        config.write_text(yaml.safe_dump(broken))
        with pytest.raises(SystemExit):
            parse("--config", str(config))


def test_a_checkpoint_of_a_recipe_run_rebuilds_the_model(tmp_path):
    write_synthetic_dataset(tmp_path / "shapes", num_videos=8, frames=8, size=16, val_videos=2, shard_samples=8)
    cli = parse(
        "--config", str(RECIPE),
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
        "--data.init_args.train_dir", str(tmp_path / "shapes" / "train"),
        "--data.init_args.val_dir", str(tmp_path / "shapes" / "val"),
        "--data.init_args.batch_size", "2",
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))

    restored = FlowModule.load_from_checkpoint(checkpoint)  # no arguments: the saved config rebuilds it

    assert restored.hparams.noise_std == cli.model.noise_std
    for (name, trained), (_, loaded) in zip(cli.model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(trained, loaded), name


def logged_scalars(version: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A recipe's folder after ``flowvid fit`` of 4 steps, validating and checkpointing every 2."""
    from scale_runs import recipe

    root = tmp_path_factory.mktemp("small_run")
    write_synthetic_dataset(root / "shapes", num_videos=8, frames=4, size=8, val_videos=4, shard_samples=8)
    config = recipe(root / "shapes", root / "run", denoiser=False, max_steps=4)
    config["trainer"].update(logger=True, callbacks=config["trainer"]["callbacks"][:2])
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("fit", root) == 0
    return root


def run_cli(command: str, root: Path, *args: str) -> int:
    with mock.patch.object(sys, "argv", ["flowvid"]):
        return cli_main([command, "--config", str(root / "recipe.yaml"), *args])


def test_validating_a_checkpoint_logs_beside_the_validation_its_run_logged_after_it(small_run):
    """Not at step 0 of the run's TensorBoard curves, where it would read as the untrained model's."""
    assert run_cli("validate", small_run, "--ckpt_path", str(small_run / "run" / "checkpoints" / "step=00000002.ckpt")) == 0
    logs = sorted((small_run / "run" / "lightning_logs").iterdir())
    during_training = logged_scalars(logs[0], "val/bits_per_dim")
    validated = logged_scalars(logs[-1], "val/bits_per_dim")
    assert len(during_training) == 2 and validated == [pytest.approx(during_training[0], rel=1e-6)]
    assert validated[0][0] == 2  # the checkpoint's step, as during training


def test_evaluations_are_logged_at_the_step_of_the_checkpoint_of_the_same_weights(tmp_path):
    """Validation, FVD and sample videos after optimizer step 2 land at TensorBoard step 2, beside
    ``step=00000002.ckpt`` and the console's "at step 2", not at Lightning's batch count (1 at that point)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scale_runs import recipe

    write_synthetic_dataset(tmp_path / "shapes", num_videos=8, frames=4, size=8, val_videos=4, shard_samples=8)
    evaluations = [
        {"class_path": "flowvid.lit.callbacks.SampleVideoLogger",
         "init_args": {"every_n_steps": 2, "captions": ["a red circle moves left"]}},
        {"class_path": "flowvid.lit.callbacks.FVDCallback",
         "init_args": {"every_n_steps": 2, "num_samples": 4, "extractor": "pixel-stats", "batch_size": 4}},
    ]
    config = recipe(tmp_path / "shapes", tmp_path / "run", denoiser=False, max_steps=4)
    config["trainer"].update(logger=True, callbacks=config["trainer"]["callbacks"][:2] + evaluations)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("fit", tmp_path) == 0

    checkpoints = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    checkpoint_steps = sorted(int(path.stem.removeprefix("step=")) for path in checkpoints)
    assert checkpoint_steps == [2, 4]
    (version,) = (tmp_path / "run" / "lightning_logs").iterdir()
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag in ("val/bits_per_dim", "val/bits_per_dim/frame_00", "fvd_debug/pixel-stats_f4_r8_n4"):
        assert [event.step for event in events.Scalars(tag)] == checkpoint_steps, tag
    for tag in ("samples/video", "samples/frames"):
        assert [event.step for event in events.Images(tag)] == checkpoint_steps, tag


def newest_version(logs: Path) -> Path:
    return max(logs.iterdir(), key=lambda version: int(version.name.removeprefix("version_")))


def bits_per_dim_after_training(root: Path) -> float:
    """What the run logged for the validation after its last step (4), with its last checkpoint."""
    return logged_scalars(min((root / "run" / "lightning_logs").iterdir()), "val/bits_per_dim")[-1][1]


def test_validating_the_last_checkpoint_validates_the_newest_of_the_run(small_run):
    """``last`` names the newest of the run's checkpoints, as in ``fit``, not a ``last.ckpt`` that the run never
    writes (the model as initialised would be validated instead)."""
    assert run_cli("validate", small_run, "--ckpt_path", "last") == 0
    validated = logged_scalars(newest_version(small_run / "run" / "lightning_logs"), "val/bits_per_dim")
    assert [value for _, value in validated] == [pytest.approx(bits_per_dim_after_training(small_run), rel=1e-6)]


def test_validating_an_export_gives_the_bits_per_dim_of_its_checkpoint(small_run, tmp_path):
    from flowvid.export import export_checkpoint

    export = export_checkpoint(small_run / "run" / "checkpoints" / "step=00000004.ckpt",
                               tmp_path / "export" / "model.safetensors")
    given = [(option, named) for option in ("--ckpt_path", "--resume") for named in (export, export.parent)]
    for option, named in given:  # the file, or the folder of the export
        logs = tmp_path / f"validated_{option.strip('-')}_{named.name}"
        assert run_cli("validate", small_run, option, str(named), f"--trainer.default_root_dir={logs}") == 0
        validated = logged_scalars(newest_version(logs / "lightning_logs"), "val/bits_per_dim")
        assert [value for _, value in validated] == [pytest.approx(bits_per_dim_after_training(small_run), rel=1e-6)]


def test_validating_a_fine_tuning_recipe_validates_the_export_it_starts_from(small_run, tmp_path):
    from flowvid.export import export_checkpoint

    export = export_checkpoint(small_run / "run" / "checkpoints" / "step=00000004.ckpt", tmp_path / "model.safetensors")
    fine_tuning = tmp_path / "fine_tuning.yaml"
    fine_tuning.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path / "run"), "callbacks+": [
        {"class_path": "flowvid.lit.finetune.InitFromExport", "init_args": {"path": str(export)}}]}}))
    assert run_cli("validate", small_run, "--config", str(fine_tuning)) == 0
    validated = logged_scalars(newest_version(tmp_path / "run" / "lightning_logs"), "val/bits_per_dim")
    assert [value for _, value in validated] == [pytest.approx(bits_per_dim_after_training(small_run), rel=1e-6)]


@pytest.mark.parametrize("train_dir", ["null", "moved_away"])
def test_validating_on_held_out_shards_needs_no_training_shards(small_run, tmp_path, train_dir):
    """Only the validation shards are read: with the training folder left out, or named but gone, the checkpoint
    validates as its run logged it."""
    held_out = shutil.copytree(small_run / "shapes" / "val", tmp_path / "held_out")
    checkpoint = small_run / "run" / "checkpoints" / "step=00000004.ckpt"
    assert run_cli("validate", small_run, "--ckpt_path", str(checkpoint), f"--trainer.default_root_dir={tmp_path}",
                   "--data.init_args.train_dir", "null" if train_dir == "null" else str(tmp_path / train_dir),
                   "--data.init_args.val_dir", str(held_out)) == 0
    validated = logged_scalars(newest_version(tmp_path / "lightning_logs"), "val/bits_per_dim")
    assert [value for _, value in validated] == [pytest.approx(bits_per_dim_after_training(small_run), rel=1e-6)]


def test_a_fraction_of_the_validation_batches_validates_that_share_of_them(small_run, tmp_path):
    """``limit_val_batches: 0.5`` of a single pass over 4 clips in batches of 1 is its first 2 batches."""
    checkpoint = small_run / "run" / "checkpoints" / "step=00000004.ckpt"

    def validated_with(limit: str) -> list[float]:
        logs = tmp_path / f"limit_{limit}"
        assert run_cli("validate", small_run, "--ckpt_path", str(checkpoint), f"--trainer.default_root_dir={logs}",
                       "--data.init_args.val_batches", "null", "--data.init_args.batch_size", "1",
                       "--trainer.limit_val_batches", limit) == 0
        return [value for _, value in logged_scalars(newest_version(logs / "lightning_logs"), "val/bits_per_dim")]

    half, two, every = validated_with("0.5"), validated_with("2"), validated_with("1.0")
    assert half == [pytest.approx(two[0], rel=1e-6)] and every[0] != pytest.approx(two[0], rel=1e-6)


def test_validating_without_a_checkpoint_beside_a_runs_checkpoints_warns(small_run):
    with pytest.warns(UserWarning, match=r"validating the model as initialised, not one of the 2 checkpoint\(s\)"):
        assert run_cli("validate", small_run) == 0


def test_a_nested_setting_can_be_set_to_null_on_the_command_line(capsys):
    """``--a.init_args.b.init_args.c=null`` (or ``... null``) sets that one setting to None and keeps the
    recipe's others, as it does for any other value."""
    with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(RECIPE), "--model.init_args.flow.init_args.text_width=null",
                  "--model.init_args.text_encoder=null", "--model.init_args.denoiser.init_args.text_width", "~",
                  "--model.init_args.flow.init_args.deep_depth=3", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    recipe = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]
    for part, changed in (("flow", {"text_width": None, "deep_depth": 3}), ("denoiser", {"text_width": None})):
        expected = {**recipe[part]["init_args"], **changed}
        assert {key: model[part]["init_args"][key] for key in expected} == expected
    assert model["text_encoder"] is None
