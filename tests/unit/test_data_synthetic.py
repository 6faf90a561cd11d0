"""Synthetic captioned videos: vocabulary, rendering, captions, held-out split, and the attribute probe."""

import re

import numpy as np
import pytest

from data_tools.cli import main as data_main
from flowvid.data import synthetic
from flowvid.data.synthetic import (
    ALL_COMBINATIONS,
    COLOURS,
    HELDOUT_COMBINATIONS,
    MOTIONS,
    SHAPES,
    TRAIN_COMBINATIONS,
    caption_adherence,
    caption_of,
    estimate_attributes,
    render_video,
    sample_attributes,
    write_synthetic_dataset,
)
from flowvid.data.manifest import ManifestError, load_manifest, new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, SampleSpec, decode_sample, encode_sample, iter_tar, shard_paths

def folder_contents(root):
    """Every file and folder under ``root`` with the bytes of the files: equal means untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


RED_CIRCLE_LEFT = {"objects": [{"shape": "circle", "colour": "red", "motion": "left"}], "background": "plain"}


def _videos(count, frames=8, size=16, combinations=ALL_COMBINATIONS):
    attributes = [sample_attributes(np.random.default_rng(i), combinations) for i in range(count)]
    return [render_video(a, frames, size, seed=i) for i, a in enumerate(attributes)], attributes


def test_vocabulary_is_large_enough_and_split_holds_out_combinations_not_words():
    assert len(SHAPES) >= 3 and len(COLOURS) >= 5 and len(MOTIONS) >= 4
    assert set(TRAIN_COMBINATIONS).isdisjoint(HELDOUT_COMBINATIONS)
    assert len(TRAIN_COMBINATIONS) + len(HELDOUT_COMBINATIONS) == len(ALL_COMBINATIONS)
    assert 0 < len(HELDOUT_COMBINATIONS) < len(ALL_COMBINATIONS) // 4
    for position, words in enumerate((SHAPES, COLOURS, MOTIONS)):
        assert {c[position] for c in TRAIN_COMBINATIONS} == set(words)  # every word is still trained


def test_captions_name_every_object():
    assert caption_of(RED_CIRCLE_LEFT) == "a red circle moves left"
    two = {"objects": [RED_CIRCLE_LEFT["objects"][0], {"shape": "square", "colour": "blue", "motion": "up"}]}
    assert caption_of(two) == "a red circle moves left and a blue square moves up"


def test_render_is_deterministic_and_seeded():
    a = render_video(RED_CIRCLE_LEFT, frames=8, size=16, fps=8, seed=3)
    assert a.dtype == np.uint8 and a.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(a, render_video(RED_CIRCLE_LEFT, frames=8, size=16, fps=8, seed=3))
    assert not np.array_equal(a, render_video(RED_CIRCLE_LEFT, frames=8, size=16, fps=8, seed=4))
    assert render_video(RED_CIRCLE_LEFT, frames=5, size=(12, 20)).shape == (5, 12, 20, 3)


def test_render_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="colour must be one of"):
        render_video({"objects": [{"shape": "circle", "colour": "teal", "motion": "left"}]}, 4, 16)
    with pytest.raises(ValueError, match="size >= 4"):
        render_video(RED_CIRCLE_LEFT, 4, 2)


@pytest.mark.parametrize("size,frames", [(16, 8), (32, 12)])
def test_probe_reads_clean_videos(size, frames):
    videos, attributes = _videos(120, frames, size)
    found = [estimate_attributes(v) for v in videos]
    objects = [(o, {f["colour"]: f for f in est["objects"]}) for est, a in zip(found, attributes) for o in a["objects"]]
    colour = np.mean([o["colour"] in seen for o, seen in objects])
    motion = np.mean([o["colour"] in seen and seen[o["colour"]]["motion"] == o["motion"] for o, seen in objects])
    shape = np.mean([o["colour"] in seen and seen[o["colour"]]["shape"] == o["shape"] for o, seen in objects])
    assert colour >= 0.95 and motion >= 0.95 and shape >= 0.9, (colour, motion, shape)
    assert caption_adherence(videos, attributes) >= 0.9


def test_probe_rejects_videos_that_contradict_their_captions():
    videos, attributes = _videos(40)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = [{"objects": [{**o, "motion": opposite[o["motion"]]} for o in a["objects"]]} for a in attributes]
    assert caption_adherence(videos, flipped) <= 0.05
    blank = np.full((8, 16, 16, 3), 30, np.uint8)
    assert estimate_attributes(blank) == {"colour": None, "motion": None, "shape": None, "objects": []}
    assert caption_adherence([blank], [RED_CIRCLE_LEFT]) == 0.0


def test_dataset_is_deterministic_and_validation_is_held_out(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", num_videos=24, frames=4, size=16, seed=5, shard_samples=10)
    again = write_synthetic_dataset(tmp_path / "b", num_videos=24, frames=4, size=16, seed=5, shard_samples=10)
    assert [s["sha256"] for s in first["train"]["shards"]] == [s["sha256"] for s in again["train"]["shards"]]
    assert first["train"]["num_shards"] == 3 and first["val"]["samples"] == 3
    assert synthetic.synthetic_recipe(tmp_path / "a")["seed"] == 5

    folder = tmp_path / "a" / "val"
    manifest = load_manifest(folder)
    spec = SampleSpec.from_manifest(manifest)
    for shard in shard_paths(folder, manifest):
        for raw in iter_tar(shard):
            sample = decode_sample(raw, spec)
            assert sample["video"].shape == (4, 16, 16, 3)
            assert sample["caption"] == caption_of(sample["meta"]["attributes"])
            for obj in sample["meta"]["attributes"]["objects"]:
                assert (obj["shape"], obj["colour"], obj["motion"]) in HELDOUT_COMBINATIONS


def test_object_count_and_backgrounds_can_be_narrowed(tmp_path):
    rng = np.random.default_rng(0)
    drawn = [sample_attributes(rng, TRAIN_COMBINATIONS, max_objects=1, backgrounds=["plain"]) for _ in range(50)]
    assert all(len(a["objects"]) == 1 and a["background"] == "plain" for a in drawn)
    both = [sample_attributes(rng, TRAIN_COMBINATIONS) for _ in range(50)]
    assert {len(a["objects"]) for a in both} == {1, 2} and {a["background"] for a in both} == {"plain", "textured"}
    with pytest.raises(ValueError, match="max_objects"):
        sample_attributes(rng, TRAIN_COMBINATIONS, max_objects=0)
    with pytest.raises(ValueError, match="backgrounds"):
        sample_attributes(rng, TRAIN_COMBINATIONS, backgrounds=["starry"])

    with pytest.raises(ValueError, match="max_objects"):
        write_synthetic_dataset(tmp_path / "bad", num_videos=6, frames=4, size=16, max_objects=7)
    assert not (tmp_path / "bad").exists()  # refused before anything is written

    write_synthetic_dataset(tmp_path, num_videos=6, frames=4, size=16, val_videos=2, max_objects=1,
                            backgrounds=["plain"])
    recipe = synthetic.synthetic_recipe(tmp_path)
    assert recipe["max_objects"] == 1 and recipe["backgrounds"] == ["plain"]


@pytest.mark.parametrize("bad_option", [["--size", "0"], ["--frames", "0"], ["--fps", "0"], ["--fps", "nan"],
                                        ["--fps", "inf"], ["--val-videos", "0"], ["--shard-samples", "0"],
                                        ["--max-objects", "7"]])
def test_a_refused_command_leaves_an_existing_dataset_byte_for_byte(tmp_path, capsys, bad_option):
    make = ["make-synthetic", "--out", str(tmp_path), "--num-videos", "8", "--frames", "4", "--size", "16"]
    assert data_main(make) == 0
    before = folder_contents(tmp_path)
    capsys.readouterr()
    assert data_main([*make, *bad_option]) == 2  # the later option wins
    error = capsys.readouterr().err
    # nothing before it, not even a progress bar
    assert error.startswith("flowvid data make-synthetic: error:") and "Traceback" not in error
    assert folder_contents(tmp_path) == before


@pytest.mark.parametrize("out", ["taken.txt", "taken.txt/shapes"])
def test_an_output_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path, capsys, out):
    (tmp_path / "taken.txt").write_text("keep me")
    assert data_main(["make-synthetic", "--out", str(tmp_path / out), "--num-videos", "4", "--frames", "2",
                      "--size", "8"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and f"output folder {tmp_path / out}" in " ".join(error.split())
    assert error.startswith("flowvid data make-synthetic: error:")  # refused before the progress bar shows
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_a_negative_seed_is_refused_by_name_before_anything_shows(tmp_path, capsys):
    assert data_main(["make-synthetic", "--out", str(tmp_path / "shapes"), "--num-videos", "4", "--frames", "2",
                      "--size", "8", "--seed", "-1"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("flowvid data make-synthetic: error: --seed must be an integer >= 0, got -1")
    assert not (tmp_path / "shapes").exists()
    with pytest.raises(ValueError, match="seed"):
        write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=2, size=8, seed=-1)


def _made_from_videos(folder):
    """A raw shard folder as from-videos writes it: clips that no seed can draw again."""
    with ShardFolderWriter(folder) as writer:
        writer.write(encode_sample("holiday-0", "a beach", {}, frames=np.zeros((2, 8, 8, 3), np.uint8)))
    write_manifest(folder, new_manifest("raw", {"frames": 2, "height": 8, "width": 8, "fps": 8.0}, samples=1,
                                        num_shards=1, shards=writer.shards, source={"tool": "from-videos"}))


def _not_flowvids(folder):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"model": "mine"}')
    (folder / "shard-mine.tar").write_bytes(b"my own data")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("other", [_made_from_videos, _not_flowvids])
def test_a_dataset_make_synthetic_did_not_write_is_refused_and_kept(tmp_path, capsys, split, other):
    other(tmp_path / split)
    before = folder_contents(tmp_path)
    assert data_main(["make-synthetic", "--out", str(tmp_path), "--num-videos", "4", "--frames", "2",
                      "--size", "8"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    manifest = tmp_path / split / "manifest.json"
    assert error.startswith(f"flowvid data make-synthetic: error: {manifest} was not written by make-synthetic")
    assert folder_contents(tmp_path) == before
    with pytest.raises(ValueError, match="not written by make-synthetic"):
        write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8)
    assert folder_contents(tmp_path) == before


def test_a_synthetic_dataset_is_written_again_over_itself(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8, seed=1)
    again = write_synthetic_dataset(tmp_path, num_videos=2, frames=2, size=8, val_videos=1, seed=2)
    assert load_manifest(tmp_path / "train") == again["train"]


def test_the_dataset_folder_itself_is_named_with_its_two_shard_folders(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8)
    with pytest.raises(ManifestError, match=re.escape(f"it holds the shard folders {tmp_path / 'train'} and "
                                                      f"{tmp_path / 'val'}: give one of those")):
        load_manifest(tmp_path)


def test_a_full_disk_is_one_line_and_the_previous_dataset_stays(tmp_path, capsys, monkeypatch):
    import errno

    from flowvid.data import shards

    make = ["make-synthetic", "--out", str(tmp_path), "--num-videos", "8", "--frames", "4", "--size", "16"]
    assert data_main(make) == 0
    before = folder_contents(tmp_path)
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard-000000.tar.tmp"))

    monkeypatch.setattr(shards.tarfile, "open", full)
    assert data_main([*make, "--seed", "3"]) == 2
    error = capsys.readouterr().err
    expected = f"error: cannot write or read ({tmp_path / 'shard-000000.tar.tmp'}): No space left on device"
    assert "Traceback" not in error and "".join(expected.split()) in "".join(error.split())  # rich wraps lines
    assert folder_contents(tmp_path) == before


def test_a_run_that_fails_midway_leaves_the_previous_dataset_as_it_was(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=8, frames=4, size=16, shard_samples=3)
    (tmp_path / "train" / "notes.md").write_text("kept")
    before = folder_contents(tmp_path)
    drawn = []

    def crash_after_five_videos():
        drawn.append(1)
        if len(drawn) == 5:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic_dataset(tmp_path, num_videos=9, frames=4, size=16, seed=1, on_video=crash_after_five_videos)
    assert folder_contents(tmp_path) == before  # no shard replaced, no staging folder left behind

    again = write_synthetic_dataset(tmp_path, num_videos=2, frames=4, size=16, val_videos=1)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["manifest.json", "notes.md", "shard-000000.tar"]
    assert again["train"]["samples"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["train", "val"]


def test_the_help_gives_the_default_of_val_videos_the_run_uses(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_main(["make-synthetic", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "default: an eighth of --num-videos, rounded down, and 1 at least" in shown
    for num_videos, val_videos in ((4, 1), (17, 2)):
        out = tmp_path / str(num_videos)
        assert data_main(["make-synthetic", "--out", str(out), "--num-videos", str(num_videos), "--frames", "2",
                          "--size", "8"]) == 0
        assert load_manifest(out / "val")["samples"] == val_videos


@pytest.mark.parametrize("too_much,message", [
    (["--size", "100000"], "a clip of 2 frames of 100000x100000 pixels holds 57,220 MiB, more than the 64 MiB"),
    (["--size", "2000", "--frames", "6"], "give a smaller --size or fewer --frames"),
    (["--num-videos", str(10**12)], "the videos' frames alone need 432,000.0 GB"),  # and an eighth more for validation
])
def test_videos_that_would_not_fit_are_refused_before_one_is_drawn(tmp_path, capsys, monkeypatch, too_much, message):
    def never(*args, **kwargs):
        raise AssertionError("a video was drawn")

    monkeypatch.setattr(synthetic, "render_video", never)
    make = ["make-synthetic", "--out", str(tmp_path / "out"), "--num-videos", "4", "--frames", "2", "--size", "8"]
    assert data_main([*make, *too_much]) == 2
    error = capsys.readouterr().err
    assert error.startswith("flowvid data make-synthetic: error:") and message in " ".join(error.split())
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="64 MiB"):
        write_synthetic_dataset(tmp_path / "out", num_videos=4, frames=2, size=100000)
