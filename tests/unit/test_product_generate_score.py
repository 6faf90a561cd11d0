"""`flowvid generate` and `flowvid score` on a tiny model saved like a training checkpoint."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowvid.cli import main
from flowvid.codecs import PixelCodec, VideoVAE
from flowvid.export import build_module, export_checkpoint
from flowvid.loading import load_model
from flowvid.media import write_video
from flowvid.sampling import SequentialSampler, WindowedSampler
from flowvid.sampling.tasks import sample_task, task_inputs
from flowvid.score import clips_of
from flowvid.testing import perturb_parameters
from processes import free_port, set_torchrun_environment

CONFIG = {
    "model": {
        "class_path": "flowvid.lit.FlowModule",
        "init_args": {
            "flow": {"class_path": "flowvid.flows.GlobalLocalFlow",
                     "init_args": {"latent_channels": 12, "frame_size": [4, 4], "num_shallow": 1, "shallow_width": 32,
                                   "shallow_depth": 1, "deep_width": 32, "deep_depth": 1, "head_dim": 16,
                                   "text_width": 16}},
            "codec": {"class_path": "flowvid.codecs.PixelCodec", "init_args": {"patch_size": 2}},
            "text_encoder": {"class_path": "flowvid.text.LearnedTextEncoder",
                             "init_args": {"width": 16, "max_length": 8, "depth": 1, "head_dim": 8}},
            "video_shape": [4, 8, 8],
            "sampler": "jacobi",
            "noise_std": 0.1,
        },
    }
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint file as training writes it: weights plus the run's config."""
    torch.manual_seed(0)
    module = build_module(CONFIG)
    perturb_parameters(module.flow, std=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowvid_run": {"config": CONFIG}}, path)
    return path


def unconditional_config():
    config = copy.deepcopy(CONFIG)
    init_args = config["model"]["init_args"]
    init_args["flow"]["init_args"]["text_width"] = None
    del init_args["text_encoder"]
    return config


@pytest.fixture(scope="module")
def unconditional_checkpoint(tmp_path_factory):
    """A checkpoint of a model trained without text: no text encoder, a flow with text_width None."""
    torch.manual_seed(0)
    config = unconditional_config()
    module = build_module(config)
    perturb_parameters(module.flow, std=0.02)
    path = tmp_path_factory.mktemp("unconditional") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowvid_run": {"config": config}}, path)
    return path


def read_record(folder, prefix):
    [record] = [json.loads(p.read_text()) for p in folder.glob(f"{prefix}*.json")]
    return record


def test_t2v_writes_every_output_and_is_reproducible(checkpoint, tmp_path):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle moves left", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--sampler", "sequential"]) == 0
    [npy] = [p for p in (tmp_path / "a").glob("*.npy") if not p.name.endswith(".latent.npy")]
    name = npy.name.removesuffix(".npy")
    for suffix in (".mp4", ".npy", ".latent.npy", ".json"):
        assert (tmp_path / "a" / f"{name}{suffix}").exists()
    video = np.load(npy)
    assert video.shape == (4, 8, 8, 3) and video.dtype == np.uint8
    record = read_record(tmp_path / "a", "t2v_000")
    assert record["seed"] == 5 and record["task"] == "t2v" and "sample_seconds" in record["timings"]
    if not torch.cuda.is_available():
        assert record["device"] == "cpu" and record["precision"] == "32-true" and record["tol"] == 1e-3
    assert record["sampler_stats"]  # Jacobi passes per block
    jacobi = np.load(tmp_path / "a" / f"{name}.latent.npy")
    sequential = np.load(tmp_path / "b" / f"{name}.latent.npy")
    assert np.linalg.norm(jacobi - sequential) / np.linalg.norm(sequential) < 1e-2


def test_i2v_reproduces_the_given_first_frame(checkpoint, tmp_path):
    from PIL import Image

    image = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "first.png")
    assert main(["generate", "--ckpt", str(checkpoint), "--task", "i2v", "--image", str(tmp_path / "first.png"),
                 "--prompt", "a blue square moves up", "--out", str(tmp_path / "out")]) == 0
    [npy] = [p for p in (tmp_path / "out").glob("*.npy") if not p.name.endswith(".latent.npy")]
    assert np.array_equal(np.load(npy)[0], image)


def test_skip_existing_keeps_no_sample_of_another_source_or_negative_prompt(checkpoint, tmp_path, capsys):
    from PIL import Image

    for name, value in (("a.png", 200), ("b.png", 0)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)
    args = ["generate", "--ckpt", str(checkpoint), "--task", "i2v", "--prompt", "x", "--guidance", "2",
            "--out", str(tmp_path / "out")]
    assert main([*args, "--image", str(tmp_path / "a.png"), "--negative-prompt", "y"]) == 0
    capsys.readouterr()
    for extra, differs in ((["--image", str(tmp_path / "b.png"), "--negative-prompt", "y"], "source"),
                           (["--image", str(tmp_path / "a.png")], "negative_prompt 'y', now not given")):
        assert main([*args, *extra, "--skip-existing"]) == 2
        assert "was written by another request" in (error := one_line_error(capsys)) and differs in error
    assert main([*args, "--image", str(tmp_path / "a.png"), "--negative-prompt", "y", "--skip-existing"]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err


def test_skip_existing_keeps_no_sample_written_at_another_frame_rate(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--fps", "16", "--skip-existing"]) == 2
    assert "fps 8, not 16" in one_line_error(capsys)
    assert main([*args, "--fps", "16", "--force"]) == 0
    capsys.readouterr()
    assert main([*args, "--fps", "16", "--skip-existing"]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err


def test_skip_existing_knows_the_source_however_its_path_is_spelled(checkpoint, tmp_path, capsys, monkeypatch):
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "first.png")
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--ckpt", str(checkpoint), "--task", "i2v", "--prompt", "x", "--out", "out"]
    assert main([*args, "--image", "first.png"]) == 0
    [record_path] = (tmp_path / "out").glob("*.json")
    assert json.loads(record_path.read_text())["source"] == str((tmp_path / "first.png").resolve())
    for spelling in (str(tmp_path / "first.png"), "./first.png", "out/../first.png"):
        capsys.readouterr()
        assert main([*args, "--image", spelling, "--skip-existing"]) == 0
        assert "1 of 1 samples are in" in capsys.readouterr().err
    # A record holding the path as typed, relative to where generate ran, still stands for its sample.
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "source": "first.png"}))
    assert main([*args, "--image", str(tmp_path / "first.png"), "--skip-existing"]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err


def test_a_sample_records_the_weights_it_was_made_with(checkpoint, tmp_path, capsys):
    """The moving average where the run kept one, else the trained weights, whatever --weights asked."""
    saved = torch.load(checkpoint, weights_only=False)
    saved["flowvid"] = {"ema": {name: tensor + 0.01 for name, tensor in saved["state_dict"].items()
                                if name.startswith("flow.")}}
    torch.save(saved, tmp_path / "with_ema.ckpt")
    for model, kept in ((tmp_path / "with_ema.ckpt", "ema"), (checkpoint, "trained")):
        args = ["generate", "--ckpt", str(model), "--prompt", "x", "--out", str(tmp_path / kept)]
        assert main(args) == 0
        assert read_record(tmp_path / kept, "t2v_000")["weights"] == kept
        capsys.readouterr()
        assert main([*args, "--weights", "trained", "--skip-existing"]) == (2 if kept == "ema" else 0)
        if kept == "ema":
            assert "weights 'ema', not 'trained'" in one_line_error(capsys)
        else:  # the same weights either way: the sample is kept
            assert "1 of 1 samples are in" in capsys.readouterr().err


def test_samples_of_another_model_are_not_mixed_into_a_folder(checkpoint, unconditional_checkpoint, tmp_path,
                                                                capsys):
    out = tmp_path / "samples"
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--prompt", "y", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(unconditional_checkpoint), "--out", str(out)]) == 2
    assert f"{out} holds samples of another model (t2v_000_x.json: model " in one_line_error(capsys)
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "z", "--guidance", "1", "--out", str(out)]) == 0


def vae_checkpoint(folder: Path) -> Path:
    """A checkpoint of the test model with a tiny video VAE as its codec instead of the pixel codec."""
    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["codec"] = {"class_path": "flowvid.codecs.VideoVAE", "init_args": {
        "spatial_factor": 2, "temporal_factor": 1, "latent_channels": 12, "width": 8, "depth": 1}}
    torch.manual_seed(0)
    module = build_module(config)
    checkpoint = folder / "vae_model.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowvid_run": {"config": config}}, checkpoint)
    return checkpoint


def test_stream_of_a_codec_that_decodes_frames_in_groups_writes_them_when_the_sample_is_done(tmp_path):
    from PIL import Image

    checkpoint = vae_checkpoint(tmp_path)
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--stream", "--out", str(tmp_path / "o")]) == 0
    [stream] = list((tmp_path / "o").glob("*.stream"))
    [npy] = [p for p in (tmp_path / "o").glob("*.npy") if not p.name.endswith(".latent.npy")]
    video = np.load(npy)
    frames = sorted(stream.glob("frame_*.png"))
    assert len(frames) == len(video) == 4
    assert all(np.array_equal(np.asarray(Image.open(path)), image) for path, image in zip(frames, video))


def test_stream_writes_frames_as_they_come_and_longer_videos_use_a_window(checkpoint, tmp_path):
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--frames", "7", "--stream",
                 "--out", str(tmp_path)]) == 0
    [stream] = list(tmp_path.glob("*.stream"))
    assert len(list(stream.glob("frame_*.png"))) == 7
    record = read_record(tmp_path, "t2v_000")
    assert record["frames"] == 7 and record["sampler_stats"]["window"] == 4
    # The same name sampled again, shorter: the folder holds the new sample's frames only.
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--frames", "5", "--stream",
                 "--out", str(tmp_path), "--force"]) == 0
    assert sorted(p.name for p in stream.glob("frame_*.png")) == [f"frame_{i:03d}.png" for i in range(5)]
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--out", str(tmp_path), "--force"]) == 0
    assert not stream.exists()  # not streamed this time: no frames of another sample left beside it


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "i2v", "--prompt", "x"], "needs --image"),
        (["--task", "i2v", "--image", "missing.png", "--prompt", "x"], "does not exist"),
        (["--prompt", "x", "--guidance", "2", "--frames", "0"], "--frames must be >= 1, got 0"),
        (["--prompts", "PROMPTS"], "holds only blank lines and # comments"),
        (["--prompt", "a red circle", "--prompt", "   "], "prompt '   ' holds only whitespace"),
        (["--prompt", "a red circle", "--prompt", "\u200b \u2060"], r"prompt '\u200b \u2060' holds only whitespace"),
        (["--prompt", "x", "--negative-prompt", "y", "--guidance", "0"], "negative prompt steers guidance"),
        (["--prompt", "x", "--negative-prompt", "  "], "--negative-prompt holds no words"),
        (["--prompt", "x", "--negative-prompt", "\u200b"], "--negative-prompt holds no words"),
        (["--prompt", "x", "--tol", "inf"], "--tol must be a number in (0, 1): a relative change per pass, got inf"),
        (["--prompt", "x", "--tol", "0"], "--tol must be a number in (0, 1)"),
        (["--prompt", "x", "--sampler", "windowed"], "sampled in windows of that length already"),
        (["--prompt", "x", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    ],
)
def test_bad_requests_are_one_line_errors(checkpoint, tmp_path, capsys, extra, message):
    (tmp_path / "prompts.txt").write_text("# a red circle moves left\n\n# more\n")
    extra = [str(tmp_path / "prompts.txt") if e == "PROMPTS" else e for e in extra]
    assert main(["generate", "--ckpt", str(checkpoint), *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def damaged_models(checkpoint, folder):
    """Every way a --ckpt can be unreadable: junk and truncated checkpoints and exports, a plain folder."""
    export = export_checkpoint(checkpoint, folder / "export" / "model.safetensors")
    (folder / "junk.ckpt").write_bytes(b"this is not a checkpoint\n" * 20)
    (folder / "truncated.ckpt").write_bytes(checkpoint.read_bytes()[:500])
    (folder / "export" / "junk.safetensors").write_bytes(b"this is not a tensor file\n" * 20)
    (folder / "export" / "truncated.safetensors").write_bytes(export.read_bytes()[:-100])
    (folder / "videos").mkdir()
    return [folder / "junk.ckpt", folder / "truncated.ckpt", folder / "export" / "junk.safetensors",
            folder / "export" / "truncated.safetensors", folder / "videos"]


def test_an_unreadable_checkpoint_is_a_one_line_error_naming_it(checkpoint, tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 8, 8, 3), np.uint8))
    for damaged in damaged_models(checkpoint, tmp_path):
        commands = (["generate", "--ckpt", str(damaged), "--prompt", "x", "--out", str(tmp_path / "o")],
                    ["score", "--ckpt", str(damaged), "--input", str(clip), "--out", str(tmp_path / "s.jsonl")])
        for command in commands:
            assert main(command) == 2
            assert str(damaged) in one_line_error(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("out", ["taken.txt", "taken.txt/samples"])
def test_an_output_path_that_is_a_file_is_refused_before_loading(tmp_path, capsys, out):
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    # The checkpoint does not exist either: the --out error shows the check comes first.
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x",
                 "--out", str(tmp_path / out)]) == 2
    assert "give a folder" in one_line_error(capsys)
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("fps", ["0", "-5", "nan", "inf"])
def test_a_frame_rate_that_is_not_positive_and_finite_is_refused_before_loading(tmp_path, capsys, fps):
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x", "--fps", fps,
                 "--out", str(tmp_path / "o")]) == 2
    assert "--fps" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--frames", "0", "--frames must be >= 1, got 0"),
    ("--frames", "-3", "--frames must be >= 1, got -3"),
    ("--seed", str(10**20), f"--seed must be an integer from 0 to 4,294,967,295 for 1 sample (torch's generator "
                            f"keeps 32 bits of a seed), got {10**20}"),
    ("--seed", "-1", "--seed must be an integer from 0 to 4,294,967,295"),
])
def test_a_frame_count_or_seed_out_of_range_is_refused_before_loading(tmp_path, capsys, option, value, message):
    # Both used to load the model first: --frames 0 then read "a frame count of a multiple of 1", and a
    # seed of more than 64 bits "Overflow when unpacking long long".
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x", option, value,
                 "--out", str(tmp_path / "o")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--first-block-size", "0"], "--first-block-size must be >= 1, got 0"),
    (["--block-size", "-4"], "--block-size must be >= 1, got -4"),
    (["--sampler", "sequential", "--block-size", "16"], "--block-size: --sampler sequential takes no block_size"),
    (["--sampler", "sequential", "--tol", "0.01"], "--tol: --sampler sequential takes no tol"),
    (["--sampler", "jacobl"], "--sampler: unknown sampler 'jacobl'; generate takes jacobi, sequential or"),
    (["--sampler", "flowvid.sampling.Jacobi"], "--sampler: sampler class_path 'flowvid.sampling.Jacobi': module "),
    (["--sampler", "jacobi", "--sampler-args", '{"max_iter": 3}'], "takes no argument 'max_iter' (in --sampler-args)"),
    (["--sampler", "jacobi", "--sampler-args", '{"tol": 0.1}'], "--sampler-args: give tol as --tol"),
    (["--sampler", "flowvid.sampling.jacobi.JacobiSampler", "--tol", "0"], "--tol must be"),
    (["--task", "i2v", "--image", "missing.png"], "--image missing.png does not exist"),
    (["--task", "extend", "--video", "missing.mp4"], "--video missing.mp4 does not exist"),
])
def test_options_that_cannot_work_are_refused_before_loading(tmp_path, capsys, extra, message):
    assert main(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x", *extra,
                 "--out", str(tmp_path / "o")]) == 2
    assert message in one_line_error(capsys)


def test_jacobi_block_sizes_reach_the_sampler(checkpoint, tmp_path):
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--first-block-size", "4",
                 "--block-size", "8", "--out", str(tmp_path)]) == 0
    deep = read_record(tmp_path, "t2v_000")["sampler_stats"]["deep"]
    first, later = deep["block_frames"].count(0), len(deep["block_frames"]) - deep["block_frames"].count(0)
    assert set(deep["block_sizes"][:first]) == {4} and set(deep["block_sizes"][first:]) == {8} and later > 0


@pytest.mark.parametrize("option", ["--prompts", "--image", "--video"])
def test_a_folder_given_for_an_input_file_is_called_a_folder(checkpoint, tmp_path, capsys, option):
    task = {"--image": ["--task", "i2v"], "--video": ["--task", "extend"]}.get(option, [])
    assert main(["generate", "--ckpt", str(checkpoint), *task, "--prompt", "x", option, str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert f"{tmp_path} is a folder" in err and "does not exist" not in err


def test_damaged_npy_clips_are_named_and_listed_and_the_other_videos_still_scored(checkpoint, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    np.save(videos / "good.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (videos / "junk.npy").write_bytes(b"not an array\n" * 10)  # numpy: "contains pickled (object) data"
    (videos / "truncated.npy").write_bytes((videos / "good.npy").read_bytes()[:100])
    np.save(videos / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "s.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(videos), "--out", str(out)]) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert "bits_per_dim" in records["good.npy"]
    for name in ("junk.npy", "truncated.npy", "objects.npy"):
        assert records[name]["error"].startswith(f"cannot read {videos / name}: not an array saved with numpy.save")
    assert main(["generate", "--ckpt", str(checkpoint), "--task", "extend", "--video", str(videos / "junk.npy"),
                 "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert f"cannot read {videos / 'junk.npy'}" in one_line_error(capsys)


def test_a_score_output_inside_a_file_or_a_seed_out_of_range_is_refused_before_loading(tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 8, 8, 3), np.uint8))
    score = ["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(clip)]
    # Inside a file used to end in FileExistsError once every video was scored.
    assert main([*score, "--out", str(clip / "s.jsonl")]) == 2
    assert f"--out {clip / 's.jsonl'} is inside the file {clip}" in one_line_error(capsys)
    assert main([*score, "--seed", str(2**32), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "--seed must be an integer from 0 to 4,294,967,295" in one_line_error(capsys)


def test_a_prompt_file_that_is_not_utf8_is_named(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe moves\n")
    assert main(["generate", "--ckpt", str(checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert str(prompts) in err and "UTF-8" in err


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from flowvid.generate import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\r\na blue square\r\n".encode("utf-8-sig"))
    assert read_prompt_file(prompts) == ["a red circle", "a blue square"]


def test_blank_lines_at_the_end_of_a_prompt_file_are_not_prompts(tmp_path):
    from flowvid.generate import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\n  \n")
    assert read_prompt_file(prompts) == ["a red circle", "a blue square"]


def test_a_prompt_without_letters_or_digits_is_not_named_unconditional():
    from flowvid.generate import slug

    assert (slug("..."), slug(""), slug("A red circle!")) == ("prompt", "unconditional", "a-red-circle")


def test_an_unconditional_model_samples_without_a_prompt_and_refuses_one(unconditional_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--ckpt", str(unconditional_checkpoint), "--out", str(out)]) == 0
    capsys.readouterr()
    record = read_record(out, "t2v_000")
    assert record["prompt"] == "" and "caption_seen_by_model" not in record
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n")
    for given in (["--prompt", "a red circle moves left"], ["--prompts", str(prompts)]):
        assert main(["generate", "--ckpt", str(unconditional_checkpoint), *given, "--out", str(tmp_path / "p")]) == 2
        assert "takes no prompt" in one_line_error(capsys)
    assert not (tmp_path / "p").exists()
    given = ["--guidance", "2", "--negative-prompt", "a blue square"]
    assert main(["generate", "--ckpt", str(unconditional_checkpoint), *given, "--out", str(tmp_path / "n")]) == 2
    assert "takes no negative prompt" in one_line_error(capsys)


def test_an_unconditional_model_scores_without_a_caption_and_refuses_one(unconditional_checkpoint, tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 8, 8, 3), np.uint8))
    args = ["score", "--ckpt", str(unconditional_checkpoint), "--input", str(clip)]
    assert main([*args, "--out", str(tmp_path / "plain.jsonl")]) == 0
    assert main([*args, "--caption", "a red circle", "--out", str(tmp_path / "captioned.jsonl")]) == 2
    assert "takes no caption" in one_line_error(capsys)
    assert not (tmp_path / "captioned.jsonl").exists()


def test_scoring_a_folder_without_videos_says_what_it_looks_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no video here")
    assert main(["score", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    err = one_line_error(capsys)
    assert f"no videos found in folder {tmp_path / 'empty'}" in err and ".mp4" in err and "manifest.json" in err


def test_extending_a_clip_as_long_as_the_training_window_continues_it(checkpoint, tmp_path):
    clip = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", clip)
    assert main(["generate", "--ckpt", str(checkpoint), "--task", "extend", "--video", str(tmp_path / "clip.npy"),
                 "--frames", "7", "--prompt", "x", "--out", str(tmp_path / "o")]) == 0
    [npy] = [p for p in (tmp_path / "o").glob("*.npy") if not p.name.endswith(".latent.npy")]
    video = np.load(npy)
    assert video.shape == (7, 8, 8, 3) and np.array_equal(video[:4], clip)


@pytest.mark.parametrize("task", ["extend", "v2v"])
def test_a_clip_as_long_as_the_video_asked_for_says_to_ask_for_more_frames(checkpoint, tmp_path, capsys, task):
    np.save(tmp_path / "clip.npy", np.zeros((5, 8, 8, 3), np.uint8))
    assert main(["generate", "--ckpt", str(checkpoint), "--task", task, "--video", str(tmp_path / "clip.npy"),
                 "--frames", "5", "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert f"{task}: 5 frames leave nothing to sample after the video's 5 frames; ask for more than 5 frames" in err
    assert not (tmp_path / "o").exists()


def test_score_ranks_videos_and_matches_the_flow_likelihood(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(100, 140, (6, 4, 4, 3)), 2, 1), 2, 2).astype(np.uint8)
    noisy = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    for name, video in (("smooth", smooth), ("noisy", noisy)):
        write_video(tmp_path / f"{name}.mkv", video, codec="ffv1")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].rsplit("/", 1)[-1] for r in records] == ["noisy.mkv", "smooth.mkv", "broken.mp4"]
    noisy_record = records[0]
    assert noisy_record["rank"] == 1 and "error" in records[2]
    assert len(noisy_record["bits_per_dim_per_frame"]) == 6 and noisy_record["clips"] == 2
    assert noisy_record["frames"] == noisy_record["latent_frames"] == 6  # the pixel codec: a latent frame each
    # Uniform noise over 256 levels costs ~8 bits; a model can't do much better on it.
    assert 6.0 < noisy_record["bits_per_dim"] < 40.0
    assert math.isclose(np.mean(noisy_record["bits_per_dim_per_frame"]), noisy_record["bits_per_dim"], rel_tol=1e-6)

    # Alone, the file is video 0 and draws its dequantisation noise from the seed itself: the flow's
    # likelihood of the dequantised latents, clip after clip, plus log 127.5 nats for the map from 8-bit values.
    single = tmp_path / "single.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "noisy.mkv"), "--seed", "3",
                 "--out", str(single)]) == 0
    [record] = [json.loads(line) for line in single.read_text().splitlines()]
    module, generator, expected = load_model(checkpoint), torch.Generator().manual_seed(3), []
    text = module.text_encoder.encode([""])
    with torch.no_grad():
        for start in range(0, 6, module.video_shape[0]):
            clip = module.codec.encode(torch.from_numpy(noisy[start:start + module.video_shape[0]])[None])
            clip = clip + torch.rand(clip.shape[1:], generator=generator) / 127.5
            expected += ((module.flow.nll_per_frame(clip, text)[0] + math.log(127.5)) / math.log(2)).tolist()
    assert record["bits_per_dim_per_frame"] == pytest.approx(expected, rel=1e-6)


def test_a_pixel_latent_shard_folder_scores_as_the_raw_one_it_was_encoded_from(checkpoint, tmp_path):
    """Pixel latents are the 8-bit frames themselves: their records are in the same unit, with the same
    dequantisation, as those of the raw shards (they used to skip both and still claim that unit)."""
    from data_tools.encode_latents import encode_latents
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "raw", num_videos=3, frames=4, size=8, val_videos=1, shard_samples=8)
    encode_latents(tmp_path / "raw" / "train", tmp_path / "latent", load_model(checkpoint).codec)
    scores = {}
    for name, folder in (("raw", tmp_path / "raw" / "train"), ("latent", tmp_path / "latent")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["score", "--ckpt", str(checkpoint), "--input", str(folder), "--out", str(out)]) == 0
        scores[name] = [(r["unit"], r["bits_per_dim"]) for r in map(json.loads, out.read_text().splitlines())]
    (raw_units, raw_bits), (latent_units, latent_bits) = zip(*scores["raw"]), zip(*scores["latent"])
    assert len(raw_bits) == 3 and latent_units == raw_units
    records = [json.loads(line) for line in (tmp_path / "latent.jsonl").read_text().splitlines()]
    assert all(r["path"].startswith(str(tmp_path / "latent" / "shard-")) for r in records)  # which folder, too
    assert latent_bits == pytest.approx(raw_bits, rel=1e-5)


def test_a_shard_folder_of_another_size_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    import flowvid.score
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "big", num_videos=2, frames=4, size=16, val_videos=1, shard_samples=8)
    np.save(tmp_path / "clip.npy", np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(flowvid.score, "score_work", lambda *args: pytest.fail("scored before the sizes were checked"))
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "clip.npy"), str(tmp_path / "big" / "train"),
                 "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"shard folder {tmp_path / 'big' / 'train'} holds 16x16 clips, the model takes 8x8 (height x width)" in err
    assert not out.exists()


def test_a_video_file_of_another_size_is_fitted_and_its_record_says_so(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "fits.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "large.npy", rng.integers(0, 256, (4, 16, 12, 3), dtype=np.uint8))
    write_video(tmp_path / "wide.mkv", rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8), codec="ffv1")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path), "--out", str(out)]) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["large.npy"]["resized_from"] == [16, 12] and records["wide.mkv"]["resized_from"] == [16, 24]
    assert "resized_from" not in records["fits.npy"] and "error" not in records["wide.mkv"]


def test_an_image_or_video_of_another_size_is_fitted_and_the_samples_record_says_so(checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "fits.png")
    write_video(tmp_path / "wide.mkv", rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8), codec="ffv1")
    for task, option, name, resized in (("i2v", "--image", "tall.png", [16, 12]), ("i2v", "--image", "fits.png", None),
                                        ("extend", "--video", "wide.mkv", [16, 24])):
        out = tmp_path / name.replace(".", "_")
        assert main(["generate", "--ckpt", str(checkpoint), "--task", task, option, str(tmp_path / name),
                     "--prompt", "x", "--frames", "6", "--out", str(out)]) == 0
        assert read_record(out, task).get("resized_from") == resized


def test_a_latent_shard_record_counts_latent_frames_and_claims_no_video_frames(tmp_path):
    from data_tools.encode_latents import encode_latents
    from flowvid.data import write_synthetic_dataset

    checkpoint = vae_checkpoint(tmp_path)
    write_synthetic_dataset(tmp_path / "raw", num_videos=2, frames=4, size=8, val_videos=1, shard_samples=8)
    encode_latents(tmp_path / "raw" / "train", tmp_path / "latent", load_model(checkpoint).codec)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "latent"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["latent_frames"] == len(record["bits_per_dim_per_frame"]) == 4 and "frames" not in record


def test_clips_cover_the_video_in_whole_latent_frames():
    assert clips_of(10, 4, PixelCodec()) == [(0, 4), (4, 8), (8, 10)]
    assert clips_of(10, 4, PixelCodec(temporal_patch=2)) == [(0, 4), (4, 8), (8, 10)]
    assert clips_of(9, 4, PixelCodec(temporal_patch=2)) == [(0, 4), (4, 8)]
    # A causal codec encodes 1 + 4k frames: clips of 9 and a shorter last one of 5 (of the 7 left).
    causal = VideoVAE(spatial_factor=2, temporal_factor=4, latent_channels=4, width=8, depth=1)
    assert clips_of(16, 9, causal) == [(0, 9), (9, 14)]
    assert [causal.usable_frames(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 5, 5, 9]


def generated_latents(folder) -> np.ndarray:
    [latents] = list(folder.glob("*.latent.npy"))
    return np.load(latents)


def test_a_negative_prompt_is_what_guidance_steers_away_from(checkpoint, tmp_path):
    """Guidance reads the negative caption in its unconditional branch instead of the empty caption."""
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle moves left", "--guidance", "2",
            "--sampler", "sequential"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--negative-prompt", "a blue square", "--out", str(tmp_path / "negative")]) == 0
    assert "negative_prompt" not in read_record(tmp_path / "plain", "t2v")
    assert read_record(tmp_path / "negative", "t2v")["negative_prompt"] == "a blue square"
    negative = generated_latents(tmp_path / "negative")
    assert np.abs(negative - generated_latents(tmp_path / "plain")).max() > 1e-3

    module = load_model(checkpoint)
    inputs = task_inputs("t2v", ["a red circle moves left"], module.latent_shape[0], module.latent_shape[1:], 0,
                         noise_std=module.noise_std, negative_caption="a blue square")
    latents = sample_task(module.flow, SequentialSampler(), inputs, module.text_encoder, guidance=2.0)
    expected = module.denoise(latents, module.text_encoder.encode(inputs.captions))
    np.testing.assert_allclose(negative, expected[0].detach().numpy(), atol=1e-5)


def test_bf16_mixed_generation_runs_the_network_in_bf16_and_stays_close_to_fp32(checkpoint, tmp_path):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle moves left", "--device", "cpu"]
    assert main([*args, "--precision", "32-true", "--sampler", "sequential", "--out", str(tmp_path / "fp32")]) == 0
    assert main([*args, "--precision", "bf16-mixed", "--out", str(tmp_path / "bf16")]) == 0
    record = read_record(tmp_path / "bf16", "t2v_000")
    assert record["precision"] == "bf16-mixed" and record["device"] == "cpu"
    assert record["sampler"] == "jacobi" and record["tol"] == 1e-2  # above bf16's rounding noise
    fp32, bf16 = generated_latents(tmp_path / "fp32"), generated_latents(tmp_path / "bf16")
    assert bf16.dtype == np.float32
    difference = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < difference < 5e-2  # bf16 matmuls change the numbers, not the sample


def test_score_in_bf16_mixed_keeps_the_likelihood_close(checkpoint, tmp_path):
    video = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    write_video(tmp_path / "clip.mkv", video, codec="ffv1")
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / f"{precision}.jsonl"
        assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "clip.mkv"), "--device", "cpu",
                     "--precision", precision, "--out", str(out)]) == 0
        scores[precision] = json.loads(out.read_text())["bits_per_dim"]
    assert scores["bf16-mixed"] != scores["32-true"]
    assert math.isclose(scores["bf16-mixed"], scores["32-true"], rel_tol=1e-2)


@pytest.mark.parametrize("device, message", [("mps", "is not supported"), ("tpu", "is not a device"),
                                             ("cuda:99", "CUDA device")])
def test_a_device_that_is_not_here_is_a_one_line_error_before_loading(tmp_path, capsys, device, message):
    missing = tmp_path / "never-read.ckpt"  # the device is checked first, so the missing file is not reported
    for command in (["generate", "--prompt", "x"], ["score", "--input", str(tmp_path)]):
        assert main([command[0], "--ckpt", str(missing), *command[1:], "--device", device,
                     "--out", str(tmp_path / "out")]) == 2
        assert message in one_line_error(capsys)


def test_auto_placement_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_supports_it(monkeypatch):
    from flowvid.placement import resolve_device, resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "32-true"
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_under_torchrun_auto_and_cuda_mean_the_processs_own_gpu(monkeypatch):
    from flowvid.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


def test_bf16_on_a_cpu_without_native_bf16_is_allowed_with_a_warning(monkeypatch):
    import flowvid.placement as placement

    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert placement.resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"


def test_a_whitespace_caption_is_refused_not_scored_as_the_empty_one(checkpoint, tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(clip), "--caption", "  ",
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "--caption '  ' holds only whitespace" in one_line_error(capsys)
    assert not (tmp_path / "s.jsonl").exists()


def test_score_of_a_generate_folder_scores_each_sample_once_and_not_its_latents(checkpoint, tmp_path):
    samples = tmp_path / "samples"
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle moves left", "--out", str(samples)]) == 0
    assert list(samples.glob("*.latent.npy"))
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(samples), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # Written as NAME.npy (exact pixels), NAME.mp4 and NAME.latent.npy: scored once, as the array.
    assert [Path(r["path"]).suffix for r in records] == [".npy"]
    assert not any("error" in r for r in records)


# --- the same from Python: VideoPipeline ----------------------------------------------------------


def test_the_pipeline_gives_what_flowvid_generate_writes_whatever_the_batch(checkpoint, tmp_path):
    from flowvid.pipeline import VideoPipeline

    prompts = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]
    args = ["generate", "--ckpt", str(checkpoint), "--seed", "5", "--guidance", "1.5", "--out", str(tmp_path)]
    assert main([*args, *(arg for prompt in prompts for arg in ("--prompt", prompt))]) == 0
    written = [np.load(path) for path in sorted(tmp_path.glob("t2v_*.latent.npy"))]

    import flowvid

    assert flowvid.VideoPipeline is VideoPipeline
    pipe = flowvid.VideoPipeline.from_pretrained(checkpoint, device="cpu")
    together = pipe(prompts, seed=5, guidance=1.5)
    one_by_one = pipe(prompts, seed=5, guidance=1.5, batch_size=1)
    assert together.videos.shape == (3, 4, 8, 8, 3) and together.videos.dtype == np.uint8
    assert together.seeds == [5, 6, 7] and len(one_by_one.sampler_stats) == 3
    np.testing.assert_array_equal(together.latents, np.stack(written))
    np.testing.assert_allclose(one_by_one.latents, together.latents, atol=1e-5)


def test_the_pipeline_takes_frames_as_arrays_and_its_sampler_can_be_swapped(checkpoint):
    from flowvid.pipeline import GenerateError, VideoPipeline

    pipe = VideoPipeline(load_model(checkpoint))
    image = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    jacobi = pipe("a blue square moves up", task="i2v", image=image, seed=3)
    assert np.array_equal(jacobi.videos[0, 0], image)
    pipe.sampler = SequentialSampler()
    exact = pipe("a blue square moves up", task="i2v", image=torch.from_numpy(image), seed=3)
    assert np.array_equal(exact.videos[0, 0], image)
    assert 0 < np.linalg.norm(jacobi.latents - exact.latents) / np.linalg.norm(exact.latents) < 1e-2
    clip = pipe("a red circle moves left", task="extend", video=exact.videos[0], frames=7)
    assert clip.videos.shape == (1, 7, 8, 8, 3) and clip.sampler_stats[0]["window"] == 4
    assert np.array_equal(clip.videos[0, :4], exact.videos[0])  # the given frames come back as given
    pipe.sampler = WindowedSampler(SequentialSampler(), window=2, context=1)
    windowed = pipe("a red circle moves left", frames=7)
    assert windowed.sampler_stats[0]["window"] == 2  # the sampler's own window, not wrapped in another
    assert all("window" not in stats for stats in windowed.sampler_stats[0]["windows"])
    with pytest.raises(GenerateError, match=r"uint8 frames of shape \(8, 8, 3\).*float64 \(8, 8, 3\)"):
        pipe("x", task="i2v", image=image / 255.0)
    with pytest.raises(GenerateError, match="t2v takes no image or video"):
        pipe("x", image=image)
    with pytest.raises(GenerateError, match="unknown task 'i2i'"):
        pipe("x", task="i2i")
    with pytest.raises(GenerateError, match="frames and batch_size must be integers >= 1, got 2.5"):
        pipe("x", frames=2.5)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to .* got -1"):
        pipe("x", seed=-1)


@pytest.mark.filterwarnings("ignore:this model was trained with extend_prob 0")
def test_every_bad_request_to_the_pipeline_is_a_generate_error(checkpoint, tmp_path):
    from flowvid.pipeline import GenerateError, VideoPipeline

    pipe = VideoPipeline(load_model(checkpoint))
    video = np.zeros((4, 8, 8, 3), np.uint8)
    missing = tmp_path / "missing.png"
    refused = {
        "seed": (lambda: pipe("x", seed=-1), "seed must be an integer from 0"),
        "streamed seed": (lambda: list(pipe.stream("x", seed=2**32)), "seed must be an integer from 0"),
        "image file": (lambda: pipe("x", task="i2v", image=missing), "missing.png does not exist"),
        "video file": (lambda: pipe("x", task="extend", video=tmp_path), "is a folder"),
        "score seed": (lambda: pipe.score(video, seed=-1), "seed must be an integer from 0"),
        "score file": (lambda: pipe.score(missing), "missing.png does not exist"),
        "score caption": (lambda: pipe.score(video, caption=" "), r"^caption ' ' holds only whitespace"),
        "invisible caption": (lambda: pipe.score(video, caption="\ufeff\u200d "), r"holds only whitespace"),
        "score length": (lambda: pipe.score(video[:0]), "0 frames are fewer than one latent frame"),
        "precision": (lambda: VideoPipeline(pipe.model, precision="fp16"), "precision must be one of"),
        "device": (lambda: VideoPipeline.from_pretrained(checkpoint, device="tpu"), "'tpu' is not"),
    }
    for request, (call, message) in refused.items():
        with pytest.raises(GenerateError, match=message):
            call()


class FlattensTheVideo(SequentialSampler):
    """A plugin's slip: its samples lose the frame axes, and its streamed frames come back as float64."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return super().sample(flow, z, text, guidance, prefix).flatten(1, 3)

    def stream(self, flow, z, text=None, guidance=0.0, prefix=None):
        return (frame.double() for frame in super().stream(flow, z, text, guidance, prefix))


def test_a_sampler_that_returns_no_latents_of_the_noises_shape_is_named(checkpoint):
    from flowvid.pipeline import VideoPipeline

    pipe = VideoPipeline(load_model(checkpoint))
    pipe.sampler = FlattensTheVideo()
    with pytest.raises(TypeError, match=r"sampler FlattensTheVideo.sample returned torch.float32 \(1, 64, 12\); "
                                        r"expected float32 latents of shape \(1, 4, 4, 4, 12\)"):
        pipe("x")
    with pytest.raises(TypeError, match=r"FlattensTheVideo.stream returned torch.float64 \(1, 4, 4, 12\)"):
        list(pipe.stream("x"))


def test_a_task_the_model_never_trained_is_sampled_with_a_warning(checkpoint):
    import warnings

    from flowvid.pipeline import VideoPipeline

    pipe = VideoPipeline(load_model(checkpoint))
    clip = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"trained with extend_prob 0: its '\(extend\)' captions are new to it"):
        pipe("x", task="extend", video=clip, frames=6)
    with pytest.warns(UserWarning, match="trained with v2v_prob 0: it never learned to transform a video"):
        pipe("x", task="v2v", video=clip, frames=6)
    pipe.model.extend_prob = 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("x", task="extend", video=clip, frames=6)


def test_the_models_own_sampler_is_the_default_of_generate_and_the_pipeline(tmp_path, capsys):
    """As a diffusers pipeline loads the scheduler saved with its model; the command line still wins."""
    from flowvid.pipeline import VideoPipeline
    from flowvid.sampling import JacobiSampler, SequentialSampler

    def checkpoint_with(sampler) -> Path:
        config = copy.deepcopy(CONFIG)
        config["model"]["init_args"]["sampler"] = sampler
        torch.manual_seed(0)
        path = tmp_path / f"{len(list(tmp_path.glob('*.ckpt')))}.ckpt"
        torch.save({"state_dict": build_module(config).state_dict(), "flowvid_run": {"config": config}}, path)
        return path

    sequential = checkpoint_with("sequential")
    assert isinstance(VideoPipeline(load_model(sequential)).sampler, SequentialSampler)
    assert main(["generate", "--ckpt", str(sequential), "--prompt", "x", "--out", str(tmp_path / "a")]) == 0
    assert read_record(tmp_path / "a", "t2v_000")["sampler"] == "sequential"
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(sequential), "--prompt", "x", "--tol", "0.01",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--tol: the model's sampler sequential takes no tol" in one_line_error(capsys)

    tuned = checkpoint_with({"name": "jacobi", "init_args": {"tol": 0.05, "max_iterations": 7}})
    pipe = VideoPipeline(load_model(tuned))
    assert isinstance(pipe.sampler, JacobiSampler) and pipe.sampler.tol == 0.05 and pipe.sampler.max_iterations == 7
    assert main(["generate", "--ckpt", str(tuned), "--prompt", "x", "--out", str(tmp_path / "c")]) == 0
    record = read_record(tmp_path / "c", "t2v_000")
    assert (record["sampler"], record["tol"], record["sampler_args"]) == ("jacobi", 0.05, {"max_iterations": 7})
    assert main(["generate", "--ckpt", str(tuned), "--prompt", "x", "--sampler", "jacobi", "--out",
                 str(tmp_path / "d")]) == 0
    assert read_record(tmp_path / "d", "t2v_000")["tol"] == 1e-3  # the command's sampler, at its defaults
    assert main(["generate", "--ckpt", str(tuned), "--prompt", "x", "--sampler-args", '{"max_iterations": 3}',
                 "--out", str(tmp_path / "d2")]) == 0
    record = read_record(tmp_path / "d2", "t2v_000")
    assert (record["tol"], record["sampler_args"]) == (0.05, {"max_iterations": 3})  # over the model's own

    # Named by class path, a Jacobi sampler is still one: its settings reach generate, which samples
    # what the pipeline samples.
    by_path = checkpoint_with({"class_path": "flowvid.sampling.jacobi.JacobiSampler",
                               "init_args": {"tol": 0.3, "first_block_size": 3}})
    pipe = VideoPipeline(load_model(by_path))
    assert (pipe.sampler.tol, pipe.sampler.first_block_size) == (0.3, 3)
    assert main(["generate", "--ckpt", str(by_path), "--prompt", "x", "--out", str(tmp_path / "e")]) == 0
    record = read_record(tmp_path / "e", "t2v_000")
    assert (record["tol"], record["first_block_size"]) == (0.3, 3) and "sampler_args" not in record
    np.testing.assert_array_equal(generated_latents(tmp_path / "e"), pipe("x", seed=0).latents[0])
    assert main(["generate", "--ckpt", str(by_path), "--prompt", "x", "--tol", "0.05", "--out",
                 str(tmp_path / "f")]) == 0
    assert read_record(tmp_path / "f", "t2v_000")["tol"] == 0.05
    jacobi = "flowvid.sampling.jacobi.JacobiSampler"  # a plugin's sampler is named so on the command line
    assert main(["generate", "--ckpt", str(sequential), "--prompt", "x", "--sampler", jacobi, "--tol", "0.2",
                 "--out", str(tmp_path / "g")]) == 0
    assert (read_record(tmp_path / "g", "t2v_000")["sampler"], read_record(tmp_path / "g", "t2v_000")["tol"]) == (
        jacobi, 0.2)


def test_the_pipeline_of_an_unconditional_model_samples_one_video_without_a_prompt(unconditional_checkpoint):
    from flowvid.pipeline import GenerateError, VideoPipeline

    pipe = VideoPipeline.from_pretrained(unconditional_checkpoint, device="cpu")
    assert pipe().videos.shape == (1, 4, 8, 8, 3) and pipe.precision == "32-true"
    with pytest.raises(GenerateError, match="takes no prompt"):
        pipe("a red circle")


def test_processes_of_torchrun_share_the_prompts_and_write_what_one_process_writes(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na blue square moves up\na green triangle moves down\n")
    args = ["generate", "--ckpt", str(checkpoint), "--prompts", str(prompts), "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main([*args, "--out", str(tmp_path / "two")]) == 0
        written = capsys.readouterr().out
        assert f"wrote {2 - rank} sample{'s' if rank == 0 else ''} to" in written and f"prompts {rank}, {rank + 2}, ... of 3" in written
    one, two = (sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("one", "two"))
    assert one == two and len(one) == 3 * 4
    for name in one:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name))
    monkeypatch.setenv("RANK", "2")
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "RANK=2 must be at least 0 and below WORLD_SIZE=2" in one_line_error(capsys)


def _score_as_torchrun_rank(rank: int, world: int, port: int, args: list[str]) -> None:
    torch.set_num_threads(1)
    set_torchrun_environment(rank, world, port)
    code = main(args)
    if code != 0:
        raise SystemExit(code)


@pytest.mark.slow
def test_processes_of_torchrun_share_the_videos_and_shards_and_write_what_one_process_writes(checkpoint, tmp_path):
    import torch.multiprocessing as mp

    from flowvid.data import write_synthetic_dataset

    rng = np.random.default_rng(0)
    for index in range(3):
        np.save(tmp_path / f"clip{index}.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    write_synthetic_dataset(tmp_path / "shapes", num_videos=6, frames=4, size=8, val_videos=2, shard_samples=2)
    inputs = [str(tmp_path / f"clip{index}.npy") for index in range(3)] + [str(tmp_path / "shapes" / "train")]
    args = ["score", "--ckpt", str(checkpoint), "--input", *inputs, "--device", "cpu", "--out"]
    assert main([*args, str(tmp_path / "one.jsonl")]) == 0
    port = free_port()
    # Six units of work (three files, three shards): each process scores three, the first writes all.
    mp.start_processes(_score_as_torchrun_rank, args=(2, port, [*args, str(tmp_path / "two.jsonl")]), nprocs=2,
                       join=True, start_method="fork")
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "two.jsonl").read_text() == one and len(one.splitlines()) == 3 + 6


def _score_as_rank_that_sees_one_more_video(rank: int, world: int, port: int, args: list[str]) -> None:
    """A rank whose look at the folder finds a video the other's did not (written in between)."""
    import flowvid.score as score

    if rank == 1:
        seen = score.folder_files
        score.folder_files = lambda folder: [*seen(folder), folder / "written_meanwhile.npy"]
    _score_as_torchrun_rank(rank, world, port, args)


@pytest.mark.slow
def test_processes_of_torchrun_divide_the_first_processs_listing_of_a_folder(checkpoint, tmp_path):
    import torch.multiprocessing as mp

    rng = np.random.default_rng(0)
    (tmp_path / "videos").mkdir()
    for index in range(3):
        np.save(tmp_path / "videos" / f"clip{index}.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    args = ["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "videos"), "--device", "cpu", "--out"]
    assert main([*args, str(tmp_path / "one.jsonl")]) == 0
    mp.start_processes(_score_as_rank_that_sees_one_more_video, args=(2, free_port(), [*args, str(tmp_path / "two.jsonl")]),
                       nprocs=2, join=True, start_method="fork")
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


def test_an_overwrite_interrupted_mid_sample_leaves_no_record_that_skip_existing_would_trust(checkpoint, tmp_path,
                                                                                            monkeypatch):
    import flowvid.generate as generate

    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle", "--out", str(tmp_path)]
    assert main(args) == 0
    [npy] = [p for p in tmp_path.glob("*.npy") if not p.name.endswith(".latent.npy")]
    sample = np.load(npy)

    def interrupted(path, array):
        path.write_bytes(b"\x93NUMPY half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "_save_npy", interrupted)
    assert main([*args, "--seed", "5", "--force"]) == 130  # Ctrl-C's exit status
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.partial"))
    np.testing.assert_array_equal(np.load(npy), sample)  # never half overwritten

    assert main([*args, "--skip-existing"]) == 0  # samples it again rather than keeping a mix of two samples
    np.testing.assert_array_equal(np.load(npy), sample)
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["seed"] == 0


def test_a_sample_of_another_request_is_not_overwritten_without_force(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle", "--out", str(tmp_path)]
    assert main(args) == 0
    [npy] = [p for p in tmp_path.glob("*.npy") if not p.name.endswith(".latent.npy")]
    [record] = tmp_path.glob("*.json")
    sample = np.load(npy)
    assert main(args) == 0  # the same request makes the same video: writing it again loses nothing
    np.testing.assert_array_equal(np.load(npy), sample)
    capsys.readouterr()

    assert main([*args, "--seed", "5"]) == 2
    error = one_line_error(capsys)
    assert "holds a sample of another request (seed 0, not 5)" in error and "--force" in error
    np.testing.assert_array_equal(np.load(npy), sample)
    assert json.loads(record.read_text())["seed"] == 0

    assert main([*args, "--seed", "5", "--force"]) == 0
    assert json.loads(record.read_text())["seed"] == 5 and not np.array_equal(np.load(npy), sample)


def test_skip_existing_finishes_an_interrupted_run_and_refuses_another_requests_samples(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na blue square moves up\na green triangle moves down\n")
    args = ["generate", "--ckpt", str(checkpoint), "--prompts", str(prompts), "--batch-size", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    progress = capsys.readouterr().err.splitlines()  # a line after every batch, with the time left
    assert progress[0].startswith("1/3 samples (") and " left)" in progress[0] and progress[-1].startswith("3/3 samples")
    assert " left" not in progress[-1]
    before = {path.name: np.load(path) for path in tmp_path.glob("t2v_*.npy")}
    first = sorted(tmp_path.glob("t2v_000_*"))
    stamps = [path.stat().st_mtime_ns for path in first]
    # Interrupted while writing the second sample (its record is written last) and before the third.
    next(tmp_path.glob("t2v_001_*.json")).unlink()
    for path in tmp_path.glob("t2v_002_*"):
        path.unlink()

    assert main([*args, "--skip-existing"]) == 0
    captured = capsys.readouterr()
    assert "1 of 3 samples are in" in captured.err and "wrote 2 samples" in captured.out
    assert [path.stat().st_mtime_ns for path in first] == stamps  # the complete sample was left alone
    assert sorted(before) == sorted(path.name for path in tmp_path.glob("t2v_*.npy"))
    for name, array in before.items():
        np.testing.assert_array_equal(np.load(tmp_path / name), array)
    assert not list(tmp_path.glob("*.partial"))

    assert main([*args, "--skip-existing", "--seed", "7"]) == 2
    assert "was written by another request (seed 0, not 7)" in one_line_error(capsys)

    # Each record names the model that made it; a run directory samples with its newest checkpoint.
    assert json.loads(next(tmp_path.glob("t2v_000_*.json")).read_text())["model"] == str(checkpoint.resolve())
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step=00000001.ckpt").write_bytes(checkpoint.read_bytes())
    (run.parent / "config.yaml").write_text("trainer: {}\n")  # what LightningCLI saves in a run directory
    run_args = [args[0], "--ckpt", str(run.parent), *args[3:]]
    assert main([*run_args, "--skip-existing"]) == 2
    assert f"model {str(checkpoint.resolve())!r}, not {str((run / 'step=00000001.ckpt').resolve())!r}" in \
        one_line_error(capsys)
    assert main([*run_args[:-1], str(tmp_path / "from_run")]) == 0
    for name, array in before.items():
        np.testing.assert_array_equal(np.load(tmp_path / "from_run" / name), array)


def test_a_seed_that_torch_would_wrap_onto_another_is_refused_by_every_score(checkpoint, tmp_path, capsys):
    from flowvid.pipeline import VideoPipeline

    video = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4,294,967,295"):
        VideoPipeline.from_pretrained(checkpoint, device="cpu").score(video, seed=-1)  # would be 2**32 - 1
    inputs = []
    for index in range(2):
        np.save(inputs_path := tmp_path / f"clip{index}.npy", video)
        inputs.append(str(inputs_path))
    # The second file's seed, 2**32, would draw the dequantisation noise of seed 0.
    assert main(["score", "--ckpt", str(checkpoint), "--input", *inputs, "--seed", str(2**32 - 1),
                 "--out", str(tmp_path / "scores.jsonl")]) == 2
    assert "--seed must be an integer from 0 to 4,294,967,294 for 2 samples" in one_line_error(capsys)
    assert not (tmp_path / "scores.jsonl").exists()


def test_a_caption_for_shard_folders_alone_is_refused_not_ignored(checkpoint, tmp_path, capsys):
    from flowvid.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=4, size=8, val_videos=2, shard_samples=2)
    args = ["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "shapes" / "train"),
            "--out", str(tmp_path / "scores.jsonl")]
    assert main([*args, "--caption", "a red circle"]) == 2
    assert "--caption applies to video files" in one_line_error(capsys)
    assert main(args) == 0  # each sample under its own caption


def test_the_pipeline_scores_a_video_as_flowvid_score_does(checkpoint, tmp_path):
    from flowvid.pipeline import GenerateError, VideoPipeline

    video = (np.random.default_rng(1).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", video)
    assert main(["score", "--ckpt", str(checkpoint), "--input", str(tmp_path / "clip.npy"), "--caption", "a red circle",
                 "--seed", "3", "--out", str(tmp_path / "scores.jsonl")]) == 0
    [expected] = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    scored = pipe.score(video, caption="a red circle", seed=3)
    assert scored["bits_per_dim"] == expected["bits_per_dim"]
    assert scored["bits_per_dim_per_frame"] == expected["bits_per_dim_per_frame"]
    assert pipe.score(video, caption="a blue square", seed=3)["bits_per_dim"] != expected["bits_per_dim"]
    with pytest.raises(GenerateError, match=r"uint8 frames of shape \(T, 8, 8, 3\)"):
        pipe.score(video[0])


class CountingSampler(SequentialSampler):
    """The exact inverse, streamed, counting the frames it has handed out."""

    def __init__(self):
        self.handed_out = 0

    def stream(self, flow, z, text=None, guidance=0.0, prefix=None):
        for frame in super().stream(flow, z, text, guidance, prefix):
            self.handed_out += 1
            yield frame


def model_with_a_denoiser(lookahead: int):
    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["video_shape"] = [6, 8, 8]
    config["model"]["init_args"]["denoiser"] = {
        "class_path": "flowvid.denoise.CausalDenoiser",
        "init_args": {"channels": 12, "frame_size": [4, 4], "width": 16, "depth": 2, "head_dim": 8, "window": 1,
                      "lookahead": lookahead, "text_width": 16}}
    torch.manual_seed(0)
    module = build_module(config)
    perturb_parameters(module.flow, std=0.02)
    torch.nn.init.normal_(module.denoiser.proj_out.weight, std=0.1)  # as if trained: it changes the frames
    return module.eval()


@pytest.mark.parametrize("lookahead", [1, 2])
def test_streamed_frames_are_final_and_come_the_denoisers_lookahead_behind_the_sampler(lookahead):
    from flowvid.pipeline import VideoPipeline

    pipe = VideoPipeline(model_with_a_denoiser(lookahead), CountingSampler())
    whole = pipe(["a red circle moves left", "a blue square"], seed=2, guidance=1.0)
    streamed = []
    for index, frames in enumerate(pipe.stream(["a red circle moves left", "a blue square"], seed=2, guidance=1.0)):
        assert pipe.sampler.handed_out == min(index + 1 + lookahead, 6)
        streamed.append(frames)
    assert len(streamed) == 6 and streamed[0].shape == (2, 8, 8, 3) and streamed[0].dtype == np.uint8
    difference = np.abs(np.stack(streamed, axis=1).astype(int) - whole.videos.astype(int))
    assert difference.max() <= 1 and difference.mean() < 1e-3  # the same video, up to rounding

    # The command line streams the same final frames, and its files hold the streamed video.
    latents = {}
    result = pipe.generate_batch(["a red circle moves left"], [2], None, guidance=1.0,
                                 on_frame=lambda index, frame: latents.setdefault(index, frame.clone()))
    np.testing.assert_allclose(result.latents[0], whole.latents[0], atol=1e-5)
    np.testing.assert_allclose(torch.stack([latents[i] for i in range(6)], 1)[0].numpy(), whole.latents[0], atol=1e-5)


def test_streaming_image_to_video_starts_with_the_image_and_without_a_denoiser_waits_for_the_end(checkpoint):
    from flowvid.pipeline import VideoPipeline

    image = (np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8)
    pipe = VideoPipeline(model_with_a_denoiser(1), CountingSampler())
    frames = pipe.stream("a blue square", task="i2v", image=image, seed=4)
    assert np.array_equal(next(frames)[0], image) and pipe.sampler.handed_out == 1
    assert len(list(frames)) == 5
    tweedie = VideoPipeline(load_model(checkpoint), CountingSampler())  # no learned denoiser
    frames = tweedie.stream("a blue square", seed=4)
    next(frames)
    assert tweedie.sampler.handed_out == 4  # the Tweedie step reads the whole video


def test_a_video_that_comes_out_nan_is_named_not_written_and_the_others_are(checkpoint, tmp_path, monkeypatch, capsys):
    from flowvid.pipeline import VideoPipeline
    from flowvid.sampling import JacobiSampler

    sample = JacobiSampler.sample

    def second_video_diverges(self, flow, z, *args, **kwargs):
        x = sample(self, flow, z, *args, **kwargs)
        x[1:2] = float("nan")
        return x

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na blue square moves up\na green triangle moves down\n")
    args = ["generate", "--ckpt", str(checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    with monkeypatch.context() as patch:
        patch.setattr(JacobiSampler, "sample", second_video_diverges)
        assert main(args) == 1  # some samples failed; not a request that cannot be done (2)
        last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
        assert "1 sample(s) came out NaN or infinite and were not written (t2v_001_a-blue-square-moves-up; " \
               "2 written)" in last_line
        with pytest.warns(UserWarning, match=r"videos \[1\] came out NaN or infinite"):
            result = VideoPipeline.from_pretrained(checkpoint, device="cpu")(["a", "b"], seed=0)
        assert result.failed == [1]
    assert sorted(p.name[:7] for p in (tmp_path / "out").glob("*.json")) == ["t2v_000", "t2v_002"]
    assert main([*args, "--skip-existing"]) == 0  # the missing sample, once the sampler behaves
    assert "2 of 3 samples are in" in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.json"))) == 3


def test_a_model_of_single_frames_makes_longer_videos_frame_by_frame():
    from flowvid.pipeline import VideoPipeline

    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["video_shape"] = [1, 8, 8]
    torch.manual_seed(0)
    module = build_module(config)
    perturb_parameters(module.flow, std=0.02)
    pipe = VideoPipeline(module.eval())
    videos = pipe(["a red circle"], frames=3, seed=0).videos
    assert videos.shape == (1, 3, 8, 8, 3)
    assert pipe.sampler_for(3).context == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["call", "stream"])
def test_the_given_frames_come_back_as_given_through_a_lossy_codec(streamed):
    """A VAE does not give back exactly what it encoded: the image of image-to-video is returned itself."""
    from flowvid.pipeline import VideoPipeline

    config = copy.deepcopy(CONFIG)
    init = config["model"]["init_args"]
    init["codec"] = {"class_path": "flowvid.codecs.VideoVAE",
                     "init_args": {"spatial_factor": 2, "temporal_factor": 4, "latent_channels": 4, "width": 8,
                                   "depth": 1}}
    init["flow"]["init_args"]["latent_channels"] = 4
    init["video_shape"] = [5, 8, 8]
    torch.manual_seed(0)
    module = build_module(config)
    perturb_parameters(module, std=0.05)
    image = (np.random.default_rng(3).random((8, 8, 3)) * 255).astype(np.uint8)
    pipe = VideoPipeline(module.eval())
    assert not np.array_equal(module.codec.decode(module.codec.encode(torch.from_numpy(image)[None, None]))[0, 0],
                              image)  # the codec alone would not give it back
    if streamed:
        videos = np.stack(list(pipe.stream(["x", "y"], task="i2v", image=image, seed=1)), axis=1)
    else:
        videos = pipe(["x", "y"], task="i2v", image=image, seed=1).videos
    assert videos.shape == (2, 5, 8, 8, 3) and all(np.array_equal(video[0], image) for video in videos)


def test_the_demo_keeps_every_image_to_video_sample_when_captions_repeat(checkpoint, tmp_path):
    from flowvid.demo import generate_i2v

    rng = np.random.default_rng(0)
    samples = [{"caption": "a red circle moves left", "video": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}
               for _ in range(2)]
    videos = generate_i2v(load_model(checkpoint), samples, tmp_path)
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2 and len(videos) == 2
    for folder, sample, video in zip(folders, samples, videos):
        [npy] = [p for p in folder.glob("*.npy") if not p.name.endswith(".latent.npy")]
        np.testing.assert_array_equal(np.load(npy), video)
        np.testing.assert_array_equal(video[0], sample["video"][0])  # each from its own first frame


def test_context_sets_the_frames_each_window_continues_and_is_refused_where_it_would_do_nothing(checkpoint, tmp_path,
                                                                                                capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "x", "--seed", "2"]
    assert main([*args, "--frames", "7", "--context", "1", "--out", str(tmp_path / "c1")]) == 0
    record = read_record(tmp_path / "c1", "t2v_000")
    assert record["context"] == 1
    assert record["sampler_stats"]["window"] == 4 and record["sampler_stats"]["context"] == 1
    assert len(record["sampler_stats"]["windows"]) == 2  # frames 0-3, then 3-6 continuing frame 3
    for extra, message in [
        (["--frames", "7", "--context", "4"], "--context must be below the model's training length of 4 latent"),
        (["--frames", "4", "--context", "1"], "--context: 4 frames fit in the model's training length of 4"),
        (["--frames", "7", "--context", "-1"], "--context must be >= 0 latent frames, got -1"),
    ]:
        assert main([*args, *extra, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def checkpoint_sampling_with(sampler, folder: Path) -> Path:
    """A checkpoint of the tiny model (a training length of 4 latent frames) whose recipe sets ``sampler``."""
    config = copy.deepcopy(CONFIG)
    config["model"]["init_args"]["sampler"] = sampler
    torch.manual_seed(0)
    module = build_module(config)
    perturb_parameters(module.flow, std=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "windowed.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowvid_run": {"config": config}}, path)
    return path


def windowed(sampler, window: int, context: int) -> dict:
    return {"name": "windowed", "init_args": {"sampler": sampler, "window": window, "context": context}}


def test_generate_samples_each_window_of_a_windowed_recipe_with_its_sampler_and_context(tmp_path, capsys):
    from flowvid.pipeline import VideoPipeline

    ckpt = checkpoint_sampling_with(windowed("jacobi", window=4, context=1), tmp_path / "model")
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "x", "--frames", "7"]
    assert main([*args, "--out", str(tmp_path / "long")]) == 0
    record = read_record(tmp_path / "long", "t2v_000")
    # The sampler of each window, at the precision's tolerance, continuing the recipe's context.
    assert (record["sampler"], record["tol"], record["context"]) == ("jacobi", 1e-3, 1) and "window" not in record
    stats = record["sampler_stats"]
    assert (stats["window"], stats["context"], len(stats["windows"])) == (4, 1, 2)
    # The pipeline samples the same: its windows' Jacobi sampler gets the precision's tolerance too.
    pipe = VideoPipeline(load_model(ckpt))
    assert pipe.sampler.sampler.tol == 1e-3
    np.testing.assert_array_equal(generated_latents(tmp_path / "long"), pipe("x", seed=0, frames=7).latents[0])

    # The same request spelled out on the command line is the same sample: --skip-existing keeps it.
    assert main([*args, "--sampler", "jacobi", "--context", "1", "--skip-existing",
                 "--out", str(tmp_path / "long")]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err

    # A video within the training length is sampled in one piece, as by the sampler of each window.
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "short")]) == 0
    record = read_record(tmp_path / "short", "t2v_000")
    assert (record["sampler"], record["tol"]) == ("jacobi", 1e-3) and "context" not in record


def test_a_windowed_recipe_at_the_default_context_records_none_and_keeps_plain_samples(tmp_path, capsys):
    ckpt = checkpoint_sampling_with(windowed("jacobi", window=4, context=2), tmp_path / "model")
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "x", "--frames", "7", "--out", str(tmp_path / "s")]
    assert main([*args, "--sampler", "jacobi"]) == 0
    assert main([*args, "--skip-existing"]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err
    assert "context" not in read_record(tmp_path / "s", "t2v_000")


def test_a_windowed_recipes_shorter_window_and_window_sampler_settings_are_honoured_and_recorded(tmp_path, capsys):
    from flowvid.pipeline import VideoPipeline

    ckpt = checkpoint_sampling_with(windowed({"name": "jacobi", "init_args": {"tol": 0.05}}, window=2, context=0),
                                    tmp_path / "model")
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "x", "--frames", "7"]
    assert main([*args, "--out", str(tmp_path / "recipe")]) == 0
    record = read_record(tmp_path / "recipe", "t2v_000")
    assert (record["sampler"], record["tol"], record["window"], record["context"]) == ("jacobi", 0.05, 2, 0)
    assert (record["sampler_stats"]["window"], len(record["sampler_stats"]["windows"])) == (2, 4)
    np.testing.assert_array_equal(generated_latents(tmp_path / "recipe"),
                                  VideoPipeline(load_model(ckpt))("x", seed=0, frames=7).latents[0])

    assert main([*args, "--context", "1", "--out", str(tmp_path / "context")]) == 0
    record = read_record(tmp_path / "context", "t2v_000")
    assert (record["window"], record["context"], record["sampler_stats"]["context"]) == (2, 1, 1)
    capsys.readouterr()
    assert main([*args, "--context", "2", "--out", str(tmp_path / "refused")]) == 2
    assert "--context must be below the model's sampler's window of 2 latent frames" in one_line_error(capsys)


def test_a_windowed_recipe_with_a_window_beyond_the_training_length_is_refused(tmp_path, capsys):
    ckpt = checkpoint_sampling_with(windowed("jacobi", window=5, context=2), tmp_path / "model")
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "window of 5 latent frames is longer than the model's training length of 4" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
