"""VideoShardDataModule: rank/worker splits, fixed batch counts, resume, skip counting, manifest checks."""

import numpy as np
import pytest
import torch

from flowvid.codecs.base import CodecMismatchError
from flowvid.data import VideoShardDataModule
from flowvid.data.manifest import new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample, npy_bytes

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}
CODEC = {"name": "tiny", "config_hash": "0123456789abcdef"}


def write_folder(folder, shards=8, per_shard=6, kind="raw", corrupt=None):
    """Shards whose keys say where they live ("s3-005": shard 3, sample 5); ``corrupt(key, sample)`` may damage."""
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for s in range(shards):
            for i in range(per_shard):
                key = f"s{s}-{i:03d}"
                value = np.full((2, 4, 4, 3), s, np.uint8)
                if kind == "raw":
                    sample = encode_sample(key, f"shard {s}", {"shard": s}, frames=value)
                else:
                    latent = np.full((1, 2, 2, 12), s, np.float16)
                    sample = encode_sample(key, f"shard {s}", {"shard": s}, latent=latent, first=value[0],
                                           text=np.ones((5, 8), np.float16), text_mask=np.arange(5) < 3)
                if corrupt is not None:
                    corrupt(key, sample)
                writer.write(sample)
    extra = {}
    if kind == "latent":
        extra = {"codec": CODEC, "latent_shape": [1, 2, 2, 12], "text_shape": [5, 8], "first_frame": True,
                 "text_encoder": {"name": "tiny-text", "width": "8"}}
    write_manifest(folder, new_manifest(kind, VIDEO, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards, **extra))
    return folder


def shard_of(key):
    return int(key.split("-")[0][1:])


def run_epoch(dm):
    return [batch["key"] for batch in dm.train_dataloader()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("shards"))


def test_two_ranks_two_workers_see_disjoint_shards_and_equal_batch_counts(folder, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = VideoShardDataModule(str(folder), batch_size=4, num_workers=2, shuffle_buffer=8, batches_per_epoch=5,
                                  seed=1)
        dm.setup("fit")
        batches = run_epoch(dm)
        assert len(batches) == 5 and all(len(b) == 4 for b in batches)
        # The DataLoader takes batches from workers in turn: even batches from one, odd from the other.
        workers = [{shard_of(k) for b in batches[w::2] for k in b} for w in (0, 1)]
        assert workers[0].isdisjoint(workers[1])
        seen[rank] = workers[0] | workers[1]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] <= {0, 2, 4, 6} and seen[1] <= {1, 3, 5, 7}


def test_a_rank_without_shards_is_a_clear_error(tmp_path, monkeypatch):
    write_folder(tmp_path, shards=2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=f"rank 2 of 3 receives no shard: {tmp_path} has 2 shard"):
        VideoShardDataModule(str(tmp_path)).setup("fit")


def test_batches_are_dicts_of_tensors_and_lists(folder):
    dm = VideoShardDataModule(str(folder), batch_size=3, batches_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 2, 4, 4, 3)
    for key, video, caption in zip(batch["key"], batch["video"], batch["caption"]):
        assert caption == f"shard {shard_of(key)}" and int(video[0, 0, 0, 0]) == shard_of(key)


def test_data_order_is_seeded_and_resumes_batch_exactly(folder):
    def module(seed=0):
        return VideoShardDataModule(str(folder), batch_size=2, num_workers=2, shuffle_buffer=6, batches_per_epoch=7,
                                    seed=seed)

    dm = module()
    epoch0, epoch1 = run_epoch(dm), run_epoch(dm)
    assert epoch0 != epoch1 and run_epoch(module(seed=1)) != epoch0
    assert dm.state_dict() == {"seed": 0, "epoch": 2, "batches_consumed": 0, "num_workers": 2}

    for done in (1, 3, 4):
        resumed = module()
        resumed.load_state_dict({"seed": 0, "epoch": 1, "batches_consumed": done, "num_workers": 2})
        assert run_epoch(resumed) == epoch1[done:]

    partway = module()
    loader = iter(partway.train_dataloader())
    for _ in range(3):
        next(loader)
    assert partway.state_dict()["batches_consumed"] == 3


def test_validation_reads_each_sample_once_or_a_fixed_count(folder):
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=5, num_workers=2)
    keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert sorted(keys) == sorted(f"s{s}-{i:03d}" for s in range(8) for i in range(6))
    fixed = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=5, num_workers=2, val_batches=13)
    assert len(list(fixed.val_dataloader())) == 13


def _damage(key, sample):
    if key == "s1-002":
        sample["txt"] = b"\xff not utf-8"
    elif key == "s2-004":
        sample["frames.npy"] = npy_bytes(np.zeros((3, 4, 4, 3), np.uint8))
    elif key == "s5-000":
        del sample["json"]


def test_skipped_samples_are_counted_exactly(tmp_path):
    write_folder(tmp_path, corrupt=_damage)
    shard = tmp_path / "shard-000006.tar"
    shard.write_bytes(shard.read_bytes()[:4000])  # truncated in its second sample: the first survives
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=4, num_workers=2)
    keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert len(keys) == 8 * 6 - 3 - 5
    assert dm.skipped_counts() == {"broken_tar": 1, "missing_field": 1, "bad_caption": 1, "bad_frames": 1}
    assert len(run_epoch(dm)) == dm.batches_per_epoch  # training goes on around the damage


def test_nothing_usable_is_a_clear_error(tmp_path):
    write_folder(tmp_path, shards=2, corrupt=lambda key, sample: sample.pop("txt"))
    dm = VideoShardDataModule(str(tmp_path), batch_size=2, batches_per_epoch=3)
    with pytest.raises(RuntimeError, match="no usable sample left"):
        run_epoch(dm)


def test_latent_shards_and_compatibility_checks(tmp_path):
    write_folder(tmp_path / "latent", shards=2, kind="latent")
    dm = VideoShardDataModule(str(tmp_path / "latent"), batch_size=3, batches_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (3, 1, 2, 2, 12)
    assert batch["text_tokens"].shape == (3, 5, 8) and batch["text_mask"].tolist()[0] == [True] * 3 + [False] * 2
    assert batch["first_frame"].shape == (3, 4, 4, 3) and "video" not in batch

    dm.check_compatible(CODEC, (1, 2, 2, 12), (2, 4, 4), {"name": "tiny-text", "width": "8"})
    with pytest.raises(CodecMismatchError, match="made with codec 'tiny'"):
        dm.check_compatible({"name": "tiny", "config_hash": "ffffffffffffffff"})
    with pytest.raises(ValueError, match=r"latents of shape \(1, 2, 2, 12\), but the model expects \(2, 2, 2, 12\)"):
        dm.check_compatible(latent_shape=(2, 2, 2, 12))
    with pytest.raises(ValueError, match=r"clips of \(frames, height, width\) \(2, 4, 4\)"):
        dm.check_compatible(video_shape=(8, 4, 4))
    with pytest.raises(ValueError, match="text embeddings"):
        dm.check_compatible(text_encoder={"name": "other", "width": "8"})

    write_folder(tmp_path / "raw", shards=2)
    mixed = VideoShardDataModule(str(tmp_path / "latent"), val_dir=str(tmp_path / "raw"))
    with pytest.raises(ValueError, match="differ in kind"):
        mixed.setup("fit")
