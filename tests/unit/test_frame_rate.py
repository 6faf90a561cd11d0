"""The frame rate a model was trained at travels with it: checkpoint -> export -> load_model -> generate
writes at it, score reads video files at it."""

import json
import shutil
import warnings

import av
import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flowvid.cli import main
from flowvid.data.datamodule import SyntheticVideoDataModule
from flowvid.export import build_module, export_checkpoint, load_exported, read_export_metadata
from flowvid.lit.checkpointing import METADATA_KEY, RunCheckpoint, list_checkpoints, load_client_state
from flowvid.loading import load_model
from flowvid.media import write_video
from flowvid.score import score_inputs
from test_product_generate_score import unconditional_config

FPS = 12.0  # the synthetic data's rate; generate's default without a recorded rate is 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of one training step on synthetic clips made at 12 fps."""
    folder = tmp_path_factory.mktemp("fit")
    config = unconditional_config()
    torch.manual_seed(0)
    data = SyntheticVideoDataModule(root=str(folder / "data"), num_videos=4, val_videos=2, frames=4, size=8, fps=FPS,
                                    shard_samples=2, batch_size=2, batches_per_epoch=1)
    saving = RunCheckpoint(every_n_train_steps=1)
    saving.run_config = config
    trainer = L.Trainer(accelerator="cpu", max_steps=1, default_root_dir=str(folder / "run"), logger=False,
                        callbacks=[saving], limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-step run warns of its warm-up
        trainer.fit(build_module(config), datamodule=data)
    [path] = list_checkpoints(folder / "run" / "checkpoints")
    return path


@pytest.fixture(scope="module")
def unrecorded(checkpoint, tmp_path_factory):
    """The same checkpoint as one written before the frame rate was recorded."""
    state = torch.load(checkpoint, weights_only=False)
    state[METADATA_KEY].pop("fps", None)
    path = tmp_path_factory.mktemp("old") / "old.ckpt"
    torch.save(state, path)
    return path


def mp4_rate(path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


def generated(folder):
    [mp4] = folder.glob("*.mp4")
    return mp4_rate(mp4), json.loads(mp4.with_suffix(".json").read_text())


def test_a_checkpoint_records_the_frame_rate_of_its_training_data(checkpoint):
    assert load_client_state(checkpoint)[METADATA_KEY]["fps"] == FPS
    assert load_model(checkpoint).training_fps == FPS


def test_an_export_keeps_the_frame_rate_and_its_card_states_it(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "export" / "model.safetensors")
    assert read_export_metadata(out)["fps"] == FPS
    assert load_model(out).training_fps == FPS and load_model(out.parent).training_fps == FPS
    assert load_exported(out).module.training_fps == FPS
    assert "| frame rate | 12 fps, as trained" in (out.parent / "README.md").read_text()


def test_generate_writes_at_the_training_rate_unless_fps_says_otherwise(checkpoint, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(checkpoint), "--out", str(tmp_path / "default")]) == 0
    rate, record = generated(tmp_path / "default")
    assert rate == FPS and record["fps"] == FPS
    assert main(["generate", "--ckpt", str(checkpoint), "--fps", "20", "--out", str(tmp_path / "chosen")]) == 0
    rate, record = generated(tmp_path / "chosen")
    assert rate == 20 and record["fps"] == 20
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "default: the rate the model was trained at" in " ".join(capsys.readouterr().out.split())


def test_a_model_saved_before_the_rate_was_recorded_loads_with_it_unknown_and_generates_at_8_fps(unrecorded, tmp_path):
    assert load_model(unrecorded).training_fps is None
    assert main(["generate", "--ckpt", str(unrecorded), "--out", str(tmp_path / "samples")]) == 0
    rate, record = generated(tmp_path / "samples")
    assert rate == 8 and "fps" not in record  # as every record written at 8 fps before

    out = export_checkpoint(unrecorded, tmp_path / "export" / "model.safetensors")
    assert read_export_metadata(out)["fps"] is None and load_model(out).training_fps is None
    assert "| frame rate | unknown" in (out.parent / "README.md").read_text()
    # An export made before the rate was recorded has no such field at all.
    metadata = {key: value for key, value in safetensors_metadata(out).items() if key != "fps"}
    save_file(load_file(str(out)), str(out), metadata=metadata)
    assert "fps" not in read_export_metadata(out) and load_model(out).training_fps is None


def safetensors_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def frames(count: int) -> np.ndarray:
    """Frames that differ from each other, so that a frame picked wrongly changes the score."""
    return np.random.default_rng(0).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)


def test_score_reads_a_faster_file_at_the_training_rate_by_nearest_timestamp(checkpoint, tmp_path):
    model = load_model(checkpoint)
    video = frames(8)
    write_video(tmp_path / "fast.mkv", video, fps=2 * FPS, codec="ffv1")  # lossless: the frames come back exact
    write_video(tmp_path / "own.mkv", video[::2], fps=FPS, codec="ffv1")  # the frames nearest to k / 12 s
    [fast] = score_inputs(model, [str(tmp_path / "fast.mkv")], seed=0)
    [own] = score_inputs(model, [str(tmp_path / "own.mkv")], seed=0)
    assert fast["frames"] == own["frames"] == 4 and fast["fps"] == own["fps"] == FPS
    assert fast["bits_per_dim_per_frame"] == own["bits_per_dim_per_frame"]

    from flowvid.media import read_frames_at

    assert np.array_equal(np.stack(read_frames_at(tmp_path / "fast.mkv", FPS).frames), video[::2])


def test_score_lists_a_slower_file_unscored_and_reads_a_file_without_a_rate_as_it_is(checkpoint, tmp_path,
                                                                                     monkeypatch):
    model = load_model(checkpoint)
    write_video(tmp_path / "slow.mkv", frames(4), fps=FPS / 2, codec="ffv1")
    write_video(tmp_path / "own.mkv", frames(4), fps=FPS, codec="ffv1")
    records = score_inputs(model, [str(tmp_path / "slow.mkv"), str(tmp_path / "own.mkv")])
    assert [r["path"] for r in records] == [str(tmp_path / "own.mkv"), str(tmp_path / "slow.mkv")]
    assert "6 fps, below the 12 fps the model was trained at" in records[1]["error"]

    monkeypatch.setattr("flowvid.media.stream_rate", lambda stream: None)  # a file that records no rate
    shutil.copy(tmp_path / "slow.mkv", tmp_path / "unknown.mkv")
    with pytest.warns(UserWarning, match="records no frame rate: read frame by frame, not at the model's 12 fps"):
        [record] = score_inputs(model, [str(tmp_path / "unknown.mkv")])
    assert record["fps"] is None and record["frames"] == 4


def test_a_model_of_unknown_rate_scores_a_file_at_its_own_rate_and_says_which(unrecorded, tmp_path):
    write_video(tmp_path / "fast.mkv", frames(8), fps=2 * FPS, codec="ffv1")
    [record] = score_inputs(load_model(unrecorded), [str(tmp_path / "fast.mkv")])
    assert record["fps"] == 2 * FPS and record["frames"] == 8


def test_the_pipeline_plays_at_the_training_rate_and_reads_files_at_it(checkpoint, tmp_path):
    from flowvid.pipeline import VideoPipeline

    pipe = VideoPipeline(load_model(checkpoint))
    assert pipe.fps == FPS and pipe(frames=4, seed=0).fps == FPS
    video = frames(8)
    write_video(tmp_path / "fast.mkv", video, fps=2 * FPS, codec="ffv1")
    assert pipe.score(tmp_path / "fast.mkv") == pipe.score(video[::2])
    extended = pipe(task="extend", video=tmp_path / "fast.mkv", frames=8, seed=0)
    assert np.array_equal(extended.videos[0, :4], video[::2])  # the given frames, picked at 12 fps, lead


def test_a_pipeline_of_unknown_rate_plays_at_8_fps(unrecorded):
    from flowvid.pipeline import VideoPipeline

    pipe = VideoPipeline(load_model(unrecorded))
    assert pipe.fps == 8.0 and pipe(frames=4, seed=0).fps == 8.0
