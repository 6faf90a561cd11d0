"""The data tools' answers to a damaged folder, a codec without weights and out-of-range options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_tools.cli import main as data_main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert data_main(["make-synthetic", "--out", str(out), "--num-videos", "6", "--val-videos", "2",
                      "--frames", "2", "--size", "8", "--shard-samples", "2"]) == 0
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_vocabulary_warns_and_fails_for_a_zero_filled_shard(shapes, tmp_path, capsys):
    import shutil

    folder = tmp_path / "train"
    shutil.copytree(shapes / "train", folder)
    shard = folder / "shard-000001.tar"
    shard.write_bytes(bytes(shard.stat().st_size))  # reads as an archive that ends at once
    capsys.readouterr()
    assert data_main(["vocabulary", str(folder)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert f"warning: skipped the rest of a damaged shard: {shard}: holds 0 samples, the manifest lists 2" in err
    assert f"(run `flowvid data verify {folder}`)" in err and "from 4 captions" in err
    assert data_main(["vocabulary", str(shapes / "train")]) == 0  # a whole folder: no warning
    assert "warning" not in capsys.readouterr().err


def test_encode_latents_refuses_a_video_vae_without_a_checkpoint(shapes, tmp_path, capsys):
    out = tmp_path / "latents"
    assert data_main(["encode-latents", str(shapes / "val"), "--out", str(out), "--codec", "video_vae",
                      "--codec-args", '{"spatial_factor": 2, "temporal_factor": 1, "latent_channels": 4, '
                                      '"width": 8, "depth": 0}']) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("flowvid data encode-latents: error: codec 'video_vae' needs its trained weights: "
                          "give --codec-args '{\"checkpoint\": \"PATH.ckpt\"}'")
    assert "recipes/codecs/video_vae_shapes.yaml" in err and not out.exists()


def test_a_file_that_is_no_video_vae_checkpoint_is_said_so_without_torch_advice(tmp_path):
    from flowvid.codecs.video_vae import VideoVAE

    script = tmp_path / "mkvids.py"
    script.write_text("import os\nprint('a script, not tensors')\n")
    with pytest.raises(ValueError) as refused:
        VideoVAE(checkpoint=str(script))
    message = str(refused.value)
    assert message.startswith(f"{script} is not a VideoVAE checkpoint (truncated, or not a PyTorch file); train one "
                              "with `flowvid fit")
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("option,value,expected", [
    ("--fps", "0", "--fps must be a finite number of frames per second > 0, got 0"),
    ("--frames", "0", "--frames must be >= 1, got 0"),
    ("--size", "16x0", "--size must be at least 1 pixel each way, got 16x0"),
    ("--stride", "0", "--stride must be >= 1, got 0"),
])
def test_from_videos_names_the_option_out_of_range(tmp_path, capsys, option, value, expected):
    arguments = {"--frames": "8", "--size": "16", option: value}
    command = ["from-videos", str(tmp_path), "--out", str(tmp_path / "out")]
    assert data_main(command + [item for pair in arguments.items() for item in pair]) == 2
    assert _one_line(capsys.readouterr().err) == f"flowvid data from-videos: error: {expected}"


@pytest.mark.parametrize("verb", ["verify", "describe", "vocabulary"])
def test_a_folder_that_does_not_exist_is_said_so_with_the_command_named(tmp_path, capsys, verb):
    missing = tmp_path / "nowhere"
    assert data_main([verb, str(missing)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"flowvid data {verb}: error: {missing} does not exist (make one with")
    assert "manifest.json" not in err


def test_the_synopses_show_shard_samples_and_the_defaults():
    text = DOCS.read_text()
    synthetic = re.search(r"flowvid data make-synthetic --out DIR.*?\n```", text, re.S).group(0)
    latents = re.search(r"flowvid data encode-latents RAW_DIR.*?\n```", text, re.S).group(0)
    for default in ("[--frames 8]", "[--size 16]", "[--seed 0]", "[--fps 8]", "[--shard-samples 64]"):
        assert default in synthetic
    assert "[--shard-samples 1000]" in latents and "[--batch-size 8]" in latents
