"""Shards whose bytes differ from their manifest's sha256, and what skip counts count."""

import logging
import tarfile

import numpy as np

from data_tools.describe import describe_folder
from data_tools.encode_latents import encode_latents
from data_tools.verify import verify_folder
from flowvid.data import VideoShardDataModule, load_manifest
from flowvid.data.manifest import new_manifest, write_manifest
from flowvid.data.shards import (
    ShardFolderWriter,
    encode_sample,
    iter_tar,
    listed_samples,
    listed_sha256,
    shard_paths,
)
from flowvid.lit.data_skips import by_reason, per_reason
from flowvid.registry import CODECS

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}


def write_folder(folder, keys_per_shard):
    """A raw folder, one shard per list of keys; clip ``k``'s pixels all hold its position in the folder."""
    position = 0
    shards = []
    for keys in keys_per_shard:
        with ShardFolderWriter(folder / f"part{len(shards)}") as writer:
            for key in keys:
                writer.write(encode_sample(key, f"caption {key}", {}, frames=np.full((2, 4, 4, 3), position, np.uint8)))
                position += 1
        (folder / f"part{len(shards)}" / "shard-000000.tar").rename(folder / f"shard-{len(shards):06d}.tar")
        shards.append({**writer.shards[0], "name": f"shard-{len(shards):06d}.tar"})
    manifest = new_manifest("raw", VIDEO, samples=sum(s["samples"] for s in shards), num_shards=len(shards),
                            shards=shards)
    write_manifest(folder, manifest)
    return manifest


def change_a_pixel(shard, value):
    """Change one pixel byte of the first clip whose pixels are ``value``: the shard still decodes."""
    data = bytearray(shard.read_bytes())
    data[data.index(bytes([value] * 32))] = 255 - value
    shard.write_bytes(bytes(data))


def cut_inside_the_second_sample(shard):
    with tarfile.open(shard) as archive:
        second = [member for member in archive.getmembers() if member.name.endswith(".json")][1]
    shard.write_bytes(shard.read_bytes()[:second.offset + 700])


def keys_read(folder, manifest, checked):
    skipped = []
    shards = shard_paths(folder, manifest)
    keys = [raw["__key__"] for raw in listed_samples(shards, [s["samples"] for s in manifest["shards"]], skipped,
                                                      sha256=listed_sha256(manifest) if checked else None)]
    return keys, [(item.get("shard") or item["key"], item["reason"].split(":")[0], item.get("samples"))
                  for item in skipped]


def test_a_shard_changed_after_it_was_written_gives_none_of_its_samples(tmp_path):
    manifest = write_folder(tmp_path, [["a", "b"], ["c", "d", "e"], ["f"]])
    change_a_pixel(tmp_path / "shard-000001.tar", 3)
    keys, skipped = keys_read(tmp_path, manifest, checked=True)
    assert keys == ["a", "b", "f"]
    assert skipped == [("shard-000001.tar", "checksum", 3)]
    # Unchecked, as training reads, the changed shard's clips still come through.
    assert keys_read(tmp_path, manifest, checked=False) == (["a", "b", "c", "d", "e", "f"], [])


def test_a_changed_shard_costs_its_repeated_keys_too_and_a_broken_one_stays_broken(tmp_path):
    manifest = write_folder(tmp_path, [["a", "b"], ["c", "c", "d"], ["e", "f", "g"]])
    change_a_pixel(tmp_path / "shard-000001.tar", 2)
    cut_inside_the_second_sample(tmp_path / "shard-000002.tar")
    keys, skipped = keys_read(tmp_path, manifest, checked=True)
    # A cut shard keeps the clips before its damage, as unchecked reading does, and is named for the cut.
    assert keys == ["a", "b", "e"]
    assert skipped == [("shard-000001.tar", "checksum", 3), ("shard-000002.tar", "broken_tar", 2)]


def test_encode_latents_verify_and_describe_agree_on_a_changed_shard(tmp_path):
    raw = tmp_path / "raw"
    write_folder(raw, [["a", "b"], ["c", "d"], ["e", "f"]])
    change_a_pixel(raw / "shard-000001.tar", 2)
    manifest = encode_latents(raw, tmp_path / "latent", CODECS.get("pixel")())
    assert manifest["samples"] == 4
    assert [(item["shard"], item["reason"].split(":")[0], item["samples"]) for item in manifest["skipped"]] == [
        ("shard-000001.tar", "checksum", 2)]
    written = {sample["__key__"] for shard in shard_paths(tmp_path / "latent", load_manifest(tmp_path / "latent"))
               for sample in iter_tar(shard)}
    assert written == {"a", "b", "e", "f"}
    report = verify_folder(raw)
    assert report["samples"] == manifest["samples"] and not report["ok"]
    assert any(problem.startswith("shard shard-000001.tar: checksum:") and "none of its 2 samples" in problem
               for problem in report["problems"])
    assert describe_folder(tmp_path / "latent")["skipped"] == manifest["skipped"]


def test_the_first_skip_of_a_shard_says_what_it_loses_at_each_read_and_where_to_count_the_damage(tmp_path, caplog):
    write_folder(tmp_path, [["a", "b", "c"], ["d", "e", "f"]])
    cut_inside_the_second_sample(tmp_path / "shard-000001.tar")
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=2)
    with caplog.at_level(logging.WARNING, logger="flowvid.data"):
        keys = [key for batch in dm.val_dataloader() for key in batch["key"]]
    assert keys == ["a", "b", "c", "d"]
    [warning] = [record.getMessage() for record in caplog.records if "shard-000001.tar" in record.getMessage()]
    assert "\n" not in warning
    assert "2 of its 3 listed samples are skipped each time it is read" in warning
    assert f"`flowvid data verify {tmp_path}`" in warning


def test_a_checksum_skip_has_a_count_of_its_own_in_the_run_totals():
    assert by_reason(per_reason({"checksum": 4, "broken_tar": 2})) == {"broken_tar": 2, "checksum": 4}


def test_fvd_reference_statistics_leave_out_a_changed_shard(tmp_path):
    from data_tools.fvd_stats import _clips

    raw = tmp_path / "raw"
    manifest = write_folder(raw, [["a", "b"], ["c", "d"]])
    change_a_pixel(raw / "shard-000000.tar", 1)
    skipped = []
    clips = list(_clips(raw, manifest, skipped))
    assert [int(clip[0, 0, 0, 0]) for clip in clips] == [2, 3]  # the clips of the unchanged shard only
    assert [(item["shard"], item["reason"].split(":")[0], item["samples"]) for item in skipped] == [
        ("shard-000000.tar", "checksum", 2)]
