"""Promises of the data code that only show at a boundary: workers beyond the shards, a resume of a resume,
keys repeated across distant shards, shards that are not yet (or never) complete, the order of the final
renames, a process that owns the second half of the shards, and a validation split of nearly everything."""

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.encode_latents import _write_latents
from data_tools.from_videos import split_videos
from flowvid.codecs.pixel import PixelCodec
from flowvid.data import VideoShardDataModule
from flowvid.data.manifest import MANIFEST_NAME, load_manifest, new_manifest, write_manifest
from flowvid.data.shards import (ShardFolderWriter, encode_sample, keys_held_earlier, listed_samples,
                                 replace_shard_folder, shard_paths)

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}


def clip(key):
    return encode_sample(key, f"caption of {key}", {}, frames=np.zeros((2, 4, 4, 3), np.uint8))


def write_raw_folder(folder, keys, per_shard):
    """A raw shard folder holding ``keys`` in order, ``per_shard`` clips to a shard, with its manifest."""
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for key in keys:
            writer.write(clip(key))
    write_manifest(folder, new_manifest("raw", VIDEO, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards))
    return Path(folder)


def clip_keys(count):
    return [f"c{index:03d}" for index in range(count)]


# --- validation with more workers than shards ---------------------------------------------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
@pytest.mark.parametrize("shards, workers", [(2, 3), (1, 2), (3, 4)])
def test_a_fixed_validation_count_holds_with_one_worker_more_than_shards(tmp_path, shards, workers):
    # The last worker is dealt no shard; it must read them all rather than give no batch at all.
    folder = write_raw_folder(tmp_path / "val", clip_keys(4 * shards), per_shard=4)
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=2, num_workers=workers, val_batches=6)
    assert len(list(dm.val_dataloader())) == 6


# --- resume of a resume -------------------------------------------------------------------------


def training_module(folder):
    return VideoShardDataModule(str(folder), batch_size=2, num_workers=2, shuffle_buffer=6, batches_per_epoch=7)


def keys_of_pass(dm):
    return [batch["key"] for batch in dm.train_dataloader()]


def test_a_resumed_stream_checkpointed_again_resumes_where_an_uninterrupted_one_is(tmp_path):
    folder = write_raw_folder(tmp_path / "train", clip_keys(24), per_shard=6)
    uninterrupted = training_module(folder)
    keys_of_pass(uninterrupted)
    second_epoch = keys_of_pass(uninterrupted)

    resumed = training_module(folder)
    resumed.load_state_dict({"seed": 0, "epoch": 1, "batches_consumed": 3, "num_workers": 2})
    loader = iter(resumed.train_dataloader())
    taken = [next(loader)["key"] for _ in range(2)]
    state = resumed.state_dict()
    del loader
    assert taken == second_epoch[3:5]
    assert (state["epoch"], state["batches_consumed"]) == (1, 5)

    again = training_module(folder)
    again.load_state_dict(state)
    assert keys_of_pass(again) == second_epoch[5:]


# --- keys repeated across shards ----------------------------------------------------------------


def test_a_key_in_the_first_and_third_shard_is_a_duplicate(tmp_path):
    # Shards [a b] [c d] [a e]: the shard between them does not hold "a", yet the third one repeats it.
    folder = write_raw_folder(tmp_path / "raw", ["a", "b", "c", "d", "a", "e"], per_shard=2)
    shards = shard_paths(folder, load_manifest(folder))
    assert keys_held_earlier(shards) == {str(shards[2]): frozenset({"a"})}

    skipped = []
    keys = [raw["__key__"] for raw in listed_samples(shards, [2, 2, 2], skipped, keys_held_earlier(shards))]
    assert keys == ["a", "b", "c", "d", "e"]
    assert [item["key"] for item in skipped] == ["a"]
    assert skipped[0]["reason"].startswith("duplicate_key")


# --- shards complete or absent ------------------------------------------------------------------


def test_a_shard_being_written_has_no_shard_name_until_it_is_complete(tmp_path):
    writer = ShardFolderWriter(tmp_path, max_samples=3)
    for key in ("a", "b"):
        writer.write(clip(key))
    # Were the process killed now, no file would pass for a shard.
    assert list(tmp_path.glob("shard-*.tar")) == []
    assert [path.name for path in tmp_path.glob("shard-*.tar.tmp")] == ["shard-000000.tar.tmp"]
    shards = writer.close()
    assert [path.name for path in tmp_path.iterdir()] == ["shard-000000.tar"]
    assert shards[0]["samples"] == 2


def staged_run(staging, shards=2):
    """A finished run's folder: ``shards`` shards of two clips, a summary and the manifest listing them."""
    folder = write_raw_folder(staging, clip_keys(2 * shards), per_shard=2)
    (folder / "summary.json").write_text("{}")
    return folder


def failing_replace(monkeypatch, failing_call):
    """Make the ``failing_call``-th os.replace (from 1) raise, as a full disk or a kill would stop it."""
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(Path(target).name)
        if len(calls) == failing_call:
            raise OSError("no space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def listed_shards_present(folder):
    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.exists():
        return True
    names = [shard["name"] for shard in json.loads(manifest.read_text())["shards"]]
    return all((Path(folder) / name).is_file() for name in names)


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])
def test_a_folder_replaced_halfway_never_lists_shards_it_lacks(tmp_path, monkeypatch, failing_call):
    staging = staged_run(tmp_path / "staging", shards=3)
    calls = failing_replace(monkeypatch, failing_call)
    with pytest.raises(OSError):
        replace_shard_folder(staging, tmp_path / "out")
    assert listed_shards_present(tmp_path / "out"), f"stopped at rename {failing_call} of {calls}"


def test_the_manifest_is_the_last_file_moved_in(tmp_path, monkeypatch):
    staging = staged_run(tmp_path / "staging")
    calls = failing_replace(monkeypatch, failing_call=0)
    replace_shard_folder(staging, tmp_path / "out")
    assert calls[-1] == MANIFEST_NAME and sorted(calls) == sorted(path.name for path in (tmp_path / "out").iterdir())


# --- encode-latents on the second of two processes ----------------------------------------------


def encode_as_second_of_two(source, out):
    return _write_latents(source, load_manifest(source), out, PixelCodec(), (2, 4, 4, 3), None, False, 4, "cpu",
                          1000, None, rank=1, world_size=2)


def zero_fill_from_sample(shard, index):
    """Overwrite ``shard`` with zeros from the ``index``-th sample on: it reads as an archive that ends early."""
    with tarfile.open(shard) as archive:
        starts = {}
        for member in archive.getmembers():
            starts.setdefault(member.name.split(".")[0], member.offset)
    start = list(starts.values())[index]
    with open(shard, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(start)
        file.write(bytes(size - start))


def test_the_second_process_checks_its_shards_against_their_own_counts(tmp_path):
    # Shards of 5 and 2 clips: the second process owns the short last shard, whose count is not the first's.
    source = write_raw_folder(tmp_path / "raw", clip_keys(7), per_shard=5)
    part = encode_as_second_of_two(source, tmp_path / "whole")
    assert part["skipped"] == []
    assert [shard["samples"] for shard in part["shards"]] == [2]

    last = shard_paths(source, load_manifest(source))[1]
    zero_fill_from_sample(last, 1)
    part = encode_as_second_of_two(source, tmp_path / "cut")
    assert [(item["shard"], item["samples"]) for item in part["skipped"]] == [(last.name, 1)]
    assert part["skipped"][0]["reason"].startswith("broken_tar")
    assert [shard["samples"] for shard in part["shards"]] == [1]


# --- validation split ---------------------------------------------------------------------------


def split_position(name):
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


@pytest.mark.parametrize("videos", [2, 5])
def test_a_high_validation_fraction_keeps_a_video_for_training(videos):
    names = [f"clip{index}.mp4" for index in range(videos)]
    fraction = 0.999
    assert all(split_position(name) < fraction for name in names)  # every video falls in the held-out share
    captioned = [(Path("/videos") / name, f"caption {name}") for name in names]
    kept, held = split_videos(captioned, {path: path.name for path, _ in captioned}, fraction)
    assert len(kept) == 1 and len(held) == videos - 1
    assert sorted(kept + held) == sorted(captioned)
