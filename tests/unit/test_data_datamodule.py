"""VideoShardDataModule: rank/worker splits, fixed batch counts, resume, skip counting, manifest checks, mixtures."""

import hashlib
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch

from flowvid.codecs.base import CodecMismatchError
from flowvid.data import VideoShardDataModule
from flowvid.data.manifest import load_manifest, new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample, npy_bytes

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}
CODEC = {"name": "tiny", "config_hash": "0123456789abcdef"}


def write_folder(folder, shards=8, per_shard=6, kind="raw", corrupt=None, name="s", video=VIDEO):
    """Shards whose keys say where they live ("s3-005": shard 3, sample 5); ``corrupt(key, sample)`` may damage."""
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for s in range(shards):
            for i in range(per_shard):
                key = f"{name}{s}-{i:03d}"
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
    write_manifest(folder, new_manifest(kind, video, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards, **extra))
    return folder


def shard_of(key):
    return int(key.split("-")[0][1:])


def run_epoch(dm):
    return [batch["key"] for batch in dm.train_dataloader()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("shards"))


def write_uneven_folder(folder, samples=31, per_shard=10):
    """``samples`` clips "c000", ... in shards of ``per_shard``: the last shard holds the rest (here one clip)."""
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for index in range(samples):
            writer.write(encode_sample(f"c{index:03d}", "clip", {}, frames=np.zeros((2, 4, 4, 3), np.uint8)))
    write_manifest(folder, new_manifest("raw", VIDEO, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards))
    return folder


def test_every_rank_and_worker_draws_evenly_from_every_shard(tmp_path, monkeypatch):
    # Shards of 10, 10, 10 and 1 clips on two ranks of two workers: each worker gives a quarter of the
    # batches, so one dealt the last shard alone would give its single clip a quarter of the time.
    folder = write_uneven_folder(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    epochs = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = VideoShardDataModule(str(folder), batch_size=4, num_workers=2, shuffle_buffer=8, batches_per_epoch=60)
        dm.setup("fit")
        epochs[rank] = run_epoch(dm)
        assert len(epochs[rank]) == 60 and all(len(batch) == 4 for batch in epochs[rank])
    assert epochs[0] != epochs[1]  # every rank with randomness of its own
    keys = [key for rank in (0, 1) for batch in epochs[rank] for key in batch]
    assert set(keys) == {f"c{index:03d}" for index in range(31)}
    assert keys.count("c030") / len(keys) < 0.08  # a fair share is 1/31


def test_a_rank_without_a_validation_shard_is_a_clear_error_while_training_needs_none_of_its_own(tmp_path,
                                                                                                monkeypatch):
    write_folder(tmp_path, shards=2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dm = VideoShardDataModule(str(tmp_path), batch_size=2, batches_per_epoch=3)
    dm.setup("fit")
    assert len(run_epoch(dm)) == 3
    with pytest.raises(ValueError) as refused:
        VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path)).setup("fit")
    assert str(refused.value).startswith(f"{tmp_path}: rank 2 of 3 receives no shard, the folder has 2 shard(s)")
    assert str(refused.value).count(str(tmp_path)) == 1


def test_a_manifest_that_lists_no_shard_is_named_with_what_to_do(tmp_path):
    write_folder(tmp_path, shards=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "num_shards": 0, "samples": 0}))
    with pytest.raises(ValueError, match=f"{tmp_path}: the manifest lists no shards: .*write the folder again"):
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
    assert dm.state_dict() == {"seed": 0, "epoch": 2, "batches_consumed": 0, "batch_size": 2, "num_workers": 2,
                               "world_size": 1, "mixture": None, "skipped": {}}

    for done in (1, 3, 4):
        resumed = module()
        resumed.load_state_dict({"seed": 0, "epoch": 1, "batches_consumed": done, "num_workers": 2})
        assert run_epoch(resumed) == epoch1[done:]

    with pytest.warns(UserWarning, match="world_size=1 where the run had 2"):  # resumed on fewer processes
        module().load_state_dict({**dm.state_dict(), "world_size": 2})
    with pytest.warns(UserWarning, match="batch_size=2 where the run had 4"):
        module().load_state_dict({**dm.state_dict(), "batch_size": 4})

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


def validation_setup_warnings(folder, **settings):
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    return dm, [str(warning.message) for warning in caught]


def repeats_warning(folder, reads, held, advice):
    return (f"{folder}: validation reads val_batches × batch_size = {reads} clips per rank, but {held}: some clips "
            f"are read more than once and weigh more in the validation metrics. {advice}")


def test_val_batches_that_read_a_clip_twice_on_some_rank_are_warned_about_once_with_the_counts(tmp_path,
                                                                                                monkeypatch):
    # Shards of 10, 10, 10 and 1 clips on two ranks: rank 0 reads shards 0 and 2 (20 clips), rank 1
    # shards 1 and 3 (11 clips), so 3 batches of 4 read one of rank 1's clips twice, 2 batches none.
    folder = write_uneven_folder(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _, said = validation_setup_warnings(folder, batch_size=4, val_batches=3)
    held = "the shards list 20 clips for rank 0, 11 for rank 1"
    assert said == [repeats_warning(folder, "3 × 4 = 12", held, "Lower val_batches to at most 2, or add clips.")]
    assert validation_setup_warnings(folder, batch_size=4, val_batches=2)[1] == []
    monkeypatch.setenv("RANK", "1")
    for val_batches, distinct in ((3, 11), (2, 8)):
        rank_1, said = validation_setup_warnings(folder, batch_size=4, val_batches=val_batches)
        assert said == []  # every rank finds the same in the manifest: rank 0 says it
        keys = [key for batch in rank_1.val_dataloader() for key in batch["key"]]
        assert len(keys) == 4 * val_batches and len(set(keys)) == distinct


def test_a_single_rank_is_warned_exactly_when_val_batches_read_more_clips_than_the_folder_holds(tmp_path):
    folder = write_uneven_folder(tmp_path)  # 31 clips
    assert validation_setup_warnings(folder, batch_size=4, val_batches=7)[1] == []
    assert validation_setup_warnings(folder, batch_size=4)[1] == []  # one pass reads each clip once
    _, said = validation_setup_warnings(folder, batch_size=4, val_batches=8)
    assert said == [repeats_warning(folder, "8 × 4 = 32", "the folder holds 31",
                                    "Lower val_batches to at most 7, or add clips.")]


def test_a_batch_larger_than_a_rank_holds_is_warned_about_with_what_to_change(tmp_path, monkeypatch):
    folder = write_uneven_folder(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, said = validation_setup_warnings(folder, batch_size=12, val_batches=1)
    assert said == [repeats_warning(folder, "1 × 12 = 12", "the shards list 20 clips for rank 0, 11 for rank 1",
                                    "Add clips (at least 12 per rank), or lower batch_size to at most 11.")]


def validation_keys(dm):
    return [key for batch in dm.val_dataloader() for key in batch["key"]]


def test_a_worker_that_reads_clips_again_is_warned_about_though_its_rank_holds_enough(tmp_path):
    # Shards of 10, 10, 10 and 1 clips, two workers: worker 0 reads shards 0 and 2 (20 clips) for
    # batches 0, 2, 4, ..., worker 1 shards 1 and 3 (11 clips) for batches 1, 3, 5, ...
    folder = write_uneven_folder(tmp_path)
    enough, said = validation_setup_warnings(folder, batch_size=4, val_batches=5, num_workers=2)
    assert said == [] and len(set(validation_keys(enough))) == 20
    short, said = validation_setup_warnings(folder, batch_size=4, val_batches=7, num_workers=2)
    assert said == [f"{folder}: with num_workers=2, worker 1 of rank 0 reads 12 clips for its 3 batch(es) from "
                    "shards that list 11: some clips are read more than once and weigh more in the validation "
                    "metrics. Lower num_workers, or write the folder in more shards."]
    assert len(set(validation_keys(short))) < 28  # 28 clips of the 31 asked for: some came twice


def test_a_worker_without_a_shard_of_its_own_is_warned_about(tmp_path):
    folder = write_uneven_folder(tmp_path)  # four shards
    dm, said = validation_setup_warnings(folder, batch_size=1, val_batches=5, num_workers=5)
    assert said == [f"{folder}: with num_workers=5, rank 0 has 4 validation shard(s) for 5 workers, and worker 4 "
                    "reads the shards of the others again: some clips are read more than once and weigh more in "
                    "the validation metrics. Lower num_workers, or write the folder in more shards."]
    assert len(set(validation_keys(dm))) < 5


def add_empty_shard(folder, position):
    """An empty shard, listed with no sample, put ``position``-th in the manifest."""
    empty = folder / "shard-empty.tar"
    with tarfile.open(empty, "w"):
        pass
    data = empty.read_bytes()
    manifest = load_manifest(folder)
    entry = {"name": empty.name, "samples": 0, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["shards"].insert(position, entry)
    write_manifest(folder, {**manifest, "num_shards": len(manifest["shards"])})


@pytest.mark.parametrize("val_batches", [None, 2])
def test_a_rank_whose_validation_shards_list_no_clip_is_refused_on_every_rank(tmp_path, monkeypatch, val_batches):
    write_folder(tmp_path, shards=2, per_shard=3)
    add_empty_shard(tmp_path, 1)  # rank 1 of 2 reads it alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=2, val_batches=val_batches)
        with pytest.raises(ValueError) as refused:
            dm.setup("fit")
        assert str(refused.value) == (
            f"{tmp_path}: the shards that rank 1 of 2 validates on (shard-empty.tar) list no clip, so it has "
            "nothing to read. Write the folder again with its clips spread over its shards, or run on fewer "
            "devices.")


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
    # The five samples the cut shard lost count as five, though the shard broke once.
    assert dm.skipped_counts() == {"broken_tar": 5, "missing_field": 1, "bad_caption": 1, "bad_frames": 1}
    assert len(run_epoch(dm)) == dm.batches_per_epoch  # training goes on around the damage


def test_skip_counts_go_on_from_where_a_resumed_run_left_them(tmp_path):
    write_folder(tmp_path, corrupt=_damage)
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=4, num_workers=2)
    list(dm.val_dataloader())
    before = dm.skipped_counts()
    assert before == {"missing_field": 1, "bad_caption": 1, "bad_frames": 1}
    resumed = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=4, num_workers=2)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.skipped_counts() == before
    list(resumed.val_dataloader())
    assert resumed.skipped_counts() == {reason: 2 * count for reason, count in before.items()}


def test_a_resumed_training_stream_counts_each_skipped_sample_once(tmp_path):
    write_folder(tmp_path, corrupt=_damage)

    def stream(state=None, batches=12):
        dm = VideoShardDataModule(str(tmp_path), batch_size=4, shuffle_buffer=8, batches_per_epoch=12)
        if state is not None:
            dm.load_state_dict(state)
        loader = iter(dm.train_dataloader())
        for _ in range(batches):
            next(loader)
        return dm

    whole = stream()
    interrupted = stream(batches=8)
    assert interrupted.skipped_counts()  # the batches read again on resuming hold skipped samples
    resumed = stream(interrupted.state_dict(), batches=4)
    assert resumed.skipped_counts() == whole.skipped_counts()


def test_a_shard_whose_tail_reads_as_zeros_is_counted_not_silently_shorter(tmp_path):
    """Zeros look like the end of an archive: only the manifest's count of the shard's samples tells."""
    write_folder(tmp_path)
    shard = tmp_path / "shard-000003.tar"
    with tarfile.open(shard) as archive:
        lost = next(member for member in archive.getmembers() if member.name.startswith("s3-002"))
    data = shard.read_bytes()
    shard.write_bytes(data[:lost.offset] + bytes(len(data) - lost.offset))
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=4, num_workers=2)
    keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert len(keys) == 8 * 6 - 4 and "s3-001" in keys
    assert dm.skipped_counts() == {"broken_tar": 4}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_nothing_usable_is_a_clear_error(tmp_path, num_workers):
    write_folder(tmp_path, shards=2, corrupt=lambda key, sample: sample.pop("txt"))
    dm = VideoShardDataModule(str(tmp_path), batch_size=2, batches_per_epoch=3, num_workers=num_workers)
    with pytest.raises(RuntimeError, match="no usable sample left in 2 shard"):
        run_epoch(dm)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_and_validation_go_on_around_a_broken_shard(tmp_path, num_workers):
    write_folder(tmp_path, shards=2)
    (tmp_path / "shard-000001.tar").write_bytes(b"not a tar archive")
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=2, num_workers=num_workers,
                              batches_per_epoch=4)
    dm.setup("fit")
    epoch = run_epoch(dm)
    assert len(epoch) == 4 and {shard_of(key) for keys in epoch for key in keys} == {0}
    lost_in_training = dm.skipped_counts()["broken_tar"]
    assert lost_in_training > 0 and lost_in_training % 6 == 0  # every read of the shard loses its six samples
    keys = [key for batch in dm.val_dataloader() for key in batch["key"]]
    assert sorted(keys) == [f"s0-{i:03d}" for i in range(6)]
    assert dm.skipped_counts() == {"broken_tar": lost_in_training + 6}
    # A fixed count of validation batches: with two workers, the second one's only shard is the broken one;
    # it must read the first's, not stop.
    fixed = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=2, num_workers=num_workers,
                                 val_batches=5)
    batches = list(fixed.val_dataloader())
    assert len(batches) == 5 and {shard_of(key) for batch in batches for key in batch["key"]} == {0}


def repeat_keys(key, sample):
    """Shard 1's first sample takes shard 0's first key, and shard 1 holds "s1-004" twice, once right after
    the first (two samples of one key in a row must not merge into one)."""
    renamed = {"s1-000": "s0-000", "s1-002": "s1-004", "s1-005": "s1-004"}
    sample["__key__"] = renamed.get(key, key)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_reads_a_repeated_key_once_and_counts_the_others(tmp_path, num_workers):
    write_folder(tmp_path, shards=3, corrupt=repeat_keys)
    dm = VideoShardDataModule(str(tmp_path), val_dir=str(tmp_path), batch_size=4, num_workers=num_workers)
    keys = [key for batch in dm.val_dataloader() for key in batch["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 3 * 6 - 3
    assert dm.skipped_counts() == {"duplicate_key": 3}
    first_shard = [key for batch in dm.val_dataloader() for key in batch["key"] if key == "s0-000"]
    assert first_shard == ["s0-000"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_skips_and_counts_a_key_repeated_within_a_shard(tmp_path, num_workers):
    write_folder(tmp_path, shards=2, corrupt=repeat_keys)
    dm = VideoShardDataModule(str(tmp_path), batch_size=4, num_workers=num_workers, batches_per_epoch=6)
    epoch = run_epoch(dm)
    assert len(epoch) == 6 and all(len(keys) == 4 for keys in epoch)
    counts = dm.skipped_counts()
    assert set(counts) == {"duplicate_key"} and counts["duplicate_key"] % 2 == 0  # two per read of shard 1


def test_a_codec_mismatch_names_the_settings_that_differ_also_in_older_folders(tmp_path):
    # Folders made before codec identities carried their config record it as codec_config only.
    write_folder(tmp_path, shards=1, kind="latent")
    manifest = load_manifest(tmp_path)
    write_manifest(tmp_path, {**manifest, "codec_config": {"patch_size": 1, "temporal_patch": 1}})
    dm = VideoShardDataModule(str(tmp_path), batch_size=1, batches_per_epoch=1)
    model = {"name": "tiny", "config_hash": "fedcba9876543210", "config": {"patch_size": 2, "temporal_patch": 1}}
    with pytest.raises(CodecMismatchError, match=r"they differ in patch_size \(1 there, 2 here\); encode"):
        dm.check_compatible(model)
    # A folder whose identity carries the config mixes with an older one of the same codec.
    newer = write_folder(tmp_path / "newer", shards=1, kind="latent", name="n")
    write_manifest(newer, {**load_manifest(newer), "codec": {**CODEC, "config": {"patch_size": 1, "temporal_patch": 1}}})
    VideoShardDataModule([str(tmp_path), str(newer)], batch_size=1, batches_per_epoch=1).setup("fit")


def test_codec_and_text_mismatches_name_only_the_keys_that_differ_and_the_two_ways_out(tmp_path):
    write_folder(tmp_path, shards=1, kind="latent")
    write_manifest(tmp_path, {**load_manifest(tmp_path), "source": {"tool": "encode-latents", "raw": "data/raw"},
                              "codec": {**CODEC, "config": {"patch_size": 1, "weights_sha256": "aa"}}})
    dm = VideoShardDataModule(str(tmp_path), batch_size=1, batches_per_epoch=1)
    model = {"name": "tiny", "config_hash": "fedcba9876543210", "config": {"patch_size": 1, "weights_sha256": "bb"}}
    with pytest.raises(CodecMismatchError) as codec:
        dm.check_compatible(model)
    assert str(codec.value) == (
        f"the shards in {tmp_path} were made with codec 'tiny', but the model uses 'tiny': they differ in "
        f"weights_sha256 ('aa' there, 'bb' here); encode the shards again with the model's codec (`flowvid data "
        f"encode-latents data/raw --out {tmp_path} --codec tiny --codec-args JSON`), or point the recipe at the "
        "codec the shards were made with")
    with pytest.raises(ValueError) as text:
        dm.check_compatible(text_encoder={"name": "tiny-text", "width": "16", "weights_sha256": "cc"})
    assert str(text.value) == (
        f"the shards in {tmp_path} cache text embeddings of text encoder 'tiny-text', but the model uses "
        f"'tiny-text': they differ in width ('8' there, '16' here); encode the shards again with the model's "
        f"text encoder (`flowvid data encode-latents data/raw --out {tmp_path} --text-encoder tiny-text "
        "--text-encoder-args JSON`), or point the recipe at the text encoder the shards were made with")
    with pytest.raises(ValueError, match=r"they differ in name \('tiny-text' there, 'other' here\); encode"):
        dm.check_compatible(text_encoder={"name": "other", "width": "8"})


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
    with pytest.raises(ValueError, match=r"make them again at the model's size \(`flowvid data from-videos \.\.\. "
                                         r"--frames 8 --size 16x32`"):
        dm.check_compatible(video_shape=(8, 16, 32))
    with pytest.raises(ValueError, match="text embeddings .* encode the shards again with the model's text encoder"):
        dm.check_compatible(text_encoder={"name": "other", "width": "8"})

    write_folder(tmp_path / "raw", shards=2)
    mixed = VideoShardDataModule(str(tmp_path / "latent"), val_dir=str(tmp_path / "raw"))
    with pytest.raises(ValueError, match="differ in kind"):
        mixed.setup("fit")


def test_validation_reads_only_the_validation_folders_and_checks_them_against_each_other_and_the_model(tmp_path):
    val = write_folder(tmp_path / "val", shards=2, kind="latent")
    gone = [str(tmp_path / "moved_away"), str(tmp_path / "also_gone")]
    for train_dir in (None, gone[0], gone):
        dm = VideoShardDataModule(train_dir, val_dir=str(val), batch_size=5)
        dm.setup("validate")
        assert dm.manifest == load_manifest(val)
        dm.check_compatible(CODEC, (1, 2, 2, 12), (2, 4, 4), {"name": "tiny-text", "width": "8"})
        with pytest.raises(CodecMismatchError, match="made with codec 'tiny'"):
            dm.check_compatible({"name": "tiny", "config_hash": "ffffffffffffffff"})
        with warnings.catch_warnings():  # a checkpoint's training position concerns no validation
            warnings.simplefilter("error")
            dm.load_state_dict({"seed": 1, "epoch": 3, "batches_consumed": 2, "mixture": {gone[0]: 1.0}})
        assert sorted(key for batch in dm.val_dataloader() for key in batch["key"]) == [
            f"s{shard}-{i:03d}" for shard in range(2) for i in range(6)]
    longer = write_folder(tmp_path / "longer", shards=2, kind="latent", name="c", video={**VIDEO, "frames": 3})
    with pytest.raises(ValueError, match=f"the shards in {val} hold clips of .* but those in {longer}"):
        VideoShardDataModule(val_dir=[str(val), str(longer)]).setup("validate")
    with pytest.raises(ValueError, match="^data.init_args.train_dir is not set, so there is nothing to train on"):
        VideoShardDataModule(val_dir=str(val)).setup("fit")


def test_a_validation_pass_has_the_batches_its_listed_clips_make_on_each_rank_and_worker(tmp_path, monkeypatch):
    """What Lightning takes a fraction of: 31 clips in shards of 10, 10, 10 and 1, in batches of 4."""
    folder = write_uneven_folder(tmp_path)
    # Rank 1 of 2 holds the shards of 10 and 1 clips: 3 batches, or 3 + 1 when each of 2 workers batches one.
    counts = {(1, 0): [8], (2, 0): [5, 3], (1, 2): [8], (2, 2): [6, 4]}
    for (world_size, workers), lengths in counts.items():
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        for rank, length in enumerate(lengths):
            monkeypatch.setenv("RANK", str(rank))
            loader = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=4,
                                          num_workers=workers).val_dataloader()
            assert len(loader) == length == len(list(loader))


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """48 samples in 8 shards of 6 ("a..." keys) and 40 in 2 shards of 20 ("b..." keys)."""
    root = tmp_path_factory.mktemp("mixture")
    return write_folder(root / "a", name="a"), write_folder(root / "b", shards=2, per_shard=20, name="b")


def share_of_a(batches):
    keys = [key for batch in batches for key in batch]
    return sum(key.startswith("a") for key in keys) / len(keys)


@pytest.mark.parametrize("weights,share", [([3, 1], 0.75), ([1, 3], 0.25), (None, 48 / 88)])
def test_a_mixture_draws_each_folder_in_proportion_to_its_weight_whatever_its_shard_sizes(two_folders, weights,
                                                                                         share):
    dm = VideoShardDataModule([str(f) for f in two_folders], batch_size=8, shuffle_buffer=16, batches_per_epoch=300,
                              train_weights=weights)
    dm.setup("fit")
    # Drawn shard by shard, a folder of large shards would otherwise give 20 samples a draw against 6.
    assert share_of_a(run_epoch(dm)) == pytest.approx(share, abs=0.04)


def test_a_mixture_resumes_batch_exactly_and_every_rank_draws_from_both_folders(two_folders, monkeypatch):
    folders = [str(f) for f in two_folders]

    def module():
        return VideoShardDataModule(folders, batch_size=4, num_workers=2, shuffle_buffer=6, batches_per_epoch=9,
                                    train_weights=[1, 1])

    dm = module()
    run_epoch(dm)
    epoch1 = run_epoch(dm)
    assert dm.state_dict()["mixture"] == {folders[0]: 0.5, folders[1]: 0.5}
    for done in (1, 4):
        resumed = module()
        resumed.load_state_dict({**dm.state_dict(), "epoch": 1, "batches_consumed": done})
        assert run_epoch(resumed) == epoch1[done:]
    other = VideoShardDataModule(folders, batch_size=4, num_workers=2, train_weights=[1, 2])
    with pytest.warns(UserWarning, match="mixture"):
        other.load_state_dict(dm.state_dict())
    with warnings.catch_warnings():  # Lightning hands the same state to the loader too: said once is enough
        warnings.simplefilter("error")
        other.load_state_dict(dm.state_dict())

    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ranked = VideoShardDataModule(folders, batch_size=4, batches_per_epoch=40, train_weights=[1, 1])
        ranked.setup("fit")
        shards[rank] = [key.split("-")[0] for batch in run_epoch(ranked) for key in batch]
        assert {shard[0] for shard in shards[rank]} == {"a", "b"}
    assert shards[0] != shards[1] and {"b0", "b1"} <= set(shards[0]) & set(shards[1])


def test_a_mixture_is_checked_before_training(two_folders, tmp_path):
    folders = [str(f) for f in two_folders]
    for weights, message in (([1], "1 weight"), ([1, 0], "must all be > 0"), ([1, -2], "must all be > 0")):
        with pytest.raises(ValueError, match=message):
            VideoShardDataModule(folders, train_weights=weights)
    with pytest.raises(ValueError, match="names no folder"):
        VideoShardDataModule([])
    with pytest.raises(ValueError, match=f"train_dir lists {folders[0]} more than once"):
        VideoShardDataModule([folders[0], folders[1], folders[0] + "/"])
    with pytest.raises(ValueError, match=f"val_dir lists {folders[1]} more than once"):
        VideoShardDataModule(folders[0], val_dir=[folders[1], folders[1]])
    longer = write_folder(tmp_path / "longer", shards=2, name="c", video={**VIDEO, "frames": 3})
    with pytest.raises(ValueError, match=f"the shards in {folders[0]} hold clips of .* but those in {longer}"):
        VideoShardDataModule([folders[0], str(longer)]).setup("fit")
    latent = write_folder(tmp_path / "latent", shards=2, kind="latent", name="d")
    with pytest.raises(ValueError, match=f"the shards in {folders[0]} and in {latent} differ in kind"):
        VideoShardDataModule([folders[0], str(latent)]).setup("fit")
    barren = write_folder(tmp_path / "barren", shards=2, name="e", corrupt=lambda key, sample: sample.pop("txt"))
    with pytest.raises(RuntimeError, match=f"no usable sample left in 2 shard.*{barren}"):
        run_epoch(VideoShardDataModule([folders[0], str(barren)], batch_size=2, batches_per_epoch=50))
