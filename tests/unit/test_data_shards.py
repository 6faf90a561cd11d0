"""Shard format: atomic deterministic writing, damage detection on read, manifests, `verify` and `describe`."""

import builtins
import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import tarfile

import numpy as np
import pytest

from data_tools.cli import main as data_main
from data_tools.describe import describe_folder
from data_tools.report import console
from data_tools.verify import verify_folder
from flowvid.data.manifest import ManifestError, load_manifest, new_manifest, write_manifest
from flowvid.data.shards import (
    BadSample,
    BrokenShard,
    LostSamples,
    SampleSpec,
    ShardFolderWriter,
    decode_sample,
    encode_sample,
    file_sha256,
    iter_tar,
    keys_held_earlier,
    listed_samples,
    npy_bytes,
    shard_paths,
    shard_samples,
    staging_folder,
)

VIDEO = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}
RAW = SampleSpec("raw", (2, 4, 4, 3))


def _frames(i):
    return np.full((2, 4, 4, 3), i, np.uint8)


def _write_folder(folder, count=7, per_shard=3):
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for i in range(count):
            writer.write(encode_sample(f"clip{i:03d}", f"caption {i}", {"i": i}, frames=_frames(i)))
    manifest = new_manifest("raw", VIDEO, samples=writer.samples, num_shards=len(writer.shards), shards=writer.shards)
    write_manifest(folder, manifest)
    return manifest


def test_writer_splits_renames_and_is_deterministic(tmp_path):
    first = _write_folder(tmp_path / "a")
    second = _write_folder(tmp_path / "b")
    assert [s["samples"] for s in first["shards"]] == [3, 3, 1]
    assert first["shards"] == second["shards"]  # same samples, same bytes, same sha256
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_rewriting_a_folder_replaces_the_old_shards(tmp_path):
    _write_folder(tmp_path, count=7)
    (tmp_path / "notes.md").write_text("kept")
    manifest = _write_folder(tmp_path, count=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.md", "shard-000000.tar"]
    assert verify_folder(tmp_path)["ok"] and manifest["samples"] == 2


def test_a_failed_write_leaves_no_shard_under_a_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardFolderWriter(tmp_path, max_samples=3) as writer:
            for i in range(5):
                writer.write(encode_sample(f"clip{i}", "c", {}, frames=_frames(i)))
            raise RuntimeError("crash while writing the second shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # complete one only
    report = verify_folder(tmp_path)
    assert not report["ok"] and "manifest.json not found" in report["problems"][0]


@pytest.mark.parametrize("out", ["taken.txt", "taken.txt/shards"])
def test_an_output_folder_that_is_a_file_or_inside_one_is_a_value_error_naming_it(tmp_path, out):
    # make-synthetic, from-videos and encode-latents stage into their --out: a file there was a traceback.
    (tmp_path / "taken.txt").write_text("keep me")
    with pytest.raises(ValueError, match=f"output folder {tmp_path / out} (is a file|is inside the file)"):
        with staging_folder(tmp_path / out):
            pass
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_round_trip_and_truncation(tmp_path):
    _write_folder(tmp_path, count=3, per_shard=3)
    shard = tmp_path / "shard-000000.tar"
    samples = [decode_sample(raw, RAW) for raw in iter_tar(shard)]
    assert [s["key"] for s in samples] == ["clip000", "clip001", "clip002"]
    np.testing.assert_array_equal(samples[2]["video"], _frames(2))
    assert samples[1]["caption"] == "caption 1" and samples[1]["meta"] == {"i": 1}

    data = shard.read_bytes()
    for cut in (0, 100, 512 * 4, len(data) // 2 + 7):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        kept = []
        with pytest.raises(BrokenShard):
            for raw in iter_tar(tmp_path / "cut.tar"):
                kept.append(raw["__key__"])
        assert len(kept) < 3


def _shard_of_three_clips(tmp_path):
    """The bytes of a shard of three clips, and the tar member where the third clip begins."""
    _write_folder(tmp_path, count=3, per_shard=3)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as archive:
        third = next(member for member in archive.getmembers() if member.name.startswith("clip002"))
    return shard.read_bytes(), third


def test_a_cut_keeps_every_sample_complete_before_it(tmp_path):
    data, third = _shard_of_three_clips(tmp_path)
    for cut in (third.offset, third.offset_data + 10):  # at the third sample's first header, in its data
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        kept = []
        with pytest.raises(BrokenShard):
            for raw in iter_tar(tmp_path / "cut.tar"):
                kept.append(raw["__key__"])
        assert kept == ["clip000", "clip001"]


def test_a_broken_shard_says_whether_a_header_is_damaged_or_the_file_ends_early(tmp_path):
    data, third = _shard_of_three_clips(tmp_path)
    damaged_header = data[:third.offset + 100] + b"X" + data[third.offset + 101:]
    damages = {
        "damaged.tar": (damaged_header, f"damaged tar header at byte {third.offset}"),
        "first.tar": (data[:100] + b"X" + data[101:], "damaged tar header at byte 0"),
        "cut_at_header.tar": (data[:third.offset], f"truncated: the file ends early, at byte {third.offset}"),
        "cut_in_data.tar": (data[:third.offset_data + 10],
                            f"truncated: the file ends early, at byte {third.offset_data + 10}"),
        "cut_in_end_marker.tar": (data[:-700], f"truncated: the file ends early, at byte {len(data) - 700}"),
    }
    for name, (content, message) in damages.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BrokenShard) as broken:
            for _ in iter_tar(tmp_path / name):
                pass
        assert str(broken.value) == f"{tmp_path / name}: {message}" + (
            ": the block there is neither a member's header nor the end of the archive" if "damaged" in message
            else ", before the end of the archive")

    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(damaged_header)
    problems = verify_folder(tmp_path)["problems"]
    assert f"shard shard-000000.tar: broken_tar: {shard}: damaged tar header at byte {third.offset}" \
        in "\n".join(problems) and "truncated" not in "\n".join(problems)


def test_listed_samples_count_every_sample_a_damaged_shard_lost(tmp_path):
    manifest = _write_folder(tmp_path, count=9, per_shard=3)
    first, second, third = shard_paths(tmp_path, manifest)
    first.write_bytes(b"not a tar archive")  # broken before its first sample
    with tarfile.open(second) as archive:
        lost = next(member for member in archive.getmembers() if member.name.startswith("clip004"))
    data = second.read_bytes()
    second.write_bytes(data[:lost.offset] + bytes(len(data) - lost.offset))  # a zero tail reads as a normal end
    skipped = []
    keys = [raw["__key__"] for raw in listed_samples([first, second, third], [3, 3, 3], skipped)]
    assert keys == ["clip003", "clip006", "clip007", "clip008"]
    assert [(item["shard"], item["samples"]) for item in skipped] == [(first.name, 3), (second.name, 2)]


def test_a_shard_reports_each_loss_where_it_is_met(tmp_path):
    with ShardFolderWriter(tmp_path, max_samples=10) as writer:
        for key in ("a", "b", "a", "c"):
            writer.write(encode_sample(key, "c", {}, frames=_frames(0)))
    shard = tmp_path / "shard-000000.tar"
    read = [raw if isinstance(raw, LostSamples) else raw["__key__"]
            for raw in shard_samples(shard, listed=6, held_earlier=frozenset({"c"}))]
    assert read == ["a", "b",
                    LostSamples("duplicate_key", f"{shard}: key 'a' belongs to an earlier sample", key="a"),
                    LostSamples("duplicate_key", f"{shard}: key 'c' belongs to an earlier sample", key="c"),
                    LostSamples("broken_tar", f"{shard}: holds 4 samples, the manifest lists 6", samples=2)]


def test_listed_samples_give_each_key_once_in_stored_order(tmp_path):
    with ShardFolderWriter(tmp_path, max_samples=3) as writer:
        for key in ("a", "b", "c", "d", "a", "e", "e", "f", "f"):
            writer.write(encode_sample(key, "c", {}, frames=_frames(0)))
    shards = sorted(tmp_path.glob("shard-*.tar"))
    with tarfile.open(shards[0]) as archive:
        cut = next(member for member in archive.getmembers() if member.name.startswith("b")).offset
    shards[0].write_bytes(shards[0].read_bytes()[:cut])  # "b" and "c" are lost: only "a" is held earlier
    held_earlier = keys_held_earlier([str(shard) for shard in shards])
    assert held_earlier == {str(shards[1]): {"a"}, str(shards[2]): {"e"}}
    skipped = []
    keys = [raw["__key__"] for raw in listed_samples(shards, [3, 3, 3], skipped, held_earlier)]
    assert keys == ["a", "d", "e", "f"]
    assert [(item.get("shard") or item["key"], item["reason"].split(":")[0]) for item in skipped] == [
        ("shard-000000.tar", "broken_tar"), ("a", "duplicate_key"), ("e", "duplicate_key"), ("f", "duplicate_key")]


def npy_header(shape) -> bytes:
    """The header of a uint8 .npy file of ``shape``, without its data."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return stream.getvalue()


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda s: s.pop("txt"), "missing_field"),
        (lambda s: s.update(txt=b"\xff\xfe caption"), "bad_caption"),
        (lambda s: s.update(json=b"{not json"), "bad_metadata"),
        (lambda s: s.update({"frames.npy": npy_bytes(np.zeros((2, 4, 5, 3), np.uint8))}), "bad_frames"),
        (lambda s: s.update({"frames.npy": npy_bytes(np.zeros((2, 4, 4, 3), np.float32))}), "bad_frames"),
        (lambda s: s.update({"frames.npy": b"\x93NUMPY garbage"}), "bad_frames"),
        (lambda s: s.update({"frames.npy": npy_header((400000, 8000, 8000, 3)) + b"\0" * 96}), "bad_frames"),
        (lambda s: s.update({"frames.npy": npy_header((2, 4, 4, 3)) + b"\0" * 95}), "bad_frames"),  # one byte short
    ],
)
def test_bad_samples_are_named(change, reason):
    sample = encode_sample("k", "c", {}, frames=_frames(0))
    change(sample)
    with pytest.raises(BadSample) as caught:
        decode_sample(sample, RAW)
    assert caught.value.reason == reason


def test_latent_samples_must_be_finite_and_shaped():
    spec = SampleSpec("latent", (2, 4, 4, 3), latent_shape=(2, 2, 2, 12))
    good = encode_sample("k", "c", {}, latent=np.ones((2, 2, 2, 12), np.float16))
    assert decode_sample(good, spec)["latents"].dtype == np.float32
    bad = np.ones((2, 2, 2, 12), np.float16)
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(BadSample, match="NaN or inf"):
        decode_sample(encode_sample("k", "c", {}, latent=bad), spec)
    with pytest.raises(BadSample, match="shape"):
        decode_sample(encode_sample("k", "c", {}, latent=np.ones((2, 2, 2, 4), np.float16)), spec)


def test_manifest_checks(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(tmp_path)
    manifest = new_manifest("raw", VIDEO, samples=5, num_shards=0, shards=[])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="samples is 5 but the shards hold 0"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="need 'codec'"):
        write_manifest(tmp_path, new_manifest("latent", VIDEO))
    with pytest.raises(ValueError, match="kind must be one of"):
        new_manifest("pixels", VIDEO)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["shards"][0].pop("samples"), "'shards' must list objects with a 'name', a 'sha256' and a count of "
                                              "'samples' >= 0"),
    (lambda m: m["shards"][0].pop("sha256"), "'shards' must list objects with a 'name', a 'sha256'"),
    (lambda m: m.update(shards="shard-000000.tar"), "'shards' must list objects"),
    (lambda m: m.update(video=None), "'video' must give frames, height and width as integers >= 1, got None"),
    (lambda m: m["video"].pop("height"), "'video' must give frames, height and width"),
    (lambda m: m["video"].update(frames="8"), "'video' must give frames, height and width"),
])
def test_a_manifest_of_the_wrong_shape_is_one_error_naming_it(tmp_path, change, message):
    manifest = _write_folder(tmp_path, count=3, per_shard=3)
    change(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=re.escape(f"{tmp_path / 'manifest.json'}: {message}")):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda d: (d / "shard-000001.tar").write_bytes((d / "shard-000001.tar").read_bytes()[:-3000]), "sha256"),
        (lambda d: (d / "shard-000002.tar").unlink(), "missing"),
        (lambda d: (d / "shard-000003.tar.tmp").write_bytes(b"half"), "half-written"),
        (lambda d: (d / ".staging-x1y2").mkdir(), ".staging-x1y2 is left from a run that did not finish"),
        (lambda d: (d / "shard-000009.tar").write_bytes(b""), "not in the manifest"),
        (lambda d: (d / "manifest.json").unlink(), "not found"),
    ],
)
def test_verify_finds_damage(tmp_path, damage, problem):
    _write_folder(tmp_path)
    assert verify_folder(tmp_path)["ok"]
    assert data_main(["verify", str(tmp_path)]) == 0
    damage(tmp_path)
    report = verify_folder(tmp_path)
    assert not report["ok"] and any(problem in p for p in report["problems"]), report["problems"]
    assert data_main(["verify", str(tmp_path)]) == 1


def _dataset_root(folder):
    _write_folder(folder / "train")
    _write_folder(folder / "val", count=2)
    return folder


@pytest.mark.parametrize("not_a_shard_folder,hint", [
    (lambda d: d / "typo", "make one with `flowvid data from-videos`"),
    (lambda d: d / "notes.txt", "make one with `flowvid data from-videos`"),
    (lambda d: _dataset_root(d / "dataset"), "it holds the shard folders"),
])
def test_verify_takes_a_path_that_is_no_shard_folder_for_a_mistake_as_describe_does(
        tmp_path, capsys, not_a_shard_folder, hint):
    (tmp_path / "notes.txt").write_text("not shards")
    path = not_a_shard_folder(tmp_path)
    assert data_main(["describe", str(path)]) == 2
    described = capsys.readouterr().err
    assert data_main(["verify", str(path)]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("flowvid data verify: error: ") and described.startswith("flowvid data describe: ")
    assert printed.err.split(": error: ")[1] == described.split(": error: ")[1]
    assert len(described.strip().splitlines()) == 1 and hint in described
    assert "DAMAGED" not in printed.out
    if path.name == "dataset":
        assert f"{path / 'train'} and {path / 'val'}: give one of those" in " ".join(described.split())
    with pytest.raises(ManifestError, match="does not exist" if path.name == "typo" else "is not a finished shard"):
        verify_folder(path)

    _write_folder(tmp_path / "whole")
    assert data_main(["verify", str(tmp_path / "whole"), str(path)]) == 2  # the others are still verified
    assert f"OK {tmp_path / 'whole'}: 7 samples in 3 shards" in " ".join(capsys.readouterr().out.split())


def test_a_shard_folder_without_its_manifest_is_damaged_not_a_mistake(tmp_path, capsys):
    _write_folder(tmp_path)
    (tmp_path / "manifest.json").unlink()
    assert data_main(["verify", str(tmp_path)]) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_verify_counts_the_shards_it_found_and_lists_the_missing_ones_as_problems(tmp_path, capsys):
    _write_folder(tmp_path, count=7, per_shard=3)
    (tmp_path / "shard-000001.tar").unlink()
    assert data_main(["verify", str(tmp_path)]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert f"DAMAGED {tmp_path}: 4 samples in 2 shards" in printed
    assert "problem shard shard-000001.tar is missing" in printed


def test_verify_json_gives_the_counts_of_the_report_with_the_same_exit_status(tmp_path, capsys):
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    _write_folder(whole, count=7, per_shard=3)
    _write_folder(damaged, count=7, per_shard=3)
    (damaged / "shard-000001.tar").unlink()
    capsys.readouterr()

    assert data_main(["verify", str(whole), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # one folder: one object, and nothing but JSON on stdout
    assert (report["folder"], report["kind"], report["ok"]) == (str(whole), "raw", True)
    assert (report["samples"], report["shards_found"], report["problems"]) == (7, 3, [])
    assert [(row["name"], row["listed"], row["found"], row["bad"], row["checksum"]) for row in report["shards"]] == [
        ("shard-000000.tar", 3, 3, 0, "ok"), ("shard-000001.tar", 3, 3, 0, "ok"), ("shard-000002.tar", 1, 1, 0, "ok")]

    assert data_main(["verify", str(whole), str(damaged), "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [(r["ok"], r["samples"], r["shards_found"]) for r in reports] == [(True, 7, 3), (False, 4, 2)]
    assert "shard shard-000001.tar is missing" in reports[1]["problems"]
    assert reports[1]["shards"][1]["checksum"] == "missing"

    assert data_main(["verify", str(whole), str(tmp_path / "typo"), "--json"]) == 2
    printed = capsys.readouterr()
    assert [r["folder"] for r in json.loads(printed.out)] == [str(whole)]  # several folders given: a list
    assert f"flowvid data verify: error: {tmp_path / 'typo'} does not exist" in " ".join(printed.err.split())


def test_verify_reads_each_shard_once(tmp_path, monkeypatch):
    _write_folder(tmp_path, count=7, per_shard=3)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert verify_folder(tmp_path)["ok"]
    assert sorted(opened) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


@pytest.mark.parametrize("damage", [
    lambda data: data,
    lambda data: data[:len(data) // 2],
    lambda data: bytes(len(data)),  # zeros: an archive without a sample, and no end of it read
    lambda data: data[:700] + bytes([data[700] ^ 0xFF]) + data[701:],  # inside the first sample's frames
    lambda data: data[:300] + b"x" + data[301:],  # inside the first header
])
def test_the_digest_iter_tar_feeds_is_the_whole_files_however_it_ends(tmp_path, damage):
    _write_folder(tmp_path, count=3, per_shard=3)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(damage(shard.read_bytes()))
    digest = hashlib.sha256()
    with contextlib.suppress(BrokenShard):
        for _ in iter_tar(shard, digest):
            pass
    assert digest.hexdigest() == file_sha256(shard)


def test_verify_finds_a_changed_byte_in_a_sample_that_still_decodes(tmp_path):
    _write_folder(tmp_path, count=3, per_shard=3)
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[data.index(bytes([1] * 16))] = 2  # one pixel of clip001's frames: still a valid sample
    shard.write_bytes(bytes(data))
    report = verify_folder(tmp_path)
    assert report["shards"][0] == {"name": "shard-000000.tar", "listed": 3, "found": 3, "bad": 0,
                                   "checksum": "MISMATCH"}
    # The tools that check skip a changed shard whole: verify counts none of its samples as good.
    assert report["samples"] == 0 and report["problems"] == [
        "shard shard-000000.tar: checksum: sha256 differs from the manifest, though the shard reads whole: its bytes "
        "changed after it was written, so none of its 3 samples is good (encode-latents skips them; training reads "
        "them)",
        "found 0 good samples, the manifest lists 3"]


def test_verify_catches_a_bad_sample_behind_a_valid_checksum(tmp_path):
    with ShardFolderWriter(tmp_path) as writer:
        writer.write(encode_sample("good", "c", {}, frames=_frames(0)))
        writer.write(encode_sample("bad", "c", {}, frames=np.zeros((3, 4, 4, 3), np.uint8)))
    write_manifest(tmp_path, new_manifest("raw", VIDEO, samples=2, num_shards=1, shards=writer.shards))
    report = verify_folder(tmp_path)
    assert not report["ok"] and report["shards"][0]["bad"] == 1 and report["samples"] == 1


def test_verify_names_both_shards_of_a_repeated_key_also_two_samples_of_one_key_in_a_row(tmp_path):
    with ShardFolderWriter(tmp_path, max_samples=2) as writer:
        for key in ("a", "b", "c", "a", "d", "d"):
            writer.write(encode_sample(key, "c", {}, frames=_frames(0)))
    write_manifest(tmp_path, new_manifest("raw", VIDEO, samples=6, num_shards=3, shards=writer.shards))
    report = verify_folder(tmp_path)
    assert report["problems"] == ["shard shard-000001.tar: duplicate_key: 'a', also in shard shard-000000.tar",
                                  "shard shard-000002.tar: duplicate_key: 'd', also in shard shard-000002.tar"]


def test_describe_reads_the_manifest_and_the_first_captions(tmp_path, capsys):
    manifest = _write_folder(tmp_path, count=7, per_shard=3)
    description = describe_folder(tmp_path, captions=2)
    assert (description["kind"], description["samples"], description["shards"]) == ("raw", 7, 3)
    assert description["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    assert description["video"] == {**VIDEO, "clip_seconds": 0.25}
    assert description["hours"] == pytest.approx(7 * 0.25 / 3600)
    assert description["captions"] == ["caption 0", "caption 1"]
    assert describe_folder(tmp_path, captions=5)["captions"] == ["caption 0", "caption 1", "caption 2"]  # first shard only

    assert data_main(["describe", str(tmp_path), "--json", "--captions", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == description
    assert data_main(["describe", str(tmp_path), str(tmp_path), "--json", "--captions", "0"]) == 0
    assert [d["samples"] for d in json.loads(capsys.readouterr().out)] == [manifest["samples"]] * 2
    assert data_main(["describe", str(tmp_path)]) == 0
    printed = capsys.readouterr().out  # the description, on stdout
    assert "caption 0" in printed and "2 frames of 4x4 at 8 fps" in printed
    assert "1.8 s" in printed  # 7 clips of 0.25 s, in seconds rather than as 0.00 h


def test_describe_names_what_is_wrong_and_reads_a_damaged_shard_up_to_the_damage(tmp_path):
    with console.capture() as printed:
        assert data_main(["describe", str(tmp_path)]) == 2
    assert "manifest.json not found" in printed.get()
    far = tmp_path / ("a-folder-whose-name-is-longer-than-the-console-is-wide-" * 2)
    far.mkdir()
    with console.capture() as printed:
        assert data_main(["describe", str(far)]) == 2
    assert f"{far / 'manifest.json'} not found" in printed.get()  # whole, to be copied
    _write_folder(tmp_path, count=3, per_shard=3)
    with console.capture() as printed:
        assert data_main(["describe", str(tmp_path), "--captions", "-1"]) == 2
    assert "--captions must be >= 0" in " ".join(printed.get().split())
    shard = tmp_path / "shard-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    captions = describe_folder(tmp_path, captions=3)["captions"]
    assert 0 < len(captions) < 3 and captions == [f"caption {i}" for i in range(len(captions))]
    with console.capture() as printed:
        assert data_main(["describe", str(tmp_path)]) == 0
    assert "flowvid data verify" in printed.get()


def test_describe_warns_of_missing_resized_and_zero_filled_shards_without_reading_them_all(tmp_path):
    listed = _write_folder(tmp_path, count=7, per_shard=3)["shards"]
    assert describe_folder(tmp_path)["warnings"] == []
    first, second, third = sorted(tmp_path.glob("shard-*.tar"))
    first.write_bytes(bytes(first.stat().st_size))  # zeros read as an archive without a sample
    second.unlink()
    third.write_bytes(third.read_bytes()[:1000])
    description = describe_folder(tmp_path, captions=2)
    assert description["captions"] == []
    assert description["warnings"] == [
        "shard shard-000001.tar is missing",
        f"shard shard-000002.tar is 1000 bytes, the manifest lists {listed[2]['bytes']}",
        "shard shard-000000.tar ends after 0 samples, the manifest lists 3",
    ]
    with console.capture() as printed:
        assert data_main(["describe", str(tmp_path)]) == 0
    assert f"shard-000000.tar ends after 0 samples, the manifest lists 3 (run `flowvid data verify {tmp_path}`)" \
        in " ".join(printed.get().split())


def test_describe_warns_once_of_a_missing_first_shard(tmp_path, capsys):
    _write_folder(tmp_path, count=7, per_shard=3)
    (tmp_path / "shard-000000.tar").unlink()
    description = describe_folder(tmp_path)
    assert description["warnings"] == ["shard shard-000000.tar is missing"] and description["captions"] == []
    assert data_main(["describe", str(tmp_path)]) == 0
    assert capsys.readouterr().err.count("warning:") == 1


def test_describe_describes_every_folder_it_can_and_names_each_it_cannot(tmp_path, capsys):
    _write_folder(tmp_path / "a", count=2)
    _write_folder(tmp_path / "c", count=5)
    folders = [str(tmp_path / name) for name in ("a", "typo", "c", "also-typo")]
    assert data_main(["describe", *folders]) == 2
    printed = capsys.readouterr()
    assert f"describe {tmp_path / 'a'}" in printed.out and f"describe {tmp_path / 'c'}" in printed.out
    errors = printed.err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("flowvid data describe: error:") for line in errors)
    assert str(tmp_path / "typo") in errors[0] and str(tmp_path / "also-typo") in errors[1]

    assert data_main(["describe", *folders, "--json"]) == 2
    assert [d["samples"] for d in json.loads(capsys.readouterr().out)] == [2, 5]
