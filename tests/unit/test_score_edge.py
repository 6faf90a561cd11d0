"""`flowvid score` on damaged shards, longer latent clips, scores that are not numbers and an --out that is an input."""

import copy
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowvid.cli import main
from flowvid.data import iter_tar
from flowvid.export import build_module
from flowvid.loading import load_model
from flowvid.testing import perturb_parameters
from test_product_generate_score import CONFIG, one_line_error


def saved_checkpoint(config, path: Path, parts: tuple[str, ...] = ("flow",)) -> Path:
    """A checkpoint as training writes it, with ``parts`` of the module moved off their start: a flow whose
    frames depend on the ones before them, a video VAE whose residual blocks see earlier frames."""
    torch.manual_seed(0)
    module = build_module(config)
    for part in parts:
        perturb_parameters(getattr(module, part), std=0.02)
    torch.save({"state_dict": module.state_dict(), "flowvid_run": {"config": config}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_checkpoint(CONFIG, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_repeated_key_in_a_shard_is_listed_and_every_other_sample_still_scored(checkpoint, tmp_path, capsys):
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", num_videos=3, frames=4, size=8, val_videos=1, shard_samples=8)
    [shard] = sorted((tmp_path / "data" / "train").glob("shard-*.tar"))
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "a") as archive:  # the first sample once more, under its key
        for member, data in members:
            if member.name.split(".")[0] == key:
                archive.addfile(member, io.BytesIO(data))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "data" / "train"),
                 "--out", str(out)]) == 0
    records = records_of(out)
    assert [("error" in r) for r in records] == [False, False, False, True]
    assert records[3]["path"] == f"{shard}:{key}" and records[3]["error"].startswith("duplicate_key")
    assert "; 1 could not be read (listed)" in capsys.readouterr().out


def test_a_key_an_earlier_shard_holds_is_scored_once_as_in_training(checkpoint, tmp_path):
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", num_videos=3, frames=4, size=8, val_videos=1, shard_samples=1)
    first, _, last = sorted((tmp_path / "data" / "train").glob("shard-*.tar"))
    key = next(iter_tar(first))["__key__"]
    with tarfile.open(last) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    with tarfile.open(last, "w", format=tarfile.USTAR_FORMAT) as archive:  # the last sample takes the first's key
        for member, data in members:
            member.name = key + member.name[member.name.index("."):]
            archive.addfile(member, io.BytesIO(data))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "data" / "train"),
                 "--out", str(out)]) == 0
    records = records_of(out)
    assert [("error" in r) for r in records] == [False, False, True]
    assert records[2]["path"] == f"{last}:{key}" and records[2]["error"].startswith("duplicate_key")


def test_a_score_that_is_not_a_number_is_listed_and_the_others_stay_ranked(checkpoint, tmp_path, monkeypatch):
    import flowvid.score

    rng = np.random.default_rng(0)
    for name, spread in (("a", 8), ("b", 256), ("c", 16), ("d", 128), ("e", 64), ("f", 32)):
        np.save(tmp_path / f"{name}.npy", rng.integers(128 - spread // 2, 128 + spread // 2, (4, 8, 8, 3), np.uint8))
    score_latents = flowvid.score.score_latents
    calls = iter(range(6))

    def not_a_number_for_the_second_video(*args, **kwargs):
        bits = score_latents(*args, **kwargs)
        return bits * math.nan if next(calls) == 1 else bits

    monkeypatch.setattr(flowvid.score, "score_latents", not_a_number_for_the_second_video)
    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path), "--out", str(out)]) == 0
    *scored, failed = records_of(out)
    bits = [r["bits_per_dim"] for r in scored if not math.isnan(r["bits_per_dim"])]
    assert bits == sorted(bits, reverse=True)  # a NaN among them once put a likely video first
    assert len(bits) == 5 and [r["rank"] for r in scored] == [1, 2, 3, 4, 5]
    assert failed["path"] == str(tmp_path / "b.npy") and "NaN" in failed["error"]


def vae_config():
    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["codec"] = {"class_path": "flowvid.codecs.VideoVAE", "init_args": {
        "spatial_factor": 2, "temporal_factor": 1, "latent_channels": 12, "width": 8, "depth": 1}}
    return config


@pytest.fixture(scope="module")
def long_latent_shards(tmp_path_factory):
    """A causal-VAE model and latent shards of clips twice its latent length, with the raw shards they encode."""
    from data_tools.encode_latents import encode_latents
    from flowvid.data import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("long_latents")
    checkpoint = saved_checkpoint(vae_config(), folder / "vae.ckpt", parts=("flow", "codec"))
    write_synthetic_dataset(folder / "raw", num_videos=1, frames=8, size=8, val_videos=1, shard_samples=8)
    encode_latents(folder / "raw" / "train", folder / "latent", load_model(checkpoint).codec)
    return checkpoint, folder / "raw" / "train", folder / "latent"


def only_sample(folder: Path) -> dict:
    from flowvid.data import SampleSpec, decode_sample, load_manifest
    from flowvid.data.shards import shard_paths

    manifest = load_manifest(folder)
    [raw] = iter_tar(shard_paths(folder, manifest)[0])
    return decode_sample(raw, SampleSpec.from_manifest(manifest))


def test_latents_of_a_causal_codec_longer_than_the_model_window_are_scored_in_their_first_clip_only(
        long_latent_shards, tmp_path, capsys):
    checkpoint, raw_folder, latent_folder = long_latent_shards
    module = load_model(checkpoint)
    sample, video = only_sample(latent_folder), torch.from_numpy(only_sample(raw_folder)["video"])
    latents, window = torch.from_numpy(sample["latents"]), module.latent_shape[0]
    assert module.codec.causal_first_frame and len(latents) == len(video) == 2 * window
    # Why: the first window is the first clip encoded afresh, the second is not its clip encoded afresh.
    torch.testing.assert_close(latents[:window], module.codec.encode(video[None, :window])[0], rtol=0, atol=1e-3)
    assert not torch.allclose(latents[window:], module.codec.encode(video[None, window:])[0], atol=1e-2)

    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(latent_folder), "--out", str(out)]) == 0
    [record] = records_of(out)
    text = module.text_encoder.encode([sample["caption"]])
    with torch.no_grad():
        expected = module.flow.nll_per_frame(latents[None, :window], text)[0] / math.log(2)
    assert record["clips"] == 1 and record["latent_frames"] == window
    assert record["bits_per_dim_per_frame"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert record["unscored_latent_frames"] == window and "'video_vae' is causal" in record["unscored_reason"]
    assert "; 1 in their first clip only (unscored_reason says why)" in capsys.readouterr().out


def test_latents_of_a_codec_that_is_not_causal_are_scored_in_every_clip_of_the_model_window(
        long_latent_shards, monkeypatch):
    from flowvid.score import score_latent_clips

    checkpoint, _, latent_folder = long_latent_shards
    module = load_model(checkpoint)
    monkeypatch.setattr(module.codec, "causal_first_frame", False)
    sample = only_sample(latent_folder)
    latents, window = torch.from_numpy(sample["latents"]), module.latent_shape[0]
    record = score_latent_clips(module, latents, sample["caption"])
    text = module.text_encoder.encode([sample["caption"]])
    with torch.no_grad():
        expected = [module.flow.nll_per_frame(latents[None, start:start + window], text)[0] / math.log(2)
                    for start in (0, window)]
    assert record["clips"] == 2 and record["latent_frames"] == 2 * window and "unscored_latent_frames" not in record
    assert record["bits_per_dim_per_frame"] == pytest.approx(torch.cat(expected).tolist(), rel=1e-5)


def test_an_out_that_is_an_input_is_refused_before_loading(tmp_path, capsys):
    from flowvid.data import write_synthetic_dataset

    clips = tmp_path / "clips"
    clips.mkdir()
    np.save(clips / "clip.npy", np.zeros((4, 8, 8, 3), np.uint8))
    write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=4, size=8, val_videos=1, shard_samples=8)
    shards = tmp_path / "data" / "train"
    for inputs, out in (([clips / "clip.npy"], clips / "clip.npy"), ([clips], clips / "clip.npy"),
                        ([shards], shards / "manifest.json"), ([shards], shards / "shard-000000.tar")):
        before = out.read_bytes()
        assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", *map(str, inputs),
                     "--out", str(out)]) == 2
        assert f"--out {out} is one of the inputs, and writing the scores over it" in one_line_error(capsys)
        assert out.read_bytes() == before


def test_a_video_that_appears_while_the_model_loads_is_not_scored_unchecked(checkpoint, tmp_path, monkeypatch):
    import flowvid.loading

    clips = tmp_path / "clips"
    clips.mkdir()
    np.save(clips / "checked.npy", np.zeros((4, 8, 8, 3), np.uint8))
    load = flowvid.loading.load_model

    def load_while_a_video_arrives(*args, **kwargs):
        np.save(clips / "late.npy", np.zeros((4, 8, 8, 3), np.uint8))
        return load(*args, **kwargs)

    monkeypatch.setattr(flowvid.loading, "load_model", load_while_a_video_arrives)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(clips), "--out", str(out)]) == 0
    assert [r["path"] for r in records_of(out)] == [str(clips / "checked.npy")]


def test_score_inputs_walks_a_folder_once(checkpoint, tmp_path, monkeypatch):
    from flowvid.score import score_inputs

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    walks = []
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda path, pattern: walks.append(path) or rglob(path, pattern))
    records = score_inputs(load_model(checkpoint, map_location="cpu"), [str(tmp_path)], caption="a red circle")
    assert walks == [tmp_path]
    assert sorted(r["path"] for r in records) == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    assert [r["rank"] for r in records] == [1, 2]


# --- captions of video files from a table ----------------------------------------------------------


def scores(checkpoint, out: Path, *arguments) -> dict[str, dict]:
    assert main(["score", "--ckpt", str(checkpoint), *arguments, "--out", str(out)]) == 0
    return {Path(r["path"]).name: r for r in records_of(out)}


@pytest.mark.parametrize("table, rows", [
    ("captions.csv", 'path,caption\nclips/a.npy,a red circle\nb.npy,"a blue square, moving up"\n'),
    ("captions.jsonl", '{"path": "clips/a.npy", "caption": "a red circle"}\n'
                       '{"path": "b.npy", "caption": "a blue square, moving up"}\n')])
def test_each_video_file_is_scored_under_its_caption_from_the_table(checkpoint, tmp_path, table, rows):
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        np.save(clips / f"{name}.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / table).write_text(rows)
    inputs = ["--input", str(clips / "a.npy"), str(clips / "b.npy"), str(clips / "c.npy")]
    from_table = scores(checkpoint, tmp_path / "table.jsonl", *inputs, "--captions", str(tmp_path / table))
    # Video file i draws its dequantisation noise from seed i: each is scored alone under its seed.
    for index, (name, caption) in enumerate((("a.npy", "a red circle"), ("b.npy", "a blue square, moving up"))):
        alone = scores(checkpoint, tmp_path / f"{name}.jsonl", "--input", str(clips / name), "--caption", caption,
                       "--seed", str(index))[name]
        assert from_table[name]["bits_per_dim_per_frame"] == alone["bits_per_dim_per_frame"]
        unconditional = scores(checkpoint, tmp_path / "empty.jsonl", "--input", str(clips / name),
                               "--seed", str(index))[name]
        assert from_table[name]["bits_per_dim"] != unconditional["bits_per_dim"]  # the caption is read
    # As from-videos skips a video the table lacks, unless --default-caption gives it one.
    assert "error" not in from_table["a.npy"] and "error" not in from_table["b.npy"]
    assert from_table["c.npy"]["error"].startswith(f"no caption: --captions {tmp_path / table} has no row for it")
    with_default = scores(checkpoint, tmp_path / "default.jsonl", *inputs, "--captions", str(tmp_path / table),
                          "--caption", "a green star")
    alone = scores(checkpoint, tmp_path / "c.jsonl", "--input", str(clips / "c.npy"), "--caption", "a green star",
                   "--seed", "2")["c.npy"]
    assert with_default["c.npy"]["bits_per_dim_per_frame"] == alone["bits_per_dim_per_frame"]
    assert with_default["a.npy"]["bits_per_dim"] == from_table["a.npy"]["bits_per_dim"]


def test_a_captions_table_that_cannot_caption_the_inputs_is_refused_before_loading(tmp_path, capsys):
    from flowvid.data import write_synthetic_dataset

    np.save(tmp_path / "clip.npy", np.zeros((4, 8, 8, 3), np.uint8))
    write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=4, size=8, val_videos=1, shard_samples=8)
    (tmp_path / "others.csv").write_text("other.mp4,a red circle\n")
    (tmp_path / "latin1.csv").write_bytes("clip.npy,une scène d'été\n".encode("latin-1"))
    (tmp_path / "named.csv").write_text("clip.npy,a red circle\n")
    clip, shards = str(tmp_path / "clip.npy"), str(tmp_path / "data" / "train")
    for table, inputs, message in (
            ("missing.csv", [clip], f"--captions {tmp_path / 'missing.csv'} does not exist"),
            ("data", [clip], f"--captions {tmp_path / 'data'} is a folder"),
            ("latin1.csv", [clip], f"captions file {tmp_path / 'latin1.csv'} is not UTF-8 text"),
            ("others.csv", [clip], f"--captions {tmp_path / 'others.csv'} names none of the 1 video files"),
            ("named.csv", [shards], "--captions applies to video files, and the inputs are all shard folders")):
        # A checkpoint that is not there: only a refusal before the model loads names the captions.
        assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", *inputs,
                     "--captions", str(tmp_path / table), "--out", str(tmp_path / "s.jsonl")]) == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "s.jsonl").exists()
    assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", clip, "--captions",
                 str(tmp_path / "named.csv"), "--out", str(tmp_path / "named.csv")]) == 2
    assert f"--out {tmp_path / 'named.csv'} is one of the inputs" in one_line_error(capsys)
    assert (tmp_path / "named.csv").read_text() == "clip.npy,a red circle\n"
