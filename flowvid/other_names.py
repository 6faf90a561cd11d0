"""Keywords of other libraries, diffusers' mostly, and what to give a flowvid call instead.

``other_names(table)`` decorates a method so that a keyword it does not take raises a TypeError that says
flowvid's name for it (or the parameter it is likely a slip for), before anything loads or samples.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

import torch


def seed_advice(generator: Any) -> str:
    """What to give instead of a ``generator``, with its seed when it has one flowvid takes."""
    advice = ("use seed= (an int): video i draws its noise from seed + i, so a video does not depend on the batch "
              "it is sampled in, which one generator shared by the batch could not give")
    if isinstance(generator, torch.Generator) and 0 <= generator.initial_seed() <= 2**32 - 1:
        advice += f"; for this generator, seed={generator.initial_seed()}"
    return advice


def precision_advice(dtype: Any) -> str:
    """What to give instead of a ``torch_dtype``: flowvid samples in fp32 or under bf16 autocast, no other."""
    named = {torch.float32: '"32-true"', torch.bfloat16: '"bf16-mixed"'}.get(dtype)
    if named is not None:
        return f"use precision={named}"
    return 'use precision= ("auto", "32-true" or "bf16-mixed"; flowvid samples in no other, fp16 included)'


NO_STEPS = ("no counterpart: a flow is inverted, not denoised in steps; the sampler's tol and max_iterations trade "
            "time for exactness (pipe.sampler = JacobiSampler(tol=..., max_iterations=...))")
FIXED_SIZE = ("no counterpart: the model's size is fixed (pipe.model.video_shape); an image or video file is "
              "resized to it")

#: Keywords of a diffusers text-, image- or video-to-video pipeline call, and flowvid's way to say them.
DIFFUSERS_CALL_NAMES: dict[str, str | Callable[[Any], str]] = {
    "prompt": "use prompts= (a caption or a list of them)",
    "num_frames": "use frames=",
    "guidance_scale": "use guidance=, the weight beyond the conditional: a diffusers scale s is guidance=s - 1 "
                      "(0 is off, as a scale of 1 is)",
    "generator": seed_advice,
    "num_videos_per_prompt": "use videos_per_prompt=",
    "num_inference_steps": NO_STEPS,
    "timesteps": NO_STEPS,
    "sigmas": NO_STEPS,
    "eta": "no counterpart: a flow's inverse has no steps to add noise in",
    "strength": "no counterpart: task=\"v2v\" transforms the given video as the model was trained to",
    "height": FIXED_SIZE,
    "width": FIXED_SIZE,
    "latents": "no counterpart: the noise is drawn from seed= (video i from seed + i)",
    "prompt_embeds": "no counterpart: give prompts=, which the model's text encoder encodes",
    "negative_prompt_embeds": "no counterpart: give negative_prompt=, which the model's text encoder encodes",
    "output_type": "no counterpart: the result holds both .videos (uint8 frames) and .latents",
    "return_dict": "no counterpart: the result is always a GeneratedVideos (.videos where diffusers has .frames)",
    "callback": "no counterpart: pipe.stream(...) yields each frame as soon as it is final",
    "callback_on_step_end": "no counterpart: pipe.stream(...) yields each frame as soon as it is final",
}

#: Keywords of diffusers' ``from_pretrained`` (and of a scheduler passed to it), and flowvid's way to say them.
DIFFUSERS_LOAD_NAMES: dict[str, str | Callable[[Any], str]] = {
    "pretrained_model_name_or_path": "use path= (or give it first)",
    "torch_dtype": precision_advice,
    "device_map": 'use device= ("auto", "cpu", "cuda" or "cuda:N"; the model is placed whole on one device)',
    "scheduler": "use sampler= (a Sampler instance, such as SequentialSampler())",
    "variant": 'no counterpart: weights= picks the "ema" or the "trained" weights of the file',
    "lora_scale": "use lora_strength= (with lora=, a file of adapters)",
    "use_safetensors": "no counterpart: the file's format is known from the file",
    **dict.fromkeys(("cache_dir", "revision", "token", "local_files_only", "force_download"),
                    "no counterpart: flowvid loads local files only and downloads nothing"),
}

#: Keywords of a diffusers pipeline's ``to``.
DIFFUSERS_MOVE_NAMES: dict[str, str | Callable[[Any], str]] = {
    "torch_device": "use device=",
    "torch_dtype": precision_advice,
    "dtype": precision_advice,
}

#: What users of a call (or of diffusers) may try to give ``score``.
SCORE_NAMES: dict[str, str | Callable[[Any], str]] = {
    "prompt": "use caption= (one caption, '' for none)",
    "prompts": "use caption= (one caption, '' for none)",
    "generator": "use seed= (an int), which fixes the pixel codec's dequantisation noise",
}


def other_names(known: dict[str, str | Callable[[Any], str]]):
    """Decorate a function so that a keyword it does not take raises a TypeError that says what to give
    instead: flowvid's name for a keyword of ``known`` (diffusers', mostly), else the closest parameter.
    The function keeps its signature and docstring for ``inspect`` and ``help()``."""

    def decorate(function):
        parameters = [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]
        assert not set(known) & set(parameters), "a name flowvid takes cannot be another library's"

        @functools.wraps(function)
        def checked(*args, **kwargs):
            unknown = [name for name in kwargs if name not in parameters]
            if unknown:
                raise TypeError(unknown_keywords_message(function.__qualname__, unknown, kwargs, known, parameters))
            return function(*args, **kwargs)

        return checked

    return decorate


def unknown_keywords_message(called: str, unknown: list[str], given: dict[str, Any],
                             known: dict[str, str | Callable[[Any], str]], parameters: list[str]) -> str:
    """One line naming each unknown keyword with what to give instead."""
    advice = [f"{name!r}: {keyword_advice(name, given[name], known, parameters)}" for name in unknown]
    if len(unknown) == 1:
        return f"{called}() got an unexpected keyword argument {advice[0]}"
    return f"{called}() got unexpected keyword arguments {'; '.join(advice)}"


def keyword_advice(name: str, value: Any, known: dict[str, str | Callable[[Any], str]], parameters: list[str]) -> str:
    """flowvid's way to say ``name``, the parameter it is likely a slip for, or the parameters there are."""
    advice = known.get(name)
    if advice is not None:
        return advice(value) if callable(advice) else advice
    close = difflib.get_close_matches(name, parameters, n=1)
    if close:
        return f"did you mean {close[0]}=?"
    return f"the keywords are {', '.join(parameters)}"
