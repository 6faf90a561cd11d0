"""Sidecar captions as from-videos and score find them, weight files torch cannot read safely, the words a
trained text encoder never learned, and the wording of an empty video file."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.clips import ClipSpec
from data_tools.from_videos import convert_videos
from flowvid.cli import main
from flowvid.files import read_torch_file
from flowvid.media import read_frames_at, write_video
from test_product_generate_score import checkpoint  # noqa: F401 (fixture)

SPEC = ClipSpec(frames=4, height=16, width=16, fps=None, stride=None)


def moving_square(frames: int = 8) -> np.ndarray:
    video = np.full((frames, 16, 16, 3), 30, np.uint8)
    for index in range(frames):
        video[index, 4:8, index:index + 4] = 250
    return video


def video_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, moving_square(), fps=8, container="mp4")
    return path


def captions_written(out: Path) -> set[str]:
    from flowvid.data import iter_tar

    return {sample["txt"].decode() for shard in sorted(out.glob("*.tar")) for sample in iter_tar(shard)}


def test_a_video_named_with_a_txt_extension_is_read_and_never_its_own_caption(tmp_path):
    video = video_file(tmp_path / "vids" / "wrongext.txt")
    summary = convert_videos([str(video)], tmp_path / "out", SPEC, default_caption="a white square")
    assert summary["skipped"] == [] and summary["written"] == 2
    assert captions_written(tmp_path / "out") == {"a white square"}


def test_a_sidecar_is_read_under_the_stem_or_the_full_name_and_both_are_refused_as_ambiguous(tmp_path):
    vids = tmp_path / "vids"
    video_file(vids / "green.mp4")
    (vids / "green.mp4.txt").write_text("a green square\n")
    convert_videos([str(vids)], tmp_path / "full", SPEC)
    assert captions_written(tmp_path / "full") == {"a green square"}

    (vids / "green.txt").write_text("an old caption\n")
    summary = convert_videos([str(vids)], tmp_path / "both", SPEC, default_caption="x")
    [skip] = summary["skipped"]
    assert skip["reason"] == "ambiguous caption: both green.txt and green.mp4.txt fit green.mp4; keep one of them"


def test_a_video_without_a_caption_is_skipped_naming_the_sidecars_looked_for(tmp_path):
    vids = tmp_path / "vids"
    video_file(vids / "green.mp4")
    video_file(vids / "red.mp4")
    (vids / "red.txt").write_text("a red square")
    summary = convert_videos([str(vids)], tmp_path / "out", SPEC)
    [skip] = summary["skipped"]
    assert skip["reason"].startswith("no caption (no sidecar green.txt or green.mp4.txt, no --captions entry")


def score_lines(checkpoint, out: Path, *arguments) -> dict[str, dict]:
    assert main(["score", "--ckpt", str(checkpoint), *arguments, "--out", str(out)]) == 0
    return {Path(line["path"]).name: line for line in map(json.loads, out.read_text().splitlines())}


def test_score_reads_the_sidecars_from_videos_reads_and_its_caption_is_their_default(checkpoint, tmp_path,
                                                                                      capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.npy", "b.npy", "c.npy"):
        np.save(clips / name, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (clips / "a.txt").write_text("a red circle\n")
    (clips / "b.npy.txt").write_text("a blue square")
    plain = score_lines(checkpoint, tmp_path / "plain.jsonl", "--input", str(clips))
    assert [plain[name]["caption"] for name in ("a.npy", "b.npy", "c.npy")] == ["a red circle", "a blue square", ""]
    assert "left out" not in capsys.readouterr().out  # the sidecars are read, not left out
    given = score_lines(checkpoint, tmp_path / "given.jsonl", "--input", str(clips), "--caption", "a circle")
    assert [given[name]["caption"] for name in ("a.npy", "b.npy", "c.npy")] == ["a red circle", "a blue square",
                                                                                "a circle"]


def test_a_pickled_model_given_as_weights_says_to_save_its_state_dict(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError) as refused:
        read_torch_file(path, "I3D weights")
    message = str(refused.value)
    assert message == (f"cannot read I3D weights {path}: it holds a pickled torch.nn.modules.linear.Linear object, "
                       "not a state dict of tensors; save `model.state_dict()` rather than the model itself")


@pytest.mark.parametrize("content", [b"junk\n", b'{"weights": [1, 2]}'], ids=["junk", "json"])
def test_a_file_of_another_kind_given_as_weights_is_one_plain_line(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        read_torch_file(path, "I3D weights")
    assert str(refused.value) == f"cannot read I3D weights {path}: truncated, or not a PyTorch file"


def test_a_trained_encoder_counts_the_distinct_words_it_names():
    from flowvid.text.learned import LearnedTextEncoder

    encoder = LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8).eval()
    with pytest.warns(UserWarning, match=re.escape("never learned 2 word(s) of the text it was given ('dog', 'runs')")):
        encoder(["dog runs dog dog"])
    assert encoder.unknown_count == 4


def test_an_empty_video_file_has_the_one_wording_of_from_videos(tmp_path, checkpoint):
    from flowvid.media import EmptyVideo

    empty = tmp_path / "vids" / "empty.mp4"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    summary = convert_videos([str(empty)], tmp_path / "out", SPEC, default_caption="")
    [skip] = summary["skipped"]
    with pytest.raises(EmptyVideo) as refused:
        read_frames_at(empty, None)
    assert refused.value.reason == skip["reason"] == "empty file"
    out = tmp_path / "scores.jsonl"
    main(["score", "--ckpt", str(checkpoint), "--input", str(empty), "--out", str(out)])
    assert json.loads(out.read_text())["error"] == "empty file"
