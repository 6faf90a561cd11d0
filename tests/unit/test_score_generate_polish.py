"""`flowvid score` and `flowvid generate` where a user meets their rough edges: Ctrl-C while scoring, the
latents of a sample given to score, files of a folder that are not videos, the seed's option, where
`--stream` writes, and a folder of streamed and plain samples."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowvid.cli import main
from test_product_generate_score import checkpoint, one_line_error  # noqa: F401 (a fixture)
from test_generate_rough_edges import interrupt_on_call


def score(checkpoint, out, *inputs) -> int:
    return main(["score", "--ckpt", str(checkpoint), "--input", *map(str, inputs), "--out", str(out)])


def a_video(path: Path) -> Path:
    np.save(path, (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8))
    return path


# --- score: Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_while_scoring_is_one_line_exits_130_and_leaves_the_scores_file_as_it_was(checkpoint, tmp_path,
                                                                                          capsys, monkeypatch):
    import flowvid.score

    videos = [a_video(tmp_path / f"v{i}.npy") for i in range(3)]
    out = tmp_path / "scores.jsonl"
    out.write_text("an earlier run's scores\n")
    interrupt_on_call(monkeypatch, flowvid.score, "score_work", call=2)
    assert score(checkpoint, out, *videos) == 130
    assert one_line_error(capsys) == (f"flowvid score: interrupted before every video was scored; nothing was "
                                      f"written to {out}\n")
    assert out.read_text() == "an earlier run's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl", "v0.npy", "v1.npy", "v2.npy"]


def test_ctrl_c_while_the_model_loads_is_one_line_and_exits_130(checkpoint, tmp_path, capsys, monkeypatch):
    import flowvid.loading

    interrupt_on_call(monkeypatch, flowvid.loading, "load_model", call=1)
    assert score(checkpoint, tmp_path / "s.jsonl", a_video(tmp_path / "v.npy")) == 130
    assert "interrupted" in one_line_error(capsys) and not (tmp_path / "s.jsonl").exists()


def test_score_exits_on_ctrl_c_with_generates_status_and_says_so_in_its_help(capsys):
    import flowvid.generate
    import flowvid.score

    assert flowvid.score.CTRL_C_EXIT_STATUS is flowvid.generate.CTRL_C_EXIT_STATUS
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "130 when stopped by Ctrl-C" in " ".join(capsys.readouterr().out.split())


# --- score: what it is given -------------------------------------------------------------------------


def test_the_latents_of_a_generated_sample_say_to_score_its_frames(checkpoint, tmp_path):
    latents, floats = tmp_path / "t2v_000_x.latent.npy", tmp_path / "floats.npy"
    for path in (latents, floats):
        np.save(path, np.zeros((2, 4, 4, 12), np.float32))
    out = tmp_path / "s.jsonl"
    assert score(checkpoint, out, latents, floats) == 1
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[latents.name]["error"].endswith(f"score its frames, {tmp_path / 't2v_000_x.npy'} "
                                                   f"(or {tmp_path / 't2v_000_x.mp4'}), instead")
    # Another array of floats is no sample's latents.
    assert records["floats.npy"]["error"].endswith("expected uint8 (T, H, W, 3)")


def a_folder_with_a_sample_and_other_files(folder: Path) -> Path:
    """A folder with one video, a generated sample's files (its array, record, latents and streamed frames)
    and two files that are no videos."""
    sub = folder / "sample"
    (sub / "t2v_000_x.stream").mkdir(parents=True)
    a_video(folder / "clip.npy")
    a_video(sub / "t2v_000_x.npy")
    (sub / "t2v_000_x.json").write_text("{}")
    np.save(sub / "t2v_000_x.latent.npy", np.zeros((2, 4, 4, 12), np.float32))
    (sub / "t2v_000_x.stream" / "frame_000.png").write_bytes(b"png")
    (folder / "first.png").write_bytes(b"png")
    (folder / "notes.txt").write_text("notes")
    return folder


def test_the_files_of_a_folder_that_are_not_videos_are_listed_apart_and_a_samples_own_are_not(tmp_path):
    from flowvid.score import listing_of

    folder = a_folder_with_a_sample_and_other_files(tmp_path)
    listing = listing_of([str(folder)])
    assert sorted(p.name for p in listing.entries) == ["clip.npy", "t2v_000_x.npy"]
    assert listing.not_videos == [folder / "first.png", folder / "notes.txt"]


def test_the_summary_says_how_many_files_of_a_folder_are_not_videos(checkpoint, tmp_path, capsys):
    folder = a_folder_with_a_sample_and_other_files(tmp_path / "in")
    assert score(checkpoint, tmp_path / "s.jsonl", folder) == 0
    assert capsys.readouterr().out.strip().endswith("; left out 2 files that are not videos")
    (folder / "notes.txt").unlink()
    assert score(checkpoint, tmp_path / "s.jsonl", folder) == 0
    assert capsys.readouterr().out.strip().endswith("; left out 1 file that is not a video")


def test_the_captions_table_in_the_folder_is_not_counted_as_left_out(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    a_video(folder / "clip.npy")
    (folder / "notes.txt").write_text("notes")
    (folder / "captions.csv").write_text("path,caption\nclip.npy,a red circle\n")
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(folder), "--captions",
                 str(folder / "captions.csv"), "--out", str(tmp_path / "s.jsonl")]) == 0
    assert capsys.readouterr().out.strip().endswith("; left out 1 file that is not a video")


# --- generate ------------------------------------------------------------------------------------------


def test_a_seed_out_of_range_for_several_prompts_names_the_option(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "a", "--prompt", "b",
                 "--seed", "4294967295", "--out", str(tmp_path / "o")]) == 2
    assert "flowvid generate: error: --seed must be an integer from 0 to 4,294,967,294 for 2 samples" in (
        one_line_error(capsys))


def test_the_help_of_stream_says_where_the_frames_go(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "NAME.stream/frame_000.png" in " ".join(capsys.readouterr().out.split())


def test_streamed_and_plain_samples_are_not_mixed_in_one_folder(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--skip-existing"]
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    assert main([*args, "--out", str(plain)]) == 0
    assert main([*args, "--stream", "--out", str(streamed)]) == 0
    [record] = [json.loads(p.read_text()) for p in plain.glob("*.json")]
    assert "stream" not in record  # as records written before it was recorded: they stay valid
    [record] = [json.loads(p.read_text()) for p in streamed.glob("*.json")]
    assert record["stream"] is True
    capsys.readouterr()
    assert main([*args, "--stream", "--out", str(plain)]) == 2
    assert "stream: written without --stream, now with it" in one_line_error(capsys)
    assert main([*args, "--out", str(streamed)]) == 2
    assert "stream: written with --stream, now without it" in one_line_error(capsys)
    assert main([*args, "--stream", "--out", str(streamed)]) == 0  # the same request: kept
    assert "1 of 1 samples are in" in capsys.readouterr().err


def test_skip_existing_streams_again_a_sample_whose_frames_folder_is_gone(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--skip-existing", "--stream",
            "--out", str(tmp_path)]
    assert main(args) == 0
    [frames] = tmp_path.glob("*.stream")
    written = sorted(path.name for path in frames.iterdir())
    shutil.rmtree(frames)
    capsys.readouterr()
    assert main(args) == 0
    assert "wrote 1 sample to" in capsys.readouterr().out
    assert sorted(path.name for path in frames.iterdir()) == written
