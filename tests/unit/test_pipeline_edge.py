"""`VideoPipeline` and `flowvid generate` at the edges of what users give them."""

import re

import numpy as np
import pytest

from flowvid.cli import main
from flowvid.pipeline import GenerateError, VideoPipeline
from flowvid.sampling import JacobiSampler, SequentialSampler, WindowedSampler
from test_product_generate_score import checkpoint, unconditional_checkpoint, vae_checkpoint  # noqa: F401 (fixtures)


class RefusingSampler(SequentialSampler):
    """Fails a test that samples: the requests given to it must be refused first."""

    def sample(self, *args, **kwargs):
        raise AssertionError("sampled a request that should have been refused")

    def stream(self, *args, **kwargs):
        raise AssertionError("sampled a request that should have been refused")


def refusing_pipeline(checkpoint) -> VideoPipeline:
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    pipe.sampler = RefusingSampler()
    return pipe


def test_streaming_text_to_video_of_a_codec_that_decodes_frames_in_groups_gives_the_video(tmp_path):
    pipe = VideoPipeline.from_pretrained(vae_checkpoint(tmp_path), device="cpu", sampler=SequentialSampler())
    prompts = ["a red circle moves left", "a blue square moves up"]
    streamed = np.stack(list(pipe.stream(prompts, seed=3)), axis=1)
    called = pipe(prompts, seed=3).videos
    assert streamed.shape == called.shape == (2, 4, 8, 8, 3) and streamed.dtype == np.uint8
    assert np.abs(streamed.astype(int) - called).max() <= 1


@pytest.mark.parametrize("negative_prompt", ["   ", "\u200b", "\t\n"])
def test_a_negative_prompt_of_no_words_is_refused_not_steered_away_from(checkpoint, negative_prompt):
    pipe = refusing_pipeline(checkpoint)
    for call in (pipe, lambda *args, **kwargs: next(pipe.stream(*args, **kwargs))):
        with pytest.raises(GenerateError, match=r"^negative prompt .* holds only whitespace or invisible characters"):
            call("a red circle", guidance=2.0, negative_prompt=negative_prompt)


def test_a_negative_prompt_of_none_is_no_negative_prompt_as_in_diffusers(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    none = pipe("a red circle", guidance=2.0, negative_prompt=None, seed=1)
    empty = pipe("a red circle", guidance=2.0, negative_prompt="", seed=1)
    np.testing.assert_array_equal(none.videos, empty.videos)
    with pytest.raises(GenerateError, match=r"^negative_prompt must be a string \(''"):
        refusing_pipeline(checkpoint)("a red circle", guidance=2.0, negative_prompt=["a blue square"])


def test_guiding_an_unconditional_model_is_refused_before_any_work(unconditional_checkpoint, tmp_path, capsys):
    pipe = refusing_pipeline(unconditional_checkpoint)
    for call in (pipe, lambda **kwargs: next(pipe.stream(**kwargs))):
        with pytest.raises(GenerateError, match=r"^this model is unconditional .* cannot be guided \(guidance 2.0\)"):
            call(guidance=2.0)
    out = tmp_path / "out"
    assert main(["generate", "--ckpt", str(unconditional_checkpoint), "--guidance", "2", "--out", str(out)]) == 2
    assert "cannot be guided" in capsys.readouterr().err
    assert not out.exists()  # refused before the folder is made


@pytest.mark.parametrize("prompts, named", [(["a red circle", 3], "3 (int)"), ([None], "None (NoneType)")])
def test_a_prompt_that_is_not_a_string_is_named(checkpoint, prompts, named):
    with pytest.raises(GenerateError, match=f"^prompts must be strings, got {re.escape(named)}"):
        refusing_pipeline(checkpoint)(prompts)


def test_guidance_that_is_not_a_number_is_a_generate_error(checkpoint):
    with pytest.raises(GenerateError, match=r"^guidance must be a finite number >= 0, got '3'"):
        refusing_pipeline(checkpoint)("a red circle", guidance="3")


def test_prompts_in_an_array_are_sampled_as_the_list_of_them(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    prompts = ["a red circle moves left", "a blue square moves up"]
    np.testing.assert_array_equal(pipe(np.array(prompts), seed=2).videos, pipe(prompts, seed=2).videos)


@pytest.mark.parametrize("streamed", [False, True], ids=["call", "stream"])
def test_a_window_longer_than_the_training_length_is_refused_before_sampling(checkpoint, streamed):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")  # trained on 4 latent frames
    pipe.sampler = WindowedSampler(RefusingSampler(), window=6, context=2)
    with pytest.raises(GenerateError, match="window of 6 latent frames is longer than the model's training length"):
        if streamed:
            list(pipe.stream("x", frames=8))
        else:
            pipe("x", frames=8)


class PatientJacobi(JacobiSampler):
    """A plugin that chose its own default tolerance."""

    def __init__(self, tol: float = 0.05, **settings):
        super().__init__(tol=tol, **settings)


class CappedJacobi(JacobiSampler):
    """A plugin that leaves the tolerance to JacobiSampler."""

    def __init__(self, max_iterations: int = 8, **settings):
        super().__init__(max_iterations=max_iterations, **settings)


def test_the_precisions_tolerance_leaves_a_plugins_own_default_alone(monkeypatch):
    from flowvid.pipeline import with_default_tolerance
    from flowvid.registry import SAMPLERS

    monkeypatch.setattr(SAMPLERS, "_entries", dict(SAMPLERS._entries))
    SAMPLERS.register("patient-jacobi")(PatientJacobi)
    SAMPLERS.register("capped-jacobi")(CappedJacobi)
    assert with_default_tolerance("patient-jacobi", {}, "32-true") == {}
    assert with_default_tolerance("capped-jacobi", {}, "32-true") == {"tol": 1e-3}
    assert with_default_tolerance("jacobi", {}, "bf16-mixed") == {"tol": 1e-2}
    assert with_default_tolerance("jacobi", {"tol": 0.2}, "32-true") == {"tol": 0.2}


def test_prompts_given_as_bytes_are_named_as_bytes_not_as_their_integers(checkpoint):
    with pytest.raises(GenerateError, match=r"^prompts must be strings, got b'a red circle' \(bytes\)"):
        refusing_pipeline(checkpoint)(b"a red circle")


@pytest.mark.parametrize("caption", [None, ["a red circle"]])
def test_a_caption_to_score_that_is_not_a_string_is_a_generate_error(checkpoint, caption):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    with pytest.raises(GenerateError, match=r"^caption must be a string \(''"):
        pipe.score(np.zeros((4, 8, 8, 3), np.uint8), caption=caption)


def test_unknown_weights_or_a_sampler_given_by_name_are_refused_before_loading(tmp_path, monkeypatch):
    import flowvid.loading

    def load_model(*args, **kwargs):
        raise AssertionError("loaded a model for a request that should have been refused")

    monkeypatch.setattr(flowvid.loading, "load_model", load_model)
    missing = tmp_path / "model.safetensors"
    with pytest.raises(GenerateError, match=r"^weights must be one of ema, trained, got 'best'"):
        VideoPipeline.from_pretrained(missing, device="cpu", weights="best")
    with pytest.raises(GenerateError, match=r"^sampler must be a Sampler instance .*, got 'sequential'"):
        VideoPipeline.from_pretrained(missing, device="cpu", sampler="sequential")


def test_the_constructor_refuses_a_sampler_that_is_not_one(checkpoint):
    model = VideoPipeline.from_pretrained(checkpoint, device="cpu").model
    with pytest.raises(GenerateError, match=r"^sampler must be a Sampler instance"):
        VideoPipeline(model, sampler="jacobi")


def test_the_documented_arguments_are_the_arguments():
    """``help()`` on the public calls describes every argument they take."""
    import inspect

    for call in (VideoPipeline.__call__, VideoPipeline.from_pretrained):
        documented = inspect.getdoc(call)
        for name in inspect.signature(call).parameters:
            if name not in ("self", "cls"):
                assert re.search(rf"^\s+(\w+, )*{name}(, \w+)*:", documented, re.MULTILINE), (call.__name__, name)


BF16_EMULATED = "ignore:this CPU has no native bf16"


@pytest.mark.filterwarnings(BF16_EMULATED)
def test_moving_a_pipeline_returns_it_and_the_models_own_sampler_follows_the_precision(checkpoint):
    import torch

    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", precision="32-true")
    before = pipe("a red circle", seed=1).videos
    assert pipe.sampler.tol == 1e-3
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.precision == "32-true"
    np.testing.assert_array_equal(pipe("a red circle", seed=1).videos, before)

    pipe.to(precision="bf16-mixed")
    assert pipe.precision == "bf16-mixed" and pipe.sampler.tol == 1e-2  # the model's own, rebuilt
    assert pipe.to(torch.device("cpu"), precision="32-true").sampler.tol == 1e-3


@pytest.mark.filterwarnings(BF16_EMULATED)
@pytest.mark.parametrize("given_at", ["from_pretrained", "assignment"])
def test_moving_a_pipeline_keeps_the_sampler_given_to_it(checkpoint, given_at):
    given = JacobiSampler(tol=0.3)
    if given_at == "from_pretrained":
        pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=given)
    else:
        pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
        pipe.sampler = given
    pipe.to("cpu", precision="bf16-mixed")
    assert pipe.sampler is given
    pipe.sampler = None  # back to the model's own, at the precision's tolerance
    assert isinstance(pipe.sampler, JacobiSampler) and pipe.sampler.tol == 1e-2


@pytest.mark.parametrize("device, precision, error", [
    ("gpu", None, r"^device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("mps", None, r"^device 'mps' is not supported"),
    ("cuda:99", None, r"^device 'cuda:99': (no CUDA device is visible|only \d+ CUDA device)"),
    (None, "fp16", r"^precision 'fp16' is not one of auto, 32-true, bf16-mixed"),
])
def test_moving_a_pipeline_where_it_cannot_go_is_refused_before_anything_moves(checkpoint, monkeypatch, device,
                                                                              precision, error):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    sampler = pipe.sampler

    def move(*args, **kwargs):
        raise AssertionError("moved the model for a request that should have been refused")

    monkeypatch.setattr(pipe.model, "to", move)
    with pytest.raises(GenerateError, match=error):
        pipe.to(device, precision=precision)
    assert pipe.precision == "32-true" and pipe.sampler is sampler


def test_a_sampler_assigned_by_name_is_refused_when_assigned_not_when_sampling(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    sampler = pipe.sampler
    with pytest.raises(GenerateError, match=r"^sampler must be a Sampler instance .*, got 'sequential'"):
        pipe.sampler = "sequential"
    assert pipe.sampler is sampler


def test_numpy_integers_are_taken_for_frames_seed_and_batch_size(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=SequentialSampler())
    prompts = ["a red circle moves left", "a blue square moves up"]
    given = pipe(prompts, frames=np.int64(4), seed=np.int64(3), batch_size=np.int32(1))
    expected = pipe(prompts, frames=4, seed=3, batch_size=1)
    np.testing.assert_array_equal(given.videos, expected.videos)
    assert given.seeds == [3, 4] and all(type(seed) is int for seed in given.seeds)
    streamed = np.stack(list(pipe.stream(prompts, frames=np.int64(4), seed=np.uint32(3))), axis=1)
    np.testing.assert_array_equal(streamed, expected.videos)
    scored = pipe.score(expected.videos[0], caption=prompts[0], seed=np.int64(0))
    assert scored == pipe.score(expected.videos[0], caption=prompts[0], seed=0)


@pytest.mark.parametrize("setting, error", [
    ({"frames": True}, r"^frames and batch_size must be integers >= 1, got True"),
    ({"batch_size": np.True_}, r"^frames and batch_size must be integers >= 1, got 4 and "),
    ({"seed": True}, r"^seed must be an integer from 0 to .*, got True"),
    ({"guidance": True}, r"^guidance must be a finite number >= 0, got True"),
])
def test_a_bool_is_no_count_seed_or_guidance(checkpoint, setting, error):
    with pytest.raises(GenerateError, match=error):
        refusing_pipeline(checkpoint)("a red circle", **setting)


def test_videos_per_prompt_samples_each_prompt_in_a_row_as_the_prompt_repeated_by_hand(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    prompts = ["a red circle moves left", "a blue square moves up"]
    each_twice = pipe(prompts, seed=3, batch_size=3, videos_per_prompt=np.int64(2))
    by_hand = pipe(["a red circle moves left"] * 2 + ["a blue square moves up"] * 2, seed=3, batch_size=3)
    assert each_twice.videos.shape == (4, 4, 8, 8, 3) and each_twice.seeds == [3, 4, 5, 6]
    assert each_twice.captions == by_hand.captions and each_twice.captions[0] == each_twice.captions[1]
    np.testing.assert_array_equal(each_twice.videos, by_hand.videos)
    assert not np.array_equal(each_twice.videos[0], each_twice.videos[1])  # two samples, not one twice
    alone = pipe("a blue square moves up", seed=6)  # the last sample, drawn on its own from its seed
    np.testing.assert_allclose(each_twice.latents[3], alone.latents[0], atol=1e-5)
    np.testing.assert_array_equal(pipe(prompts, seed=3, videos_per_prompt=1).videos, pipe(prompts, seed=3).videos)


def test_videos_per_prompt_of_one_image_starts_each_video_with_it(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = pipe("a blue square moves up", task="i2v", image=image, seed=1, videos_per_prompt=3)
    assert out.videos.shape[0] == 3 and all(np.array_equal(video[0], image) for video in out.videos)
    assert len({video.tobytes() for video in out.videos}) == 3
    np.testing.assert_array_equal(out.videos, pipe(["a blue square moves up"] * 3, task="i2v", image=image,
                                                   seed=1).videos)


def test_an_unconditional_model_samples_videos_per_prompt_without_a_prompt(unconditional_checkpoint):
    out = VideoPipeline.from_pretrained(unconditional_checkpoint, device="cpu")(seed=2, videos_per_prompt=2)
    assert out.videos.shape[0] == 2 and out.seeds == [2, 3]


def test_streaming_videos_per_prompt_gives_each_prompt_in_a_row_as_a_call_does(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=SequentialSampler())
    prompts = ["a red circle moves left", "a blue square moves up"]
    streamed = np.stack(list(pipe.stream(prompts, seed=3, videos_per_prompt=np.int64(2))), axis=1)
    by_hand = np.stack(list(pipe.stream([prompt for prompt in prompts for _ in range(2)], seed=3)), axis=1)
    np.testing.assert_array_equal(streamed, by_hand)
    called = pipe(prompts, seed=3, videos_per_prompt=2).videos
    assert streamed.shape == called.shape == (4, 4, 8, 8, 3)
    assert np.abs(streamed.astype(int) - called).max() <= 1  # frames sampled one at a time: up to rounding
    assert not np.array_equal(streamed[0], streamed[1])  # two samples, not one twice


@pytest.mark.parametrize("count", [0, -1, True, 2.0, "2", None])
def test_videos_per_prompt_that_is_no_count_is_refused_before_any_work(checkpoint, count):
    message = rf"^videos_per_prompt must be an integer >= 1, got {re.escape(repr(count))}$"
    pipe = refusing_pipeline(checkpoint)
    for call in (pipe, lambda *args, **kwargs: next(pipe.stream(*args, **kwargs))):
        with pytest.raises(GenerateError, match=message):
            call("a red circle", videos_per_prompt=count)


def test_a_sampler_shows_its_settings_and_its_repr_builds_the_same_sampler():
    jacobi = JacobiSampler(tol=0.05, block_size=8, max_iterations=12, warm_start="values")
    assert repr(jacobi) == ("JacobiSampler(tol=0.05, block_size=8, first_block_size=None, max_iterations=12, "
                            "warm_start='values')")
    windowed = WindowedSampler(jacobi, window=4, context=2)
    rebuilt = eval(repr(windowed), {"JacobiSampler": JacobiSampler, "WindowedSampler": WindowedSampler})
    assert repr(rebuilt) == repr(windowed) and rebuilt.sampler.warm_start == "values"
    assert repr(SequentialSampler()) == "SequentialSampler()"


def test_a_pipeline_shows_what_it_samples_with(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", precision="32-true")
    pipe.sampler = SequentialSampler()
    shape = pipe.model.video_shape
    assert repr(pipe) == (f"VideoPipeline(video_shape={shape}, codec='pixel', text_encoder=LearnedTextEncoder, "
                          "sampler=SequentialSampler(), device=cpu, precision='32-true')")


@pytest.mark.parametrize("image, remedy", [(np.zeros((8, 8, 3), np.float32), "convert them to uint8, 0 to 255"),
                                           (np.zeros((5, 5, 3), np.uint8), "give a file to have it resized")])
def test_an_image_that_is_not_the_models_frame_says_what_to_change(checkpoint, image, remedy):
    pipe = refusing_pipeline(checkpoint)  # of 8x8 frames
    with pytest.raises(GenerateError, match=re.escape(f"({remedy})")):
        pipe("a", task="i2v", image=image)
