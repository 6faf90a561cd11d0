"""Settings a multi-process run cannot work with stop every process alike, before training, in one line:
a process that stopped alone would leave the others waiting for it in a collective."""

from __future__ import annotations

import pytest

from flowvid.data import VideoShardDataModule, write_synthetic_dataset


def test_every_rank_refuses_more_processes_than_validation_shards(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, num_videos=8, frames=4, size=8, val_videos=8, shard_samples=4)  # 2 val shards
    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        data = VideoShardDataModule(str(tmp_path / "train"), val_dir=str(tmp_path / "val"), batch_size=2)
        with pytest.raises(ValueError, match="val: rank 3 of 4 receives no shard, the folder has 2 shard"):
            data.setup("fit")
