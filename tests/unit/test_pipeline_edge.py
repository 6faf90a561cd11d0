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
