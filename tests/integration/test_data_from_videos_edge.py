"""from-videos on inputs that real corpora hold: tags in another encoding, namesakes whose keys could clash."""

import json

import av
import numpy as np
import pytest

from data_tools import from_videos
from data_tools.cli import main as data_main
from data_tools.report import console
from data_tools.verify import verify_folder
from flowvid.data import load_manifest
from flowvid.media import read_frames


def write_video(path, frames, fps=8, title=None):
    with av.open(str(path), "w") as container:
        if title is not None:
            container.metadata["title"] = title
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def random_frames(count, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_a_video_tagged_in_latin_1_is_read_not_the_run_stopped(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_video(corpus / "plain.mkv", random_frames(8, seed=1))
    tagged = write_video(corpus / "tagged.mkv", random_frames(8, seed=2), title="Café tag")
    data = tagged.read_bytes()
    assert data.count("Café".encode()) == 1
    tagged.write_bytes(data.replace("Café".encode(), b"Caf\xe9 "))  # as old Windows taggers wrote it: not UTF-8

    out = tmp_path / "out"
    code = data_main(["from-videos", str(corpus), "--out", str(out), "--frames", "4", "--size", "16",
                      "--default-caption", "", "--workers", "2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_ok"] == 2 and summary["written"] == 4 and summary["skipped"] == []
    np.testing.assert_array_equal(np.stack(read_frames(tagged)), random_frames(8, seed=2))


def test_namesakes_whose_path_hashes_share_their_first_digits_get_different_keys(tmp_path):
    # sha1("d38866/video.mkv") and sha1("d43191/video.mkv") both start with ab3686f7: a folder per video,
    # each holding video.mp4, is a common layout, and among 100k of them such a pair is likely.
    corpus = tmp_path / "corpus"
    for index, folder in enumerate(["d38866", "d43191"]):
        (corpus / folder).mkdir(parents=True)
        write_video(corpus / folder / "video.mkv", random_frames(8, seed=index))
    out = tmp_path / "out"
    code = data_main(["from-videos", str(corpus), "--out", str(out), "--frames", "4", "--size", "16",
                      "--default-caption", ""])
    assert code == 0
    assert load_manifest(out)["samples"] == 4
    report = verify_folder(out)
    assert report["ok"], report


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "0", "--workers must be at least 1"),
    ("--workers", "-2", "--workers must be at least 1"),
    ("--shard-samples", "0", "--shard-samples must be at least 1"),
    ("--shard-mb", "0", "--shard-mb must be a finite number above 0, got 0"),
    ("--shard-mb", "nan", "--shard-mb must be a finite number above 0, got nan"),
])
def test_a_limit_that_cannot_be_met_is_refused_naming_its_option_before_any_video_is_read(tmp_path, monkeypatch,
                                                                                          option, value, message):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    video = write_video(tmp_path / "a.mkv", random_frames(4))
    monkeypatch.setattr(from_videos, "find_videos", lambda inputs: pytest.fail("the videos were looked for"))
    with console.capture() as printed:
        assert data_main(["from-videos", str(video), "--out", str(tmp_path / "out"), "--frames", "4", "--size", "16",
                          "--default-caption", "", option, value]) == 2
    assert message in printed.get() and len(printed.get().strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_link_to_a_video_that_is_not_there_is_listed_as_unreadable_not_left_out(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_video(corpus / "here.mkv", random_frames(4))
    (corpus / "fetched-later.mkv").symlink_to(tmp_path / "annex" / "objects" / "gone.mkv")  # git-annex, not fetched
    out = tmp_path / "out"
    assert data_main(["from-videos", str(corpus), "--out", str(out), "--frames", "4", "--size", "16",
                      "--default-caption", ""]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_total"] == 2 and summary["files_ok"] == 1
    assert [(item["path"], item["reason"].split(":")[0]) for item in summary["skipped"]] == [
        (str(corpus / "fetched-later.mkv"), "unreadable")]
    assert load_manifest(out)["skipped"] == summary["skipped"]
