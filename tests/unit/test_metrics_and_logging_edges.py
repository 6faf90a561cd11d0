"""The metrics docs' overlay on the shipped recipe, callbacks that would log over each other, and what
``flowvid data fvd-stats`` prints."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from data_tools.cli import build_parser
from data_tools.cli import main as data_main
from data_tools.report import console
from flowvid.data import write_synthetic_dataset
from flowvid.lit.callbacks import FVDCallback, SampleVideoLogger
from flowvid.metrics import FrechetVideoDistance
from flowvid.registry import FVD_EXTRACTORS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "metrics.md"
DEMO_RECIPE = REPO / "recipes" / "demo" / "shapes_t2v.yaml"


def doc_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def eval_overlay() -> dict:
    (block,) = [block for block in doc_yaml_blocks() if block.startswith("# eval.yaml")]
    return yaml.safe_load(block)


def parse(*args: str) -> LightningCLI:
    """What ``flowvid fit --config ...`` builds, without running it (the Trainer and its callbacks included)."""
    with mock.patch.object(sys, "argv", ["flowvid"]):
        return LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            save_config_kwargs={"overwrite": True}, run=False, args=list(args))


def setup_evaluations(trainer) -> None:
    """What fit runs of the evaluation callbacks' setup before any weights or statistics are read."""
    for callback in trainer.callbacks:
        if isinstance(callback, SampleVideoLogger):
            callback.setup(trainer, SimpleNamespace(), "fit")  # given captions: nothing else is read
        elif isinstance(callback, FVDCallback):
            callback._refuse_a_twin(trainer)


def test_the_docs_eval_overlay_builds_on_the_demo_recipe(tmp_path):
    overlay = eval_overlay()
    assert "logger" not in overlay["trainer"]  # the recipe's own TensorBoard folder is kept
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(overlay))
    cli = parse("--config", str(DEMO_RECIPE), "--config", str(tmp_path / "eval.yaml"))
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert kinds.count(SampleVideoLogger) == 1 and kinds.count(FVDCallback) == 1
    setup_evaluations(cli.trainer)


def test_the_docs_second_sample_logger_has_its_own_tag_and_builds_beside_the_recipes(tmp_path):
    (block,) = [block for block in doc_yaml_blocks() if "SampleVideoLogger" in block]
    second = yaml.safe_load(block)
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks+": second}}))
    cli = parse("--config", str(DEMO_RECIPE), "--config", str(tmp_path / "more.yaml"))
    loggers = [callback for callback in cli.trainer.callbacks if isinstance(callback, SampleVideoLogger)]
    assert sorted(logger.tag for logger in loggers) == ["samples", "samples_more"]
    setup_evaluations(cli.trainer)


def tiny_trainer(callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("second", [dict(every_n_steps=500, captions=["a blue square moves up"]),
                                    dict(every_n_steps=160, captions=["a red circle moves left"])],
                         ids=["other settings", "identical"])
def test_two_sample_loggers_under_one_tag_are_refused_in_one_line(second):
    first = SampleVideoLogger(every_n_steps=160, captions=["a red circle moves left"])
    trainer = tiny_trainer([first, SampleVideoLogger(**second)])  # Lightning itself no longer refuses them
    with pytest.raises(ValueError) as refused:
        first.setup(trainer, SimpleNamespace(), "fit")
    message = str(refused.value)
    assert "\n" not in message and "two SampleVideoLoggers write under tag 'samples'" in message
    assert "every 160 steps, 1 prompt(s)" in message and "init_args.tag" in message


def test_sample_loggers_of_other_tags_keep_their_states_apart_in_the_checkpoint():
    first = SampleVideoLogger(captions=["a"])
    second = SampleVideoLogger(captions=["b"], tag="more")
    trainer = tiny_trainer([first, second])
    first.setup(trainer, SimpleNamespace(), "fit")
    first._logged_captions, second._logged_captions = ["a"], ["b"]
    checkpoint: dict = {}
    for callback in (first, second):
        callback.on_save_checkpoint(trainer, None, checkpoint)
    restored = [SampleVideoLogger(captions=["a"]), SampleVideoLogger(captions=["b"], tag="more")]
    for callback in restored:
        callback.on_load_checkpoint(trainer, None, checkpoint)
    assert [callback._logged_captions for callback in restored] == [["a"], ["b"]]


def test_two_fvd_callbacks_that_would_log_under_one_name_are_refused():
    val = FVDCallback(extractor="pixel-stats", num_samples=8)
    cached = FVDCallback(extractor="pixel-stats", num_samples=8, reference="stats.npz")
    trainer = tiny_trainer([val, cached, FVDCallback(extractor="pixel-stats", num_samples=16)])
    with pytest.raises(ValueError, match="two FVDCallbacks measure pixel-stats FVD of 8 samples"):
        val._refuse_a_twin(trainer)
    trainer.callbacks[2]._refuse_a_twin(trainer)  # another sample count: another name


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=4, frames=4, size=16, val_videos=2)
    return root / "train"


def test_fvd_stats_prints_the_whole_file_name_on_its_own_line(raw_folder, capsys, monkeypatch):
    monkeypatch.setattr(console, "width", 80)  # what a pipe gets: table cells clipped
    deep = raw_folder.parent / ("a_folder_name_long_enough_to_be_clipped_in_a_table_of_eighty_columns" * 2)
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out",
                      str(deep / "stats.npz")]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {deep / 'stats.npz'}"] and (deep / "stats.npz").is_file()


def test_fvd_stats_errors_name_the_command(raw_folder, capsys):
    assert data_main(["fvd-stats", str(raw_folder), "--frames", "99"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("flowvid data fvd-stats: error: --frames must be between 1 and the clips' 4 frames")


@pytest.mark.parametrize("verb", ["fvd-stats", "fvd"])
def test_the_fvd_commands_help_lists_every_registered_extractor(verb):
    verbs = next(action for action in build_parser()._actions if action.dest == "verb")
    extractor = next(action for action in verbs.choices[verb]._actions if action.dest == "extractor")
    assert FVD_EXTRACTORS.names() and all(name in extractor.help for name in FVD_EXTRACTORS.names())
    assert "pixel-stats" in extractor.help


def test_fvd_without_the_i3d_weights_names_the_command(raw_folder, tmp_path, capsys):
    (tmp_path / "generated").mkdir()
    for name in ("a", "b"):  # two videos: fewer are refused before the extractor is built
        np.save(tmp_path / "generated" / f"{name}.npy", np.zeros((4, 16, 16, 3), np.uint8))
    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(raw_folder), "--extractor", "i3d",
                      "--extractor-args", '{"weights": "%s"}' % (tmp_path / "missing.pt")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("flowvid data fvd: error:") and "missing.pt" in error


def test_the_docs_say_protocol_name_is_known_only_after_compute():
    row = next(line for line in DOC.read_text().splitlines() if "flowvid.metrics.FrechetVideoDistance` |" in line)
    assert "before `update()` and `compute()` reading it raises `RuntimeError`" in row
    with pytest.raises(RuntimeError):
        FrechetVideoDistance("pixel-stats").protocol_name
    metric = FrechetVideoDistance("pixel-stats")
    videos = torch.randint(0, 256, (3, 4, 16, 16, 3), dtype=torch.uint8)
    metric.update(videos, real=True)
    metric.update(videos.flip(0), real=False)
    metric.compute()
    assert metric.protocol_name.startswith("fvd_debug/pixel-stats_f4_r16")
