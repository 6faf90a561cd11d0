"""``flowvid data fvd``: generated video files read at the reference's frame rate, refusals before any work,
and the result file as the one JSON line printed."""

import dataclasses
import json

import numpy as np
import pytest

from data_tools.cli import main as data_main
from flowvid.data import write_synthetic_dataset
from flowvid.media import write_video
from flowvid.metrics.fvd import FrechetVideoDistance, ReferenceStats


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=8, frames=4, size=16, val_videos=2, shard_samples=8)  # 8 fps clips
    return root / "train"


def noise_videos(folder, fps: float, frames: int, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        write_video(folder / f"video_{index}.mp4", rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8), fps=fps)


def fvd(capsys, *args: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert data_main(["fvd", *args, "--extractor", "pixel-stats"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), " ".join(captured.err.split())


def test_video_files_are_read_at_the_frame_rate_of_a_shard_folder_reference(raw_folder, tmp_path, capsys):
    noise_videos(tmp_path / "fast", fps=32, frames=16)  # 4 frames at 8 fps: no cut
    noise_videos(tmp_path / "slow", fps=4, frames=8, count=1)
    result, _ = fvd(capsys, str(tmp_path / "fast"), str(tmp_path / "slow"), "--reference", str(raw_folder))
    assert (result["generated"], result["cut"], result["skipped"]) == (3, 0, 1)


def test_a_reference_file_records_the_frame_rate_of_its_clips(raw_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "real"
    shutil.copytree(raw_folder, folder, ignore=shutil.ignore_patterns("fvd_stats"))
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    shutil.rmtree(folder)  # the rate is the file's own, not read again from the folder
    assert ReferenceStats.load(stats).fps == 8.0
    noise_videos(tmp_path / "fast", fps=32, frames=16)
    result, err = fvd(capsys, str(tmp_path / "fast"), "--reference", str(stats))
    assert (result["generated"], result["cut"]) == (3, 0) and "frame rate" not in err


def without_frame_rate(stats) -> None:
    """``stats`` written again as a file that records no frame rate."""
    dataclasses.replace(ReferenceStats.load(stats), fps=None).save(stats)
    assert ReferenceStats.load(stats).fps is None


def test_a_reference_file_without_a_rate_takes_that_of_the_folder_it_was_computed_from(raw_folder, tmp_path,
                                                                                        capsys):
    noise_videos(tmp_path / "fast", fps=32, frames=16)
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    without_frame_rate(stats)
    result, err = fvd(capsys, str(tmp_path / "fast"), "--reference", str(stats))
    assert (result["generated"], result["cut"]) == (3, 0) and "frame rate" not in err


def test_a_reference_of_unknown_frame_rate_is_one_warning(raw_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "real"
    shutil.copytree(raw_folder, folder, ignore=shutil.ignore_patterns("fvd_stats"))
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    without_frame_rate(stats)
    shutil.rmtree(folder)
    noise_videos(tmp_path / "fast", fps=32, frames=16)
    result, err = fvd(capsys, str(tmp_path / "fast"), "--reference", str(stats))
    assert result["cut"] == 3  # read frame by frame
    assert f"warning the frame rate of {stats}'s clips is unknown: the generated video files are read frame by " \
           "frame" in err


def test_the_result_file_is_the_one_json_line_printed(raw_folder, tmp_path, capsys):
    noise_videos(tmp_path / "generated", fps=8, frames=4)
    result, _ = fvd(capsys, str(tmp_path / "generated"), "--reference", str(raw_folder),
                    "--out", str(tmp_path / "fvd.json"))
    assert (tmp_path / "fvd.json").read_text() == json.dumps(result) + "\n"


def test_too_few_usable_videos_are_refused_before_the_extractor_runs_on_them(raw_folder, tmp_path, capsys,
                                                                           monkeypatch):
    folder = tmp_path / "generated"
    noise_videos(folder, fps=8, frames=4, count=1)
    (folder / "damaged.mp4").write_bytes(b"not a video")
    (folder / "empty.mp4").write_bytes(b"")
    generated_batches = []
    update = FrechetVideoDistance.update

    def recording_update(self, videos, real):
        generated_batches.extend([] if real else [len(videos)])
        return update(self, videos, real)

    monkeypatch.setattr(FrechetVideoDistance, "update", recording_update)
    assert data_main(["fvd", str(folder), "--reference", str(raw_folder), "--extractor", "pixel-stats"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "1 usable generated video (2 skipped); FVD needs at least 2" in err
    assert "empty.mp4: empty file" in err  # as from-videos lists a 0-byte file
    assert generated_batches == []


@pytest.fixture(scope="module")
def latent_folder(raw_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "lat"
    assert data_main(["encode-latents", str(raw_folder), "--out", str(out), "--codec", "pixel"]) == 0
    return out


def test_a_latent_folder_is_refused_naming_the_command_before_any_extractor(latent_folder, tmp_path, capsys,
                                                                           monkeypatch):
    import data_tools.fvd
    import data_tools.fvd_stats

    def no_extractor(*args, **kwargs):
        raise AssertionError("the extractor was built")

    monkeypatch.setattr(data_tools.fvd_stats, "build_extractor", no_extractor)
    monkeypatch.setattr(data_tools.fvd, "build_extractor", no_extractor)
    capsys.readouterr()
    assert data_main(["fvd-stats", str(latent_folder), "--extractor", "pixel-stats"]) == 2
    assert "holds latent shards; fvd-stats reads raw video shards" in " ".join(capsys.readouterr().err.split())
    noise_videos(tmp_path / "generated", fps=8, frames=4)
    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(latent_folder)]) == 2
    assert "holds latent shards; fvd --reference reads raw video shards" in " ".join(capsys.readouterr().err.split())
