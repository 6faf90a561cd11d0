"""`VideoPipeline` given the keywords of a diffusers pipeline, or a slip of its own: a TypeError that says
what to give instead."""

import inspect
import re

import numpy as np
import pytest
import torch

from flowvid.pipeline import VideoPipeline
from flowvid.sampling import SequentialSampler
from test_product_generate_score import checkpoint  # noqa: F401 (fixture)


class RefusingSampler(SequentialSampler):
    """Fails a test that samples: a call with a keyword the pipeline does not take must not sample."""

    def sample(self, *args, **kwargs):
        raise AssertionError("sampled a call with an unknown keyword")

    def stream(self, *args, **kwargs):
        raise AssertionError("sampled a call with an unknown keyword")


@pytest.fixture(scope="module")
def pipe(checkpoint):  # noqa: F811
    pipeline = VideoPipeline.from_pretrained(checkpoint, device="cpu")
    pipeline.sampler = RefusingSampler()
    return pipeline


def calls(pipe):
    """Each way to sample, as a function of keywords that raises at once."""
    return {"__call__": pipe, "stream": lambda *args, **kwargs: next(pipe.stream(*args, **kwargs))}


@pytest.mark.parametrize("call", ["__call__", "stream"])
@pytest.mark.parametrize("name, value, named", [
    ("prompt", "a red circle", "use prompts="),
    ("num_frames", 8, "use frames="),
    ("guidance_scale", 5.0, "use guidance=, the weight beyond the conditional: a diffusers scale s is guidance=s - 1"),
    ("generator", torch.Generator().manual_seed(0), "use seed= (an int)"),
    ("num_videos_per_prompt", 2, "use videos_per_prompt="),
    ("num_inference_steps", 50, "sampler's tol and max_iterations"),
    ("height", 64, "pipe.model.video_shape"),
    ("width", 64, "pipe.model.video_shape"),
    ("latents", torch.zeros(1), "the noise is drawn from seed="),
    ("prompt_embeds", torch.zeros(1), "give prompts="),
    ("output_type", "np", ".latents"),
    ("return_dict", False, "always a GeneratedVideos"),
])
def test_a_diffusers_keyword_names_flowvids(pipe, call, name, value, named):
    with pytest.raises(TypeError) as raised:
        calls(pipe)[call]("a red circle", **{name: value})
    message = str(raised.value)
    assert message.startswith(f"VideoPipeline.{call}() got an unexpected keyword argument '{name}': ")
    assert named in message


def test_a_generator_names_the_seed_it_was_given_when_flowvid_takes_it(pipe):
    with pytest.raises(TypeError, match=r"; for this generator, seed=7$"):
        pipe("a red circle", generator=torch.Generator().manual_seed(7))
    with pytest.raises(TypeError) as raised:  # beyond 32 bits: no seed flowvid takes
        pipe("a red circle", generator=torch.Generator().manual_seed(2**40))
    assert "for this generator" not in str(raised.value)


def test_a_diffusers_call_names_each_keyword_and_following_it_samples(pipe):
    with pytest.raises(TypeError) as raised:
        pipe(prompt="a red circle", guidance_scale=5.0, num_frames=8, generator=torch.Generator().manual_seed(0),
             num_videos_per_prompt=2)
    message = str(raised.value)
    assert message.startswith("VideoPipeline.__call__() got unexpected keyword arguments 'prompt': use prompts=")
    for advice in ("'guidance_scale': use guidance=", "'num_frames': use frames=", "'generator': use seed=",
                   "'num_videos_per_prompt': use videos_per_prompt="):
        assert advice in message
    pipe.sampler = SequentialSampler()
    try:
        out = pipe(prompts="a red circle", guidance=4.0, frames=8, seed=0, videos_per_prompt=2)
    finally:
        pipe.sampler = RefusingSampler()
    assert out.videos.shape[:2] == (2, 8) and out.videos.dtype == np.uint8
    assert out.seeds == [0, 1]


@pytest.mark.parametrize("name, value, named", [
    ("torch_dtype", torch.bfloat16, 'use precision="bf16-mixed"'),
    ("torch_dtype", torch.float32, 'use precision="32-true"'),
    ("torch_dtype", torch.float16, 'use precision= ("auto", "32-true" or "bf16-mixed"'),
    ("device_map", "auto", "use device="),
    ("scheduler", SequentialSampler(), "use sampler="),
    ("lora_scale", 0.5, "use lora_strength="),
    ("variant", "fp16", "weights="),
    ("cache_dir", "cache", "downloads nothing"),
    ("precison", "32-true", "did you mean precision=?"),
])
def test_loading_with_a_diffusers_keyword_names_flowvids_before_loading(tmp_path, name, value, named):
    missing = tmp_path / "no_such_model.safetensors"  # loading it would raise FileNotFoundError
    with pytest.raises(TypeError) as raised:
        VideoPipeline.from_pretrained(missing, **{name: value})
    assert str(raised.value).startswith(f"VideoPipeline.from_pretrained() got an unexpected keyword argument '{name}'")
    assert named in str(raised.value)


def test_moving_with_a_diffusers_keyword_names_flowvids(pipe):
    with pytest.raises(TypeError, match=r"^VideoPipeline.to\(\) got .* 'torch_dtype': use precision=\"bf16-mixed\""):
        pipe.to("cpu", torch_dtype=torch.bfloat16)
    assert pipe.precision == "32-true"


@pytest.mark.parametrize("name, named", [("prompt", "use caption="), ("prompts", "use caption="),
                                         ("generator", "use seed="), ("captoin", "did you mean caption=?")])
def test_scoring_with_a_callers_keyword_names_the_caption_or_seed(pipe, name, named):
    video = np.zeros((4, *pipe.model.video_shape[1:], 3), np.uint8)
    with pytest.raises(TypeError, match=rf"^VideoPipeline.score\(\) got an unexpected keyword argument '{name}': "
                                        rf"{re.escape(named)}"):
        pipe.score(video, **{name: "a red circle"})


@pytest.mark.parametrize("method", ["__call__", "stream", "score", "from_pretrained", "to"])
def test_a_slip_of_each_keyword_suggests_it_and_the_signature_still_shows_them(method):
    """``inspect`` and ``help()`` see the real parameters, and a doubled last letter of any of them is named."""
    function = getattr(VideoPipeline, method)
    parameters = [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]
    assert parameters and not any(parameter.kind is parameter.VAR_KEYWORD
                                  for parameter in inspect.signature(function).parameters.values())
    for name in parameters:
        with pytest.raises(TypeError, match=rf": did you mean {name}=\?$"):
            function(None, **{name + name[-1]: None})


class DivergingSampler(SequentialSampler):
    def sample(self, *args, **kwargs):
        return torch.full_like(super().sample(*args, **kwargs), float("nan"))


def test_a_warning_of_a_call_points_at_the_caller_past_the_keyword_check(pipe):
    pipe.sampler = DivergingSampler()
    try:
        with pytest.warns(UserWarning, match=r"came out NaN or infinite") as warned:
            pipe("a red circle", seed=0)
    finally:
        pipe.sampler = RefusingSampler()
    assert [record.filename for record in warned] == [__file__]


def test_a_keyword_far_from_any_lists_the_keywords(pipe):
    with pytest.raises(TypeError, match=r"'clip_skip': the keywords are prompts, task, image, video, frames, "
                                        r"guidance, negative_prompt, seed, batch_size, videos_per_prompt, denoise$"):
        pipe("a red circle", clip_skip=2)
