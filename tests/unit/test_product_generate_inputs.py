"""What `flowvid generate`, `flowvid score` and `VideoPipeline` make of the files and settings users give."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowvid.cli import main
from flowvid.export import build_module
from test_product_generate_score import CONFIG, checkpoint, one_line_error  # noqa: F401 (a fixture)


def generate(checkpoint, out, *extra) -> int:
    return main(["generate", "--ckpt", str(checkpoint), "--out", str(out), *extra])


def only_video(folder: Path) -> np.ndarray:
    [npy] = [p for p in folder.glob("*.npy") if not p.name.endswith(".latent.npy")]
    return np.load(npy)


# --- the output folder's records ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--skip-existing"]])
def test_a_run_reads_each_record_of_the_output_folder_once(checkpoint, tmp_path, monkeypatch, mode):
    out = tmp_path / "out"
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square"]
    assert generate(checkpoint, out, *prompts) == 0
    (out / "notes.json").write_text('{"not": "a sample"}')
    reads: list[str] = []
    read_text = Path.read_text

    def counting(path, *args, **kwargs):
        if path.parent == out and path.suffix == ".json":
            reads.append(path.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    assert generate(checkpoint, out, *prompts, *mode) == 0
    assert sorted(reads) == sorted(p.name for p in out.glob("*.json"))  # every one, once


def test_a_record_that_is_json_but_no_samples_is_named_by_skip_existing(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(checkpoint, out, "--prompt", "x") == 0
    [record] = out.glob("*.json")
    record.write_text("null")
    capsys.readouterr()
    assert generate(checkpoint, out, "--prompt", "x", "--skip-existing") == 2
    assert f"cannot read {record} to skip its sample: it holds no sample's record" in one_line_error(capsys)


# --- several samples of each prompt --------------------------------------------------------------


def written(folder: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """Each sample of ``folder`` by name: its record without the run's timings, and its frames."""
    samples = {}
    for path in sorted(folder.glob("*.json")):
        record = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("timings", "batch_size")}
        samples[path.stem] = record, np.load(path.with_suffix(".npy"))
    return samples


def test_samples_per_prompt_writes_what_the_prompts_repeated_in_a_row_write(checkpoint, tmp_path, capsys):
    two_each = ["--prompt", "a red circle", "--prompt", "a blue square", "--samples-per-prompt", "2"]
    assert generate(checkpoint, tmp_path / "n2", *two_each, "--batch-size", "3") == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    by_hand = ["--prompt", "a red circle"] * 2 + ["--prompt", "a blue square"] * 2
    assert generate(checkpoint, tmp_path / "repeated", *by_hand, "--batch-size", "3") == 0
    samples, expected = written(tmp_path / "n2"), written(tmp_path / "repeated")
    assert list(samples) == list(expected) == ["t2v_000_a-red-circle", "t2v_001_a-red-circle",
                                               "t2v_002_a-blue-square", "t2v_003_a-blue-square"]
    for name, (record, video) in samples.items():
        assert record == {**expected[name][0], "samples_per_prompt": 2}
        np.testing.assert_array_equal(video, expected[name][1])
    assert [record["seed"] for record, _ in samples.values()] == [0, 1, 2, 3]

    # One sample per prompt is a run as before: the same names and records, which resumption keeps.
    plain = ["--prompt", "a red circle", "--prompt", "a blue square"]
    assert generate(checkpoint, tmp_path / "n1", *plain) == 0
    assert all("samples_per_prompt" not in record for record, _ in written(tmp_path / "n1").values())
    capsys.readouterr()
    assert generate(checkpoint, tmp_path / "n1", *plain, "--samples-per-prompt", "1", "--skip-existing") == 0
    assert "2 of 2 samples are in" in capsys.readouterr().err


def test_skip_existing_resumes_samples_per_prompt_and_refuses_another_count(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    two_each = ["--prompt", "a red circle", "--prompt", "a blue square", "--samples-per-prompt", "2"]
    assert generate(checkpoint, out, *two_each) == 0
    (out / "t2v_003_a-blue-square.json").unlink()  # interrupted while writing the last sample
    capsys.readouterr()
    assert generate(checkpoint, out, *two_each, "--skip-existing") == 0
    captured = capsys.readouterr()
    assert "3 of 4 samples are in" in captured.err and "wrote 1 sample to" in captured.out
    # Three of each would leave this run's blue square at t2v_002 beside that run's three: a mix of both.
    for count, recorded in (("3", "samples_per_prompt 2, not 3"), ("1", "samples_per_prompt 2, not 1")):
        assert generate(checkpoint, out, *two_each[:-1], count, "--skip-existing") == 2
        assert f"was written by another request ({recorded})" in one_line_error(capsys)
    assert generate(checkpoint, out, *two_each[:-1], "3") == 2
    assert "holds a sample of another request (samples_per_prompt 2, not 3)" in one_line_error(capsys)


def test_samples_per_prompt_of_one_image_start_with_it(checkpoint, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "first.png")
    assert generate(checkpoint, tmp_path / "out", "--task", "i2v", "--image", str(tmp_path / "first.png"),
                    "--prompt", "x", "--samples-per-prompt", "2") == 0
    samples = written(tmp_path / "out")
    assert list(samples) == ["i2v_000_x", "i2v_001_x"]
    [first, second] = [video for _, video in samples.values()]
    assert np.array_equal(first[0], image) and np.array_equal(second[0], image) and not np.array_equal(first, second)


@pytest.mark.parametrize("count", ["0", "-2"])
def test_a_samples_per_prompt_below_one_is_refused_before_loading(tmp_path, capsys, count):
    never_read = tmp_path / "never-read.ckpt"
    assert generate(never_read, tmp_path / "out", "--prompt", "x", "--samples-per-prompt", count) == 2
    assert f"--samples-per-prompt must be an integer >= 1, got {count}" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_samples_per_prompt_that_is_no_integer_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        generate(tmp_path / "never-read.ckpt", tmp_path / "out", "--prompt", "x", "--samples-per-prompt", "1.5")
    assert exit_status.value.code == 2
    assert "argument --samples-per-prompt: invalid int value: '1.5'" in capsys.readouterr().err


# --- device and precision, as the caller names them ----------------------------------------------


def test_placement_errors_name_the_setting_as_the_caller_wrote_it(tmp_path, capsys, monkeypatch):
    from flowvid.pipeline import GenerateError, VideoPipeline

    never_read = tmp_path / "never-read.ckpt"  # placement is checked before the model loads
    with pytest.raises(GenerateError, match=r"^device 'bogus' is not a device; use auto, cpu"):
        VideoPipeline.from_pretrained(never_read, device="bogus")
    with pytest.raises(GenerateError, match=r"^precision 'fp16' is not one of auto, 32-true, bf16-mixed"):
        VideoPipeline.from_pretrained(never_read, device="cpu", precision="fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GenerateError, match=r"^device 'cuda': no CUDA device .*; use device 'cpu'$"):
        VideoPipeline.from_pretrained(never_read, device="cuda")
    for command in (["generate", "--prompt", "x"], ["score", "--input", str(tmp_path)]):
        assert main([command[0], "--ckpt", str(never_read), *command[1:], "--device", "cuda",
                     "--out", str(tmp_path / "out")]) == 2
        assert "--device 'cuda': no CUDA device" in (err := one_line_error(capsys)) and "use --device 'cpu'" in err


# --- images and videos to start from ------------------------------------------------------------


def count_reads(monkeypatch, owner, name: str, reads: list[str]) -> None:
    """Record the file name that each call of ``owner.name`` reads (a path, or an image opened from one)."""
    original = getattr(owner, name)

    def counted(source, *args, **kwargs):
        reads.append(Path(str(getattr(source, "filename", source))).name)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.filterwarnings("ignore:this model was trained with extend_prob 0")
def test_the_image_or_video_to_start_from_is_read_once(checkpoint, tmp_path, monkeypatch):
    """Its size, recorded as resized_from, comes from the one reading that gives the frames."""
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
    np.save(tmp_path / "wide.npy", rng.integers(0, 256, (2, 8, 16, 3), dtype=np.uint8))
    reads: list[str] = []
    count_reads(monkeypatch, ImageOps, "exif_transpose", reads)  # every image read turns it upright
    count_reads(monkeypatch, np, "load", reads)
    for task, option, name, size in (("i2v", "--image", "tall.png", [16, 12]),
                                     ("extend", "--video", "wide.npy", [8, 16])):
        out = tmp_path / task
        assert generate(checkpoint, out, "--task", task, option, str(tmp_path / name), "--prompt", "x") == 0
        assert reads.count(name) == 1
        [record] = [json.loads(p.read_text()) for p in out.glob("*.json")]
        assert record["resized_from"] == size


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_white(checkpoint, tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert generate(checkpoint, tmp_path / "out", "--task", "i2v", "--image", str(tmp_path / "deep.png"),
                    "--prompt", "x") == 0
    np.testing.assert_array_equal(only_video(tmp_path / "out")[0], np.repeat(grey[..., None], 3, axis=-1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_an_image_of_another_mode_starts_the_video_with_its_rgb_pixels(checkpoint, tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    image.save(tmp_path / "first.png")
    assert generate(checkpoint, tmp_path / "out", "--task", "i2v", "--image", str(tmp_path / "first.png"),
                    "--prompt", "x") == 0
    np.testing.assert_array_equal(only_video(tmp_path / "out")[0], np.asarray(image.convert("RGB")))


def test_an_image_of_floating_point_pixels_is_refused_not_read_black(checkpoint, tmp_path, capsys):
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tiff")
    assert generate(checkpoint, tmp_path / "out", "--task", "i2v", "--image", str(tmp_path / "float.tiff"),
                    "--prompt", "x") == 2
    assert "pixels are floating-point numbers; save it with 8 or 16 bits per channel" in one_line_error(capsys)


def test_i2v_from_a_video_file_starts_from_its_first_frame_the_only_one_decoded(checkpoint, tmp_path, monkeypatch):
    import flowvid.media
    from flowvid.media import fit_frame, read_frames, write_video
    from flowvid.pipeline import VideoPipeline

    rng = np.random.default_rng(0)
    write_video(tmp_path / "clip.mp4", rng.integers(0, 256, (6, 16, 12, 3), dtype=np.uint8))
    first = read_frames(tmp_path / "clip.mp4")[0]  # as decoded: H.264 is lossy
    Image.fromarray(first).save(tmp_path / "first.png")
    decoded: list[int] = []
    shown_frame = flowvid.media.shown_frame
    monkeypatch.setattr(flowvid.media, "shown_frame", lambda *args: decoded.append(1) or shown_frame(*args))
    args = ["--task", "i2v", "--prompt", "a red circle", "--seed", "4"]
    for name in ("clip.mp4", "first.png"):
        assert generate(checkpoint, tmp_path / f"from {name}", *args, "--image", str(tmp_path / name)) == 0
    assert len(decoded) == 1
    np.testing.assert_array_equal(only_video(tmp_path / "from clip.mp4"), only_video(tmp_path / "from first.png"))
    [from_video], [from_image] = ([json.loads(p.read_text()) for p in (tmp_path / f"from {name}").glob("*.json")]
                                 for name in ("clip.mp4", "first.png"))
    assert from_video["resized_from"] == from_image["resized_from"] == [16, 12]

    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    np.save(tmp_path / "frames.npy", np.stack([first, first[::-1]]))
    from_array = pipe("a red circle", task="i2v", image=fit_frame(first, 8, 8), seed=4).videos
    for given in (tmp_path / "clip.mp4", str(tmp_path / "frames.npy")):
        np.testing.assert_array_equal(pipe("a red circle", task="i2v", image=given, seed=4).videos, from_array)


def test_i2v_from_a_video_whose_first_frame_cannot_be_decoded_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    assert generate(checkpoint, tmp_path / "out", "--task", "i2v", "--image", str(tmp_path / "broken.mp4"),
                    "--prompt", "x") == 2
    assert f"cannot decode video {tmp_path / 'broken.mp4'}" in one_line_error(capsys)


def test_a_clip_cut_to_whole_latent_frames_says_so():
    from flowvid.pipeline import VideoPipeline

    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["codec"] = {"class_path": "flowvid.codecs.VideoVAE", "init_args": {
        "spatial_factor": 2, "temporal_factor": 2, "latent_channels": 12, "width": 8, "depth": 1}}
    config["model"]["init_args"]["video_shape"] = [5, 8, 8]
    torch.manual_seed(0)
    pipe = VideoPipeline(build_module(config))
    clip = np.zeros((4, 8, 8, 3), np.uint8)  # this codec encodes 1 + 2k frames
    with pytest.warns(UserWarning, match="the video's last 1 of 4 frames are left out: codec 'video_vae' encodes 3"):
        assert pipe.source_frames("extend", None, clip).frames.shape[1] == 3


# --- prompt files ---------------------------------------------------------------------------------


def test_a_prompt_is_not_cut_at_a_unicode_line_separator_and_no_byte_order_mark_is_prompt_text(tmp_path):
    from flowvid.generate import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    # A byte-order mark inside the file, before the last line, is what files joined with cat hold.
    text = "\ufeffa red\u2028circle\r\nune scène\x0cd'été\n\ufeff一只红色的猫\n"
    prompts.write_bytes(text.encode())
    assert read_prompt_file(prompts) == ["a red\u2028circle", "une scène\x0cd'été", "一只红色的猫"]


@pytest.mark.parametrize("text, message", [("", "is empty"), ("\ufeff\n \n", "is empty")])
def test_a_prompt_file_without_a_prompt_is_refused(tmp_path, text, message):
    from flowvid.generate import read_prompt_file
    from flowvid.pipeline import GenerateError

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(text.encode())
    with pytest.raises(GenerateError, match=message):
        read_prompt_file(prompts)


@pytest.mark.parametrize("text", ["\ufeffa\n\nb\n", "a\n\u200b \u2060\nb\n"])
def test_a_blank_line_inside_a_prompt_file_is_skipped(tmp_path, text):
    from flowvid.generate import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(text.encode())
    assert read_prompt_file(prompts) == ["a", "b"]


def test_unicode_prompts_are_sampled_and_recorded_as_written(checkpoint, tmp_path):
    prompts = ["一只红色的猫", "красный круг", "🎈 balloon"]
    assert generate(checkpoint, tmp_path / "out", *[arg for p in prompts for arg in ("--prompt", p)]) == 0
    records = sorted((p.name, json.loads(p.read_text())["prompt"]) for p in (tmp_path / "out").glob("*.json"))
    assert records == [("t2v_000_prompt.json", prompts[0]), ("t2v_001_prompt.json", prompts[1]),
                       ("t2v_002_balloon.json", prompts[2])]


# --- score on damaged shards ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["zero-filled", "truncated"])
def test_score_counts_every_sample_a_damaged_shard_lost(checkpoint, tmp_path, capsys, damage):
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", num_videos=6, frames=4, size=8, val_videos=1, shard_samples=2)
    folder = tmp_path / "data" / "train"
    shard = folder / json.loads((folder / "manifest.json").read_text())["shards"][1]["name"]
    size = shard.stat().st_size
    # A zero-filled shard reads as an empty archive, which ends normally: only the manifest knows it lost samples.
    shard.write_bytes(bytes(size) if damage == "zero-filled" else shard.read_bytes()[:1500])
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(folder), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    [lost] = [r for r in records if "error" in r]
    assert lost["path"] == str(shard) and lost["samples"] == 2 and len(records) == 5
    assert "scored 4 videos" in (printed := capsys.readouterr().out) and "2 could not be read" in printed
