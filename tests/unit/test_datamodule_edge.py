"""Edge cases of shard folders: mixture settings, manifests of the wrong types, and what verify and describe say."""

import json
import re
import shutil

import numpy as np
import pytest

from data_tools.cli import main as data_main
from data_tools.verify import verify_folder
from flowvid.data import VideoShardDataModule
from flowvid.data.manifest import ManifestError, load_manifest, new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}
CODEC = {"name": "tiny", "config_hash": "0123456789abcdef"}


def write_raw_folder(folder, name, shards=2, per_shard=3):
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for index in range(shards * per_shard):
            writer.write(encode_sample(f"{name}{index:03d}", "clip", {}, frames=np.zeros((2, 4, 4, 3), np.uint8)))
    write_manifest(folder, new_manifest("raw", VIDEO, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards))
    return str(folder)


def write_text_folder(folder, name, text_length):
    """Latent shards with cached text embeddings of ``text_length`` tokens."""
    with ShardFolderWriter(folder, max_samples=3) as writer:
        for index in range(6):
            writer.write(encode_sample(f"{name}{index}", "clip", {}, latent=np.ones((1, 2, 2, 12), np.float16),
                                       text=np.ones((text_length, 8), np.float16),
                                       text_mask=np.arange(text_length) < 3))
    write_manifest(folder, new_manifest("latent", VIDEO, codec=CODEC, latent_shape=[1, 2, 2, 12],
                                        text_encoder={"name": "tiny-text", "width": "8"}, text_shape=[text_length, 8],
                                        samples=writer.samples, num_shards=len(writer.shards), shards=writer.shards))
    return str(folder)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return write_raw_folder(root / "a", "a"), write_raw_folder(root / "b", "b")


@pytest.mark.parametrize("weights, message", [
    ([float("inf"), 1], "train_weights must all be > 0 and finite numbers, got [inf, 1]"),
    ([float("nan"), 1], "train_weights must all be > 0 and finite numbers"),
    ([0, 0], "train_weights must all be > 0 and finite numbers"),
    ([-1, 1], "train_weights must all be > 0 and finite numbers"),
    (["3", 1], "train_weights must all be > 0 and finite numbers, got ['3', 1]"),
    (3, "train_weights must be a list of one number per train_dir folder, got 3"),
    ([1, 2, 3], "train_weights has 3 weight(s) for 2 train_dir folder(s)"),
])
def test_mixture_weights_that_are_not_one_finite_positive_number_per_folder_are_refused_at_once(two_folders, weights,
                                                                                               message):
    # An infinite weight used to pass and fail at the first draw of the first epoch, inside a loader worker.
    with pytest.raises(ValueError, match=re.escape(message)):
        VideoShardDataModule(list(two_folders), train_weights=weights)


def test_a_folder_listed_twice_under_another_spelling_or_through_a_link_is_refused(two_folders, tmp_path):
    first, _ = two_folders
    (tmp_path / "link").symlink_to(first)
    with pytest.raises(ValueError, match=re.escape(f"train_dir lists {first} more than once (also as "
                                                   f"{tmp_path / 'link'})")):
        VideoShardDataModule([first, str(tmp_path / "link")])
    with pytest.raises(ValueError, match=re.escape(f"val_dir lists {first} more than once")):
        VideoShardDataModule(first, val_dir=[first, first + "/"])


def test_a_mixture_whose_cached_text_differs_in_length_is_refused_before_training(tmp_path):
    # The training stream checks every folder's samples by the first folder's manifest: the second folder's
    # samples were all skipped, and the stream stopped mid-epoch once that folder ran dry.
    five, seven = write_text_folder(tmp_path / "five", "f", 5), write_text_folder(tmp_path / "seven", "s", 7)
    dm = VideoShardDataModule([five, seven], batch_size=2, batches_per_epoch=20)
    with pytest.raises(ValueError, match=re.escape(f"the shards in {five} and in {seven} differ in text_shape: "
                                                   "[5, 8] vs [7, 8]")):
        dm.setup("fit")


def test_batches_larger_than_the_data_and_more_workers_than_shards_still_read_each_sample(two_folders):
    train, val = two_folders
    dm = VideoShardDataModule(train, val_dir=val, batch_size=100, num_workers=3, batches_per_epoch=2)
    dm.setup("fit")
    assert [len(batch["key"]) for batch in dm.train_dataloader()] == [100, 100]
    validated = [key for batch in dm.val_dataloader() for key in batch["key"]]
    assert sorted(validated) == [f"b{index:03d}" for index in range(6)]


WRONG_TYPES = [
    (lambda m: m.update(samples="6"), "'samples' must be an integer >= 0, got '6'"),
    (lambda m: m.update(num_shards=2.0), "'num_shards' must be an integer >= 0, got 2.0"),
    (lambda m: m["video"].update(fps="8"), "video 'fps' must be a finite number > 0 or null, got '8'"),
    (lambda m: m["shards"][0].update(bytes="100"), "'shards' must list objects with a 'name', a 'sha256' and a "
                                                    "count of 'samples' >= 0 (and of 'bytes', when given)"),
    (lambda m: m.update(source="made by hand"), "'source' must be a JSON object or null, got 'made by hand'"),
    (lambda m: m.update(skipped="none"), "'skipped' must list objects with a 'reason'"),
    (lambda m: m.update(first_frame="no"), "'first_frame' must be true or false, got 'no'"),
    (lambda m: m.update(text_shape="5x8"), "'text_shape' must be a list of integers >= 1 or null, got '5x8'"),
    (lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), "shard shard-000000.tar is listed more than once"),
    (lambda m: m["shards"][0].update(name="../a/shard-000000.tar"),
     "shard names must be file names inside the folder, got '../a/shard-000000.tar'"),
    (lambda m: m.update(format_version=2), "format_version 2 was written by a newer flowvid, which this one "
                                           "(format_version 1) cannot read: upgrade flowvid"),
    (lambda m: m.update(format_version=True), "format_version True is not supported (expected 1)"),
]


@pytest.mark.parametrize("change, message", WRONG_TYPES)
def test_a_manifest_of_the_wrong_types_is_one_error_naming_the_field_in_every_reader(two_folders, tmp_path, change,
                                                                                    message, capsys):
    folder = tmp_path / "changed"
    shutil.copytree(two_folders[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    expected = re.escape(f"{folder / 'manifest.json'}: {message}")
    with pytest.raises(ManifestError, match=expected):
        load_manifest(folder)
    with pytest.raises(ManifestError, match=expected):
        VideoShardDataModule(str(folder)).setup("fit")
    assert data_main(["describe", str(folder)]) == 2  # was a traceback for fps, bytes, source and skipped
    assert data_main(["verify", str(folder)]) == 1
    assert message.split(",")[0] in " ".join(capsys.readouterr().out.split())


def test_verify_calls_a_folder_of_no_sample_damaged(tmp_path):
    write_manifest(tmp_path, new_manifest("raw", VIDEO))
    report = verify_folder(tmp_path)
    assert not report["ok"] and report["problems"] == ["the manifest lists no sample: write the folder again"]


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_text("not a folder"), lambda p: None],
                         ids=["empty folder", "file", "missing"])
def test_verify_and_describe_of_what_is_not_a_shard_folder_say_so_in_one_line(tmp_path, make, capsys):
    path = tmp_path / "data"
    make(path)
    assert data_main(["verify", str(path)]) == 2
    verified = capsys.readouterr()
    assert data_main(["describe", str(path)]) == 2
    described = capsys.readouterr()
    # One line each, the same after the command's name: the folder is not one to read.
    assert verified.err.startswith("flowvid data verify: error: ") and verified.err.count("\n") == 1
    assert verified.err.partition(": error: ")[2] == described.err.partition(": error: ")[2]
    said = described.err.partition(": error: ")[2]
    assert said.count(f"{path} is not a finished shard folder") == 1 or said.startswith(f"{path} does not exist")
    assert verified.out == described.out == ""


def test_verify_names_every_unlisted_shard_beside_the_listed_ones(two_folders, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(two_folders[0], folder)
    shutil.copy(folder / "shard-000000.tar", folder / "shard-000007.tar")
    shutil.copy(folder / "shard-000000.tar", folder / "old.tar")
    report = verify_folder(folder)
    assert not report["ok"] and report["samples"] == 6
    assert report["problems"] == ["shard old.tar is not in the manifest",
                                  "shard shard-000007.tar is not in the manifest"]
