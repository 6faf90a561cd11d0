"""The synthetic dataset at its edges: what the probe reads, what it refuses to read, and what datasets are refused."""

import itertools
import re

import numpy as np
import pytest

from data_tools.cli import main as data_main
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import SampleSpec, decode_sample, iter_tar, shard_paths
from flowvid.data.synthetic import (
    ALL_COMBINATIONS,
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    caption_adherence,
    caption_of,
    estimate_attributes,
    render_video,
    sample_attributes,
    write_synthetic_dataset,
)


def one_object(shape, colour, motion, background="plain"):
    return {"objects": [{"shape": shape, "colour": colour, "motion": motion}], "background": background}


def read_back(video):
    return {o["colour"]: (o["shape"], o["motion"]) for o in estimate_attributes(video)["objects"]}


@pytest.mark.parametrize("size", [16, 32])
def test_noise_shows_no_objects_and_is_a_miss_for_every_caption(size):
    rng = np.random.default_rng(0)
    uniform = [rng.integers(0, 256, (8, size, size, 3)).astype(np.uint8) for _ in range(40)]
    grey = [np.clip(rng.normal(128, 60, (8, size, size, 3)), 0, 255).astype(np.uint8) for _ in range(40)]
    for video in uniform + grey:
        assert estimate_attributes(video)["objects"] == []
    # Every caption the vocabulary can write, against noise: none of them is followed.
    captions = [one_object(*c) for c in ALL_COMBINATIONS]
    assert caption_adherence((uniform + grey)[: len(captions)], captions, check_shape=False) == 0.0


def test_blank_videos_in_any_shade_are_misses():
    for shade in (0, 30, 128, 255):
        blank = np.full((8, 16, 16, 3), shade, np.uint8)
        assert estimate_attributes(blank) == {"colour": None, "motion": None, "shape": None, "objects": []}
        assert caption_adherence([blank], [one_object("circle", "red", "left")], check_shape=False) == 0.0


def test_stray_pixels_of_an_objects_colour_do_not_change_its_shape():
    for shape, colour, motion in ALL_COMBINATIONS:
        video = render_video(one_object(shape, colour, motion), 8, 32, seed=1)
        video[:, 0, 0] = video[:, -1, -1] = COLOURS[colour]  # two specks in far corners
        assert read_back(video) == {colour: (shape, motion)}


@pytest.mark.parametrize("frames,size", [(8, 32), (2, 32), (16, 64)])
def test_every_combination_on_every_background_is_read_back_exactly(frames, size):
    for (shape, colour, motion), background, seed in itertools.product(ALL_COMBINATIONS, BACKGROUNDS, range(2)):
        video = render_video(one_object(shape, colour, motion, background), frames, size, seed=seed)
        assert read_back(video) == {colour: (shape, motion)}, (shape, colour, motion, background, seed)


@pytest.mark.parametrize("frames,size", [(8, 8), (2, 8), (8, 16)])
def test_colour_and_motion_of_every_object_are_read_at_the_smallest_sizes(frames, size):
    for (shape, colour, motion), background in itertools.product(ALL_COMBINATIONS, BACKGROUNDS):
        video = render_video(one_object(shape, colour, motion, background), frames, size, seed=0)
        assert {c: m for c, (_, m) in read_back(video).items()} == {colour: motion}, (shape, colour, motion, background)
    attributes = [sample_attributes(np.random.default_rng(i), ALL_COMBINATIONS) for i in range(150)]
    videos = [render_video(a, frames, size, seed=i) for i, a in enumerate(attributes)]
    assert caption_adherence(videos, attributes, check_shape=False) == 1.0


def test_captions_name_each_object_unambiguously():
    clause = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moves ({'|'.join(MOTIONS)})")
    rng = np.random.default_rng(0)
    for _ in range(200):
        attributes = sample_attributes(rng, ALL_COMBINATIONS)
        parsed = [clause.fullmatch(part).groups() for part in caption_of(attributes).split(" and ")]
        assert parsed == [(o["colour"], o["shape"], o["motion"]) for o in attributes["objects"]]


def decoded(folder):
    manifest = load_manifest(folder)
    spec = SampleSpec.from_manifest(manifest)
    return [(s["caption"], s["video"].tobytes()) for shard in shard_paths(folder, manifest)
            for s in (decode_sample(raw, spec) for raw in iter_tar(shard))]


def test_videos_do_not_depend_on_the_shard_size(tmp_path):
    for name, shard_samples in (("one", 1), ("some", 3), ("all", 64)):
        write_synthetic_dataset(tmp_path / name, num_videos=7, val_videos=4, frames=4, size=16, seed=9,
                                shard_samples=shard_samples)
    for split in ("train", "val"):
        first = decoded(tmp_path / "one" / split)
        assert len(first) == {"train": 7, "val": 4}[split]
        assert decoded(tmp_path / "some" / split) == first == decoded(tmp_path / "all" / split)


@pytest.mark.parametrize("bad_option", [
    ["--max-objects", "3"], ["--max-objects", "0"], ["--size", "4"], ["--size", "7"], ["--frames", "1"],
    ["--num-videos", "0"], ["--val-videos", "0"], ["--shard-samples", "0"], ["--seed", "-1"], ["--fps", "0"],
])
def test_make_synthetic_refuses_datasets_whose_captions_the_videos_cannot_show(tmp_path, capsys, bad_option):
    make = ["make-synthetic", "--out", str(tmp_path / "out"), "--num-videos", "4", "--frames", "2", "--size", "8"]
    assert data_main([*make, *bad_option]) == 2
    error = capsys.readouterr().err
    # the option, as typed
    assert error.startswith(f"flowvid data make-synthetic: error: {bad_option[0]} ") and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    assert data_main(make) == 0  # the smallest accepted dataset


def test_a_third_object_is_refused_because_it_would_be_drawn_over_the_others():
    with pytest.raises(ValueError, match="max_objects must be between 1 and 2"):
        sample_attributes(np.random.default_rng(0), ALL_COMBINATIONS, max_objects=3)


def test_an_unknown_background_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        data_main(["make-synthetic", "--out", str(tmp_path / "out"), "--num-videos", "4", "--backgrounds", "starry"])
    assert refused.value.code == 2 and "invalid choice: 'starry'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_objects_need_as_many_colours_as_they_are_many():
    one_colour = [("circle", "red", "left"), ("square", "red", "up")]
    with pytest.raises(ValueError, match=r"2 objects of distinct colours need combinations in 2 colours"):
        sample_attributes(np.random.default_rng(0), one_colour, max_objects=2)
    drawn = sample_attributes(np.random.default_rng(0), one_colour, max_objects=1)
    assert [o["colour"] for o in drawn["objects"]] == ["red"]
