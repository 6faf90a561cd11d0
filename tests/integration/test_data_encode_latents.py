"""encode-latents: raw shards -> latent shards through registered codecs -> latent batches."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data_tools.cli import main as data_main
from data_tools.describe import describe_folder
from data_tools.encode_latents import _write_latents, encode_latents
from data_tools.report import console
from data_tools.verify import verify_folder
from flowvid.codecs.base import CodecMismatchError, LatentCodec
from flowvid.data import VideoShardDataModule, load_manifest, write_synthetic_dataset
from flowvid.data.manifest import write_manifest
from flowvid.data.shards import file_sha256, iter_tar
from flowvid.registry import CODECS
from flowvid.text.base import TextEmbedding, TextEncoder
from processes import free_port, set_torchrun_environment


class SpaceToDepth(LatentCodec):
    """2x2 pixel blocks folded into 12 channels and scaled; carries a normalisation like a VAE does."""

    spatial_factor = 2
    latent_channels = 12

    def __init__(self, scale: float = 1 / 255):
        super().__init__()
        self.scale = scale
        self.latents_mean = torch.full((12,), 0.5)
        self.latents_std = torch.full((12,), 0.25)

    def config(self):
        return {"scale": self.scale}

    def encode(self, video):
        b, t, h, w, _ = video.shape
        x = video.float().reshape(b, t, h // 2, 2, w // 2, 2, 3).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h // 2, w // 2, 12) * self.scale

    def decode(self, latents):
        b, t, h, w, _ = latents.shape
        x = (latents / self.scale).reshape(b, t, h, w, 2, 2, 3).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h * 2, w * 2, 3).round().clamp(0, 255).to(torch.uint8)


class WordHashText(TextEncoder):
    """A frozen toy encoder: one token per word, its state a fixed function of the word."""

    width, max_length = 8, 6

    def forward(self, captions):
        tokens = torch.zeros(len(captions), self.max_length, self.width)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            for col, word in enumerate(caption.split()[: self.max_length]):
                tokens[row, col] = torch.tensor([(sum(map(ord, word)) >> k) % 7 for k in range(self.width)]) / 7
                mask[row, col] = True
        return TextEmbedding(tokens, mask)


CODECS.add("test-space-to-depth", SpaceToDepth)
CODEC_NAMES = ["test-space-to-depth"] + (["pixel"] if "pixel" in CODECS else [])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=12, frames=4, size=16, seed=3, shard_samples=5)
    return root / "train"


def batches(folder, **kwargs):
    dm = VideoShardDataModule(str(folder), val_dir=str(folder), batch_size=4, **kwargs)
    return dm, list(dm.val_dataloader())


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_latent_shards_match_the_codec(raw, tmp_path, name):
    out = tmp_path / "latent"
    assert data_main(["encode-latents", str(raw), "--out", str(out), "--codec", name, "--first-frame",
                      "--batch-size", "5", "--shard-samples", "4"]) == 0
    codec = CODECS.get(name)()
    manifest = load_manifest(out)
    assert manifest["kind"] == "latent" and manifest["samples"] == 12 and manifest["num_shards"] == 3
    assert manifest["codec"] == codec.identity() and tuple(manifest["latent_shape"]) == codec.latent_shape(4, 16, 16)
    assert verify_folder(out)["ok"]

    _, raw_batches = batches(raw)
    videos = {k: v for b in raw_batches for k, v in zip(b["key"], b["video"])}
    dm, latent_batches = batches(out)
    latents = {k: v for b in latent_batches for k, v in zip(b["key"], b["latents"])}
    firsts = {k: v for b in latent_batches for k, v in zip(b["key"], b["first_frame"])}
    assert latents.keys() == videos.keys()
    expected = codec.encode(torch.stack([videos[k] for k in latents]))
    torch.testing.assert_close(torch.stack(list(latents.values())), expected, atol=2e-3, rtol=1e-3)  # stored as float16
    assert all(torch.equal(firsts[k], videos[k][0]) for k in latents)

    flat = expected.reshape(-1, expected.shape[-1]).double()
    np.testing.assert_allclose(manifest["latent_mean"], flat.mean(0), atol=1e-4)
    np.testing.assert_allclose(manifest["latent_std"], flat.std(0, unbiased=False), atol=1e-4)

    dm.check_compatible(codec.identity(), codec.latent_shape(4, 16, 16), (4, 16, 16))
    with pytest.raises(CodecMismatchError):
        dm.check_compatible({"name": name, "config_hash": "not-this-one"})


def test_codec_normalisation_and_text_cache_are_recorded(raw, tmp_path):
    manifest = encode_latents(raw, tmp_path / "latent", SpaceToDepth(), text_encoder=WordHashText(), batch_size=4)
    assert manifest["codec_normalisation"] == {"mean": [0.5] * 12, "std": [0.25] * 12}
    assert manifest["text_encoder"] == WordHashText().identity() and manifest["text_shape"] == [6, 8]
    _, got = batches(tmp_path / "latent")
    expected = WordHashText().encode(got[0]["caption"])
    torch.testing.assert_close(got[0]["text_tokens"], expected.tokens, atol=1e-3, rtol=1e-3)
    assert torch.equal(got[0]["text_mask"], expected.mask)

    description = describe_folder(tmp_path / "latent", captions=1)
    assert description["kind"] == "latent" and description["codec"] == SpaceToDepth().identity()
    assert description["latent_shape"] == [4, 8, 8, 12] and description["text_shape"] == [6, 8]
    assert description["source"]["tool"] == "encode-latents" and description["captions"] == [got[0]["caption"][0]]


class LoudText(WordHashText):
    """Beyond float16's range for captions that mention a circle: their cached embeddings cannot be kept."""

    def forward(self, captions):
        embedding = super().forward(captions)
        loud = torch.tensor(["circle" in caption for caption in captions])[:, None, None]
        return TextEmbedding(torch.where(loud, embedding.tokens * 1e6, embedding.tokens), embedding.mask)


def test_clips_whose_cached_text_cannot_be_stored_are_skipped_and_listed(raw, tmp_path):
    manifest = encode_latents(raw, tmp_path / "latent", SpaceToDepth(), text_encoder=LoudText(), batch_size=4)
    reasons = [item["reason"] for item in manifest["skipped"]]
    assert reasons and all(reason.startswith("bad_text_embedding") for reason in reasons)
    assert manifest["samples"] + len(reasons) == 12
    assert verify_folder(tmp_path / "latent")["ok"]


def test_a_shard_whose_tail_reads_as_zeros_is_listed_not_silently_shorter(raw, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(raw, source)
    shard = next(iter(sorted(source.glob("*.tar"))))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
    manifest = encode_latents(source, tmp_path / "latent", SpaceToDepth())
    assert any(item.get("shard") == shard.name and "the manifest lists" in item["reason"]
               for item in manifest["skipped"])


def test_a_broken_raw_shard_is_listed_with_every_sample_it_lost(raw, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(raw, source)
    (source / "shard-000001.tar").write_bytes(b"not a tar archive")
    manifest = encode_latents(source, tmp_path / "latent", SpaceToDepth())
    assert [(item["shard"], item["samples"]) for item in manifest["skipped"]] == [("shard-000001.tar", 5)]
    assert manifest["samples"] + manifest["skipped"][0]["samples"] == 12


def test_a_key_met_again_is_skipped_and_listed_so_the_latent_folder_verifies(raw, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(raw, source)
    first_key = next(iter_tar(source / "shard-000000.tar"))["__key__"]
    shard = source / "shard-000001.tar"
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    repeated = members[0][0].name.split(".")[0]  # the second shard's first sample takes the first one's key
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in members:
            member.name = member.name.replace(repeated, first_key)
            archive.addfile(member, io.BytesIO(data))
    _record_checksum(source, shard)  # written so by a tool: the shard is as its manifest says
    manifest = encode_latents(source, tmp_path / "latent", SpaceToDepth())
    reason = f"duplicate_key: {shard}: key {first_key!r} belongs to an earlier sample"
    assert manifest["skipped"] == [{"key": first_key, "reason": reason}]
    assert manifest["samples"] == 11
    assert verify_folder(tmp_path / "latent")["ok"]
    # Under torchrun the process that encodes the second shard alone drops the key just the same.
    part = _write_latents(source, load_manifest(source), tmp_path / "part", SpaceToDepth(), (4, 8, 8, 12), None,
                          False, 4, "cpu", 1000, None, rank=1, world_size=2)
    assert part["skipped"] == [{"key": first_key, "reason": reason}]


def _record_checksum(folder, shard):
    manifest = load_manifest(folder)
    entry = next(entry for entry in manifest["shards"] if entry["name"] == shard.name)
    entry.update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    write_manifest(folder, manifest)


def test_overflowing_latents_are_skipped_and_listed(raw, tmp_path):
    # Scaled by 1000, any pixel above 65 overflows float16: those clips must not be written.
    manifest = encode_latents(raw, tmp_path / "latent", SpaceToDepth(scale=1000.0))
    assert manifest["samples"] + len(manifest["skipped"]) == 12 and manifest["skipped"]
    assert all(item["reason"].startswith("non_finite_latent") for item in manifest["skipped"])


def test_codec_arguments_and_bad_requests(raw, tmp_path):
    args = ["--codec", "test-space-to-depth", "--codec-args", json.dumps({"scale": 0.5})]
    assert data_main(["encode-latents", str(raw), "--out", str(tmp_path / "latent"), *args]) == 0
    assert load_manifest(tmp_path / "latent")["codec_config"] == {"scale": 0.5}
    # Latent shards as input, an unknown codec: one-line errors, exit code 2.
    assert data_main(["encode-latents", str(tmp_path / "latent"), "--out", str(tmp_path / "x"), *args]) == 2
    assert data_main(["encode-latents", str(raw), "--out", str(tmp_path / "y"), "--codec", "no-such-codec"]) == 2
    codec = SpaceToDepth()
    codec.spatial_factor = 3
    with pytest.raises(ValueError, match="divisible by 3"):
        encode_latents(raw, tmp_path / "z", codec)


def folder_contents(root):
    """Every file and folder under ``root`` with the bytes of the files: equal means untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("option,arguments,named", [
    ("--codec-args", {"patch_sz": 2}, ["codec 'pixel'", "'patch_sz'", "patch_size, temporal_patch"]),
    ("--text-encoder-args", {"widht": 8}, ["text encoder 'learned'", "'widht'", "--text-encoder-args"]),
])
def test_a_misspelt_constructor_argument_is_one_line_before_anything_is_written(
    raw, tmp_path, capsys, monkeypatch, option, arguments, named
):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    out = tmp_path / "latent"
    text = ["--text-encoder", "learned"] if option == "--text-encoder-args" else []
    code = data_main(["encode-latents", str(raw), "--out", str(out), "--codec", "pixel", *text,
                      option, json.dumps(arguments)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data encode-latents: error:") and error.count("\n") == 1
    assert all(part in error for part in named), error
    assert not out.exists()


@pytest.mark.parametrize("request_,named", [
    (["--codec", "test-space-to-depth", "--codec-args", '{"scale": "0.5"}'],
     ["codec 'test-space-to-depth'", "'scale' as float", "got str '0.5'", "(in --codec-args)"]),
    (["--codec", "pixel", "--text-encoder", "learned", "--text-encoder-args", '{"width": "8"}'],
     ["text encoder 'learned'", "'width' as int", "got str '8'", "(in --text-encoder-args)"]),
])
def test_a_constructor_argument_of_another_json_type_is_one_line_naming_the_types(
    raw, tmp_path, capsys, monkeypatch, request_, named
):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    out = tmp_path / "latent"
    code = data_main(["encode-latents", str(raw), "--out", str(out), *request_])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data encode-latents: error:") and error.count("\n") == 1
    assert all(part in error for part in named), error
    assert not out.exists()


@pytest.mark.parametrize("request_, named", [
    (["--codec", "pixel", "--codec-args", '{"patch_size": 3}'], "needs height divisible by 3"),
    (["--text-encoder", "learned"], "trains with the model"),
    (["--out-is-a-file"], "is a file"),
])
def test_a_request_that_cannot_be_done_is_one_line_without_a_progress_bar(raw, tmp_path, capsys, monkeypatch,
                                                                           request_, named):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    out = tmp_path / "latent"
    if request_ == ["--out-is-a-file"]:
        out.write_text("a file of the user's")
        request_ = []
    code = data_main(["encode-latents", str(raw), "--out", str(out), *request_])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data encode-latents: error:") and error.count("\n") == 1, error
    assert named in error, error
    assert not out.is_dir()


def test_a_run_that_writes_nothing_or_would_overwrite_its_source_keeps_the_data(raw, tmp_path):
    out = tmp_path / "latent"
    assert data_main(["encode-latents", str(raw), "--out", str(out), "--codec", "test-space-to-depth"]) == 0
    before, raw_before = folder_contents(out), folder_contents(raw)
    # Scaled by a million, every latent overflows float16: every clip is skipped, nothing is written.
    overflowing = ["--codec", "test-space-to-depth", "--codec-args", json.dumps({"scale": 1e6})]
    assert data_main(["encode-latents", str(raw), "--out", str(out), *overflowing]) == 1
    assert folder_contents(out) == before
    assert data_main(["encode-latents", str(raw), "--out", str(raw), "--codec", "test-space-to-depth"]) == 2
    assert folder_contents(raw) == raw_before


@pytest.mark.parametrize("verb", ["encode-latents", "fvd-stats"])
def test_a_device_that_is_not_here_is_one_line_before_anything_is_read(raw, tmp_path, capsys, monkeypatch, verb):
    monkeypatch.setattr(console, "width", 400)
    out = tmp_path / "out"
    code = data_main([verb, str(raw), "--out", str(out), "--device", "cuda:99"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"flowvid data {verb}: error:") and error.count("\n") == 1
    assert "--device 'cuda:99'" in error
    assert not out.exists()


def _encode_as_torchrun_rank(rank: int, world: int, port: int, raw: str, out: str) -> None:
    torch.set_num_threads(1)
    set_torchrun_environment(rank, world, port)
    code = data_main(["encode-latents", raw, "--out", out, "--codec", "test-space-to-depth", "--first-frame",
                      "--batch-size", "3", "--shard-samples", "2", "--device", "cpu"])
    if code != 0:
        raise SystemExit(code)


def samples_by_key(folder):
    return {sample["__key__"]: sample for shard in sorted(folder.glob("shard-*.tar")) for sample in iter_tar(shard)}


@pytest.mark.slow
def test_under_torchrun_each_process_encodes_its_shards_into_one_folder(raw, tmp_path):
    one = encode_latents(raw, tmp_path / "one", SpaceToDepth(), first_frame=True, batch_size=3, shard_samples=2)
    port = free_port()
    # raw holds 3 shards: rank 0 encodes the first and the third, rank 1 the second.
    mp.start_processes(_encode_as_torchrun_rank, args=(2, port, str(raw), str(tmp_path / "two")), nprocs=2,
                       join=True, start_method="fork")
    two = load_manifest(tmp_path / "two")
    assert verify_folder(tmp_path / "two")["ok"]
    assert [shard["name"] for shard in two["shards"]] == [f"shard-{i:06d}.tar" for i in range(two["num_shards"])]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(["manifest.json", *(s["name"] for s in two["shards"])])
    assert two["samples"] == one["samples"] == 12 and two["num_shards"] == 4 + 3  # rank 0: 7 clips, rank 1: 5
    np.testing.assert_allclose(two["latent_mean"], one["latent_mean"], rtol=1e-12)
    np.testing.assert_allclose(two["latent_std"], one["latent_std"], rtol=1e-9)
    for key in ("codec", "latent_shape", "first_frame", "video"):
        assert two[key] == one[key]
    assert samples_by_key(tmp_path / "two") == samples_by_key(tmp_path / "one")  # every clip, byte for byte
