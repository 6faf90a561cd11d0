"""`flowvid score`: the caption each line was scored under, videos a captions table lacks told apart from
unreadable ones, captions tables that are not UTF-8, and the samples of a `flowvid generate` folder."""

import json
from pathlib import Path

import numpy as np
import pytest

from flowvid.cli import main
from flowvid.data import iter_tar
from test_product_generate_score import checkpoint, one_line_error, unconditional_checkpoint  # noqa: F401 (fixtures)


def score_lines(checkpoint, out: Path, *arguments) -> dict[str, dict]:
    assert main(["score", "--ckpt", str(checkpoint), *arguments, "--out", str(out)]) == 0
    return {Path(line["path"]).name: line for line in map(json.loads, out.read_text().splitlines())}


def random_clips(folder: Path, *names: str) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        np.save(folder / name, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return folder


def test_every_score_line_names_the_caption_it_was_scored_under(checkpoint, tmp_path):
    from flowvid.data import write_synthetic_dataset

    clips = random_clips(tmp_path / "clips", "a.npy", "b.npy")
    (tmp_path / "captions.csv").write_text("a.npy,a red circle\nb.npy,a blue square\n")
    given = score_lines(checkpoint, tmp_path / "given.jsonl", "--input", str(clips), "--caption", "a green star")
    assert [given[name]["caption"] for name in ("a.npy", "b.npy")] == ["a green star", "a green star"]
    plain = score_lines(checkpoint, tmp_path / "plain.jsonl", "--input", str(clips))
    assert [plain[name]["caption"] for name in ("a.npy", "b.npy")] == ["", ""]
    table = score_lines(checkpoint, tmp_path / "table.jsonl", "--input", str(clips),
                        "--captions", str(tmp_path / "captions.csv"))
    assert [table[name]["caption"] for name in ("a.npy", "b.npy")] == ["a red circle", "a blue square"]

    write_synthetic_dataset(tmp_path / "data", num_videos=3, frames=4, size=8, val_videos=1, shard_samples=8)
    shards = tmp_path / "data" / "train"
    own = {f"{shard}:{sample['__key__']}": sample["txt"].decode()
           for shard in sorted(shards.glob("*.tar")) for sample in iter_tar(shard)}
    out = tmp_path / "shards.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(shards), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(own) and {line["path"]: line["caption"] for line in lines} == own


def test_a_model_without_text_names_the_empty_caption_whatever_a_sample_holds(unconditional_checkpoint, tmp_path):
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=4, size=8, val_videos=1, shard_samples=8)
    shards = tmp_path / "data" / "train"
    assert all(sample["txt"] for shard in shards.glob("*.tar") for sample in iter_tar(shard))
    out = tmp_path / "shards.jsonl"
    assert main(["score", "--ckpt", str(unconditional_checkpoint), "--input", str(shards), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and all(line["caption"] == "" and "bits_per_dim" in line for line in lines)


def test_a_video_the_captions_table_lacks_is_told_apart_from_one_that_cannot_be_read(checkpoint, tmp_path, capsys):
    clips = random_clips(tmp_path / "clips", "captioned.npy", "uncaptioned.npy")
    (clips / "truncated.npy").write_bytes((clips / "captioned.npy").read_bytes()[:100])
    (clips / "broken.mp4").write_bytes(b"not a video")
    table = tmp_path / "captions.csv"
    table.write_text("path,caption\nclips/captioned.npy,a red circle\n")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(clips), "--captions", str(table),
                 "--out", str(out)]) == 0
    lines = {Path(line["path"]).name: line for line in map(json.loads, out.read_text().splitlines())}
    assert lines["uncaptioned.npy"]["caption"] is None
    assert lines["uncaptioned.npy"]["error"].startswith(f"no caption: --captions {table} has no row for it")
    # Neither has a row either, but what keeps them from a score is the file.
    assert lines["truncated.npy"]["error"].startswith(f"cannot read {clips / 'truncated.npy'}")
    assert lines["broken.mp4"]["error"].startswith(f"cannot decode video {clips / 'broken.mp4'}")
    assert "caption" not in lines["truncated.npy"] and "caption" not in lines["broken.mp4"]
    summary = capsys.readouterr().out
    assert f"scored 1 video into {out}; 1 without a caption (listed); 2 could not be read (listed)" in summary


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_captions_table_that_is_not_utf8_is_named_with_what_to_do_by_score_and_from_videos(tmp_path, capsys,
                                                                                             encoding):
    clip = random_clips(tmp_path / "clips", "clip.npy") / "clip.npy"
    table = tmp_path / "captions.csv"
    table.write_bytes("path,caption\nclip.npy,une scène d'été\n".encode(encoding))
    expected = f"captions file {table} is not UTF-8 text: "
    # A checkpoint that is not there: the table is refused before the model loads.
    assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(clip), "--captions", str(table),
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    assert expected in (error := one_line_error(capsys)) and error.rstrip().endswith("; save it as UTF-8")
    assert main(["data", "from-videos", str(clip), "--captions", str(table), "--frames", "4", "--size", "8",
                 "--out", str(tmp_path / "shards")]) == 2
    assert expected in (error := one_line_error(capsys)) and error.rstrip().endswith("; save it as UTF-8")


# --- the samples of a `flowvid generate` folder ------------------------------------------------------


@pytest.fixture(scope="module")
def extended(checkpoint, tmp_path_factory):
    """A folder `flowvid generate --task extend` wrote: two samples, each recording its prompt."""
    folder = tmp_path_factory.mktemp("extended")
    np.save(folder / "clip.npy", np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    assert main(["generate", "--ckpt", str(checkpoint), "--task", "extend", "--video", str(folder / "clip.npy"),
                 "--frames", "6", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--out", str(folder / "samples")]) == 0
    return folder / "samples"


def test_a_generated_sample_is_scored_under_the_caption_it_was_sampled_under(checkpoint, extended, tmp_path):
    lines = score_lines(checkpoint, tmp_path / "folder.jsonl", "--input", str(extended))
    records = {path.with_suffix(".npy").name: json.loads(path.read_text()) for path in extended.glob("*.json")}
    assert sorted(lines) == sorted(records)
    for index, name in enumerate(sorted(lines)):
        # As the model was given it: with the task's prefix.
        assert lines[name]["caption"] == "(extend) " + records[name]["prompt"]
        alone = score_lines(checkpoint, tmp_path / "alone.jsonl", "--input", str(extended / name),
                            "--caption", lines[name]["caption"], "--seed", str(index))[name]
        assert lines[name]["bits_per_dim_per_frame"] == alone["bits_per_dim_per_frame"]


def test_a_caption_or_a_table_given_for_generated_samples_wins_over_their_records(checkpoint, extended, tmp_path):
    own = score_lines(checkpoint, tmp_path / "own.jsonl", "--input", str(extended))
    empty = score_lines(checkpoint, tmp_path / "empty.jsonl", "--input", str(extended), "--caption", "")
    assert [line["caption"] for line in empty.values()] == ["", ""]
    assert all(empty[name]["bits_per_dim"] != own[name]["bits_per_dim"] for name in own)
    first = sorted(own)[0]
    (tmp_path / "captions.csv").write_text(f"{first},a green star\n")
    table = score_lines(checkpoint, tmp_path / "table.jsonl", "--input", str(extended),
                        "--captions", str(tmp_path / "captions.csv"))
    assert table[first]["caption"] == "a green star"
    assert [line["caption"] for name, line in table.items() if name != first] == [None]


def test_a_record_without_the_caption_the_model_saw_gives_its_prompt_with_the_tasks_prefix(checkpoint, extended,
                                                                                          tmp_path):
    [name, _] = sorted(path.stem for path in extended.glob("*.json"))
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / f"{name}.npy").write_bytes((extended / f"{name}.npy").read_bytes())
    record = json.loads((extended / f"{name}.json").read_text())
    seen = record.pop("caption_seen_by_model")
    (copied / f"{name}.json").write_text(json.dumps(record))
    (copied / "notes.npy").write_bytes((extended / f"{name}.npy").read_bytes())
    (copied / "notes.json").write_text(json.dumps({"prompt": "a green star"}))  # not a record generate wrote
    lines = score_lines(checkpoint, tmp_path / "s.jsonl", "--input", str(copied))
    assert lines[f"{name}.npy"]["caption"] == seen and seen.startswith("(extend) ")
    assert lines["notes.npy"]["caption"] == ""
