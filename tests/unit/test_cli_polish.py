"""What a newcomer meets on the command line: score of a split dataset's folder, from-videos' skip report,
export into a folder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from data_tools.cli import main as data_main
from data_tools.report import console
from flowvid.cli import UserError, main
from flowvid.export import load_exported
from flowvid.export import main as export_main
from flowvid.loading import model_file
from flowvid.media import write_video
from test_product_generate_score import one_line_error
from test_scale_export import nll, trained  # noqa: F401 (a fixture)


def test_score_of_the_folder_holding_train_and_val_points_at_them(tmp_path, capsys):
    from flowvid.data import write_synthetic_dataset

    data = tmp_path / "custom"
    write_synthetic_dataset(data, num_videos=2, frames=4, size=8, val_videos=1, shard_samples=8)
    assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(data),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    error = one_line_error(capsys)
    assert f"it holds the shard folders {data / 'train'} and {data / 'val'}: give one of those" in error
    assert "manifest.json" not in error  # not the hint for a folder of nothing

    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(plain),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "or a shard folder with manifest.json" in one_line_error(capsys)


def test_from_videos_reports_each_skipped_file_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "width", 400)  # no line breaks inside paths
    write_video(tmp_path / "good.mkv", np.zeros((4, 16, 16, 3), np.uint8), codec="ffv1")
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    capsys.readouterr()
    assert data_main(["from-videos", str(tmp_path / "good.mkv"), str(tmp_path / "broken.mp4"),
                      "--out", str(tmp_path / "out"), "--frames", "2", "--size", "16", "--default-caption", "x"]) == 0
    report = capsys.readouterr().err
    skips = [line for line in report.splitlines() if "broken.mp4" in line]
    assert len(skips) == 1 and re.match(r"\s*skipped \S*broken\.mp4: ", skips[0]), report


@pytest.mark.parametrize("spelling", ["existing", "trailing separator"])
def test_export_into_a_folder_writes_model_safetensors_there(trained, tmp_path, capsys, spelling):  # noqa: F811
    module, ckpt = trained
    folder = tmp_path / "e3"
    if spelling == "existing":
        folder.mkdir()
    out = str(folder) + ("" if spelling == "existing" else "/")
    assert export_main(["--ckpt", str(ckpt), "--out", out, "--weights", "trained"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    assert capsys.readouterr().out.strip() == (f"wrote {folder / 'model.safetensors'}, {folder / 'config.yaml'} "
                                               f"and {folder / 'README.md'}")
    assert model_file(folder) == folder / "model.safetensors"  # what --ckpt FOLDER loads
    assert torch.equal(nll(load_exported(folder / "model.safetensors")), nll(module))


def test_export_to_a_new_name_without_the_ending_is_still_refused(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"--out {tmp_path / 'e3'} does not end in .safetensors")):
        export_main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "e3")])
    assert not (tmp_path / "e3").exists()


def test_export_help_says_out_may_be_a_folder(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "folder, existing or given with a trailing /, to write model.safetensors" in " ".join(
        capsys.readouterr().out.split())
