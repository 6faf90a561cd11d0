"""`flowvid generate` where a first run of it goes astray: Ctrl-C, a clip to continue, a resumed folder, and the
files users give it."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flowvid.cli import main
from flowvid.codecs.base import LatentCodec
from flowvid.pipeline import Source, VideoPipeline
from test_product_generate_score import checkpoint, one_line_error  # noqa: F401 (a fixture)


def generate(checkpoint, out, *extra) -> int:
    return main(["generate", "--ckpt", str(checkpoint), "--out", str(out), *extra])


def frames_of(folder: Path) -> dict[str, np.ndarray]:
    """Each sample's frames by name."""
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy")) if not p.name.endswith(".latent.npy")}


THREE_PROMPTS = ["--prompt", "a red circle", "--prompt", "a blue square", "--prompt", "a green dot",
                 "--batch-size", "1"]


# --- Ctrl-C ---------------------------------------------------------------------------------------


def interrupt_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """Ctrl-C at the ``call``-th call (from 1) of ``owner.name``; the calls before it run."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def test_ctrl_c_while_sampling_says_in_one_line_what_is_done_and_how_to_finish(checkpoint, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "out"
    interrupt_on_call(monkeypatch, VideoPipeline, "generate_batch", call=2)
    assert generate(checkpoint, out, *THREE_PROMPTS) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"flowvid generate: interrupted with 1 of 3 samples complete in {out}; run the same command with "
        "--skip-existing to sample the others")
    assert sorted(p.name for p in out.iterdir()) == [f"t2v_000_a-red-circle{suffix}" for suffix in
                                                     (".json", ".latent.npy", ".mp4", ".npy")]
    monkeypatch.undo()
    assert generate(checkpoint, out, *THREE_PROMPTS, "--skip-existing") == 0
    assert "1 of 3 samples are in" in capsys.readouterr().err
    assert generate(checkpoint, tmp_path / "whole", *THREE_PROMPTS) == 0
    resumed, whole = frames_of(out), frames_of(tmp_path / "whole")
    assert list(resumed) == list(whole) and all(np.array_equal(resumed[k], whole[k]) for k in whole)


def test_ctrl_c_while_a_sample_is_written_leaves_no_part_of_it(checkpoint, tmp_path, capsys, monkeypatch):
    import flowvid.generate

    out = tmp_path / "out"
    assert generate(checkpoint, out, *THREE_PROMPTS) == 0  # an earlier run's samples, to be overwritten
    interrupt_on_call(monkeypatch, flowvid.generate, "write_video", call=2)  # inside the second sample's mp4
    assert generate(checkpoint, out, *THREE_PROMPTS, "--skip-existing", "--seed", "1", "--force") == 130
    assert "interrupted with 1 of 3 samples complete" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    # The second sample's old record went first: its old files are no sample of this request.
    assert "t2v_001_a-blue-square.json" not in names and not [n for n in names if "partial" in n]


def test_ctrl_c_before_sampling_exits_as_ctrl_c(checkpoint, tmp_path, capsys, monkeypatch):
    import flowvid.loading

    interrupt_on_call(monkeypatch, flowvid.loading, "load_model", call=1)
    assert generate(checkpoint, tmp_path / "out", "--prompt", "x") == 130
    assert one_line_error(capsys) == "flowvid generate: interrupted before sampling began\n"


def test_ctrl_c_exits_with_the_status_flowvid_fit_exits_with():
    from flowvid.generate import CTRL_C_EXIT_STATUS
    from flowvid.lit.cli_support import CTRL_C_EXIT_STATUS as FIT_CTRL_C_EXIT_STATUS

    assert CTRL_C_EXIT_STATUS == FIT_CTRL_C_EXIT_STATUS == 130


# --- extend and v2v without --frames --------------------------------------------------------------


@pytest.mark.parametrize("task", ["extend", "v2v"])
def test_a_clip_as_long_as_the_training_length_is_continued_by_one_training_length(checkpoint, tmp_path, capsys,
                                                                                  task):
    clip = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)  # the training length
    np.save(tmp_path / "clip.npy", clip)
    given = ["--task", task, "--video", str(tmp_path / "clip.npy"), "--prompt", "x"]
    assert generate(checkpoint, tmp_path / "o", *given) == 0
    [(name, video)] = frames_of(tmp_path / "o").items()
    assert video.shape == (8, 8, 8, 3) and np.array_equal(video[:4], clip)
    assert json.loads((tmp_path / "o" / name).with_suffix("").with_suffix(".json").read_text())["frames"] == 8
    capsys.readouterr()
    assert generate(checkpoint, tmp_path / "o", *given, "--skip-existing") == 0  # the same request
    assert "1 of 1 samples are in" in capsys.readouterr().err
    assert generate(checkpoint, tmp_path / "e", *given, "--frames", "4") == 2  # asked for: still refused
    assert "leave nothing to sample" in one_line_error(capsys)


def test_the_pipeline_continues_a_clip_by_one_training_length_unless_told(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    clip = np.zeros((5, 8, 8, 3), np.uint8)
    assert pipe("x", task="extend", video=clip).videos.shape == (1, 9, 8, 8, 3)
    assert pipe("x", task="v2v", video=clip, frames=7).videos.shape == (1, 7, 8, 8, 3)
    assert pipe("x", task="i2v", image=clip[0]).videos.shape == (1, 4, 8, 8, 3)


class CausalCodec:
    """What ``default_frames`` reads of a codec that packs a first frame alone, then 4 frames per latent one."""

    temporal_factor, causal_first_frame = 4, True
    latent_frames, decoded_frames = LatentCodec.latent_frames, LatentCodec.decoded_frames

    def check_video_size(self, *sizes):
        pass


def test_the_default_continuation_is_one_training_length_of_latent_frames():
    from flowvid.pipeline import default_frames

    model = SimpleNamespace(video_shape=(9, 8, 8), latent_shape=(3, 4, 4, 12), codec=CausalCodec())
    clip = Source(frames=np.zeros((1, 5, 8, 8, 3), np.uint8), resized_from=None)  # 2 latent frames
    assert default_frames(model, "extend", clip) == 17  # 5 latent frames
    assert default_frames(model, "i2v", clip) == default_frames(model, "t2v", None) == 9


# --- --skip-existing and missing files ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".npy", ".latent.npy"])
def test_skip_existing_samples_again_a_sample_that_lost_a_file(checkpoint, tmp_path, capsys, suffix):
    out = tmp_path / "out"
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square"]
    assert generate(checkpoint, out, *prompts) == 0
    before = frames_of(out)
    (out / f"t2v_001_a-blue-square{suffix}").unlink()
    capsys.readouterr()
    assert generate(checkpoint, out, *prompts, "--skip-existing") == 0
    captured = capsys.readouterr()
    assert "1 of 2 samples are in" in captured.err and "wrote 1 sample to" in captured.out
    assert (out / f"t2v_001_a-blue-square{suffix}").is_file()
    after = frames_of(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# --- "another request" messages -------------------------------------------------------------------


@pytest.mark.parametrize("first, then, said", [
    (["--samples-per-prompt", "2"], [], "samples_per_prompt 2, not 1"),
    (["--sampler-args", '{"max_iterations": 2}'], [], 'sampler_args {"max_iterations": 2}, now not given'),
    ([], ["--first-block-size", "32"], "first_block_size not given, not 32"),
    (["--guidance", "2"], ["--guidance", "3"], "guidance 2, not 3"),
])
def test_another_request_is_named_as_the_command_line_gives_it(checkpoint, tmp_path, capsys, first, then, said):
    out = tmp_path / "out"
    assert generate(checkpoint, out, "--prompt", "x", *first) == 0
    capsys.readouterr()
    assert generate(checkpoint, out, "--prompt", "x", *then, "--skip-existing") == 2
    error = one_line_error(capsys)
    assert f"was written by another request ({said})" in error and "None" not in error


def test_a_sampler_by_its_class_path_is_the_same_request_as_by_its_name(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(checkpoint, out, "--prompt", "x", "--sampler", "flowvid.sampling.SequentialSampler") == 0
    capsys.readouterr()
    assert generate(checkpoint, out, "--prompt", "x", "--sampler", "sequential", "--skip-existing") == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err
    assert generate(checkpoint, out, "--prompt", "x", "--sampler", "jacobi", "--skip-existing") == 2
    assert "(sampler 'sequential', not 'jacobi'" in one_line_error(capsys)


# --- --image as a .npy ----------------------------------------------------------------------------


def test_an_image_saved_with_numpy_starts_i2v(checkpoint, tmp_path):
    image = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "frames.npy", np.stack([image, 255 - image]))
    for given in ("image.npy", "frames.npy"):
        out = tmp_path / f"from_{given}"
        assert generate(checkpoint, out, "--task", "i2v", "--image", str(tmp_path / given), "--prompt", "x") == 0
        [video] = frames_of(out).values()
        assert np.array_equal(video[0], image)


def test_a_npy_that_holds_no_image_is_named(checkpoint, tmp_path, capsys):
    np.save(tmp_path / "floats.npy", np.zeros((8, 8, 3), np.float32))
    assert generate(checkpoint, tmp_path / "o", "--task", "i2v", "--image", str(tmp_path / "floats.npy"),
                    "--prompt", "x") == 2
    assert "holds float32 (8, 8, 3), expected a uint8 image (H, W, 3) or uint8 frames" in one_line_error(capsys)


# --- prompt files ---------------------------------------------------------------------------------


def test_blank_and_comment_lines_of_a_prompt_file_are_skipped_wherever_they_are(tmp_path):
    from flowvid.generate import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# captions for the demo\na red circle\n\n  \n  # not this one\na blue square\n\n")
    assert read_prompt_file(prompts) == ["a red circle", "a blue square"]


@pytest.mark.parametrize("text, said", [("", "is empty"), ("\n \n", "is empty"),
                                        ("# only\n\n#this\n", "holds only blank lines and # comments")])
def test_a_prompt_file_without_prompts_says_what_it_holds(tmp_path, text, said):
    from flowvid.generate import GenerateError, read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    with pytest.raises(GenerateError, match=f"prompt file {prompts} {said}; write one prompt per line"):
        read_prompt_file(prompts)


def test_an_empty_file_that_is_no_regular_file_is_called_empty():
    from flowvid.generate import GenerateError, read_prompt_file

    with pytest.raises(GenerateError, match="prompt file /dev/null is empty"):
        read_prompt_file(Path("/dev/null"))


def test_prompts_are_numbered_from_the_prompt_options_then_the_file(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n# a comment\na green dot\n")
    assert generate(checkpoint, tmp_path / "o", "--prompts", str(prompts), "--prompt", "a red circle") == 0
    assert sorted(p.stem for p in (tmp_path / "o").glob("*.json")) == [
        "t2v_000_a-red-circle", "t2v_001_a-blue-square", "t2v_002_a-green-dot"]
