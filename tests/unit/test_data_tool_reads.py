"""The data tools read a folder's manifest once and check their options once, before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.cli import main as data_main
from flowvid.data import synthetic
from flowvid.data.manifest import MANIFEST_NAME, new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample


def raw_shard_folder(folder: Path, clips: int = 3) -> Path:
    rng = np.random.default_rng(0)
    with ShardFolderWriter(folder) as writer:
        for index in range(clips):
            frames = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
            writer.write(encode_sample(f"clip{index}", "a red circle", {}, frames=frames))
    video = {"frames": 2, "height": 8, "width": 8, "fps": 8.0}
    write_manifest(folder, new_manifest("raw", video, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards))
    return folder


def count_manifest_reads(monkeypatch) -> list[Path]:
    """The manifest files read from now on, once per read."""
    reads: list[Path] = []
    read_text = Path.read_text

    def counting(path: Path, *args, **kwargs) -> str:
        if path.name == MANIFEST_NAME:
            reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    return reads


def test_fvd_stats_reads_the_manifest_once(tmp_path, monkeypatch):
    # Read once, the key, the cache check and the clips all describe the same shards, even when the
    # folder is rewritten while the command runs.
    source = raw_shard_folder(tmp_path / "raw")
    reads = count_manifest_reads(monkeypatch)
    assert data_main(["fvd-stats", str(source), "--extractor", "pixel-stats"]) == 0
    assert reads == [source / MANIFEST_NAME]


def test_fvd_reads_a_reference_folders_manifest_once(tmp_path, monkeypatch):
    reference = raw_shard_folder(tmp_path / "raw")
    generated = tmp_path / "generated"
    generated.mkdir()
    for index in range(2):
        np.save(generated / f"sample{index}.npy", np.full((2, 8, 8, 3), 40 * index, np.uint8))
    reads = count_manifest_reads(monkeypatch)
    assert data_main(["fvd", str(generated), "--reference", str(reference), "--extractor", "pixel-stats",
                      "--out", str(tmp_path / "fvd.json")]) == 0
    assert reads == [reference / MANIFEST_NAME]


def test_make_synthetic_checks_its_options_and_folder_once(tmp_path, monkeypatch):
    checked = {"options": 0, "disk": 0}
    check_clip_size, disk_usage = synthetic._check_clip_size, synthetic.shutil.disk_usage

    def counting_options(*args, **kwargs):
        checked["options"] += 1
        return check_clip_size(*args, **kwargs)

    def counting_disk(path):
        checked["disk"] += 1
        return disk_usage(path)

    monkeypatch.setattr(synthetic, "_check_clip_size", counting_options)
    monkeypatch.setattr(synthetic.shutil, "disk_usage", counting_disk)
    assert data_main(["make-synthetic", "--out", str(tmp_path), "--num-videos", "2", "--val-videos", "1",
                      "--frames", "2", "--size", "8"]) == 0
    assert checked == {"options": 1, "disk": 1}
