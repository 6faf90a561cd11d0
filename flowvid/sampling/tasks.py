"""Generation tasks: how each builds its caption, its prefix frames, its noise and its text.

=========  ==============================  ==========================================
task       prefix (known latent frames)    caption the model sees
=========  ==============================  ==========================================
t2v        none                            the caption
i2v        the image's latent frame        the caption
extend     the clip to continue            ``"(extend) " + caption``
v2v        the source clip                 ``"(v2v) " + caption``
=========  ==============================  ==========================================

Image-to-video needs no mechanism of its own: the image is the first latent frame, encoded into the
deep block's cache, and sampling continues from frame 1. ``extend`` marks clips that do not start at
a first frame (a causal video codec encodes first frames differently); ``v2v`` puts the source before
the target in one sequence. The task prefix belongs to the task, not to the caption: guidance dropout
in training removes the caption and keeps the prefix, so the unconditional caption of a task is
``task_caption(task, "")``. Training (``flowvid.lit.conditioning``) and ``task_caption`` both take the
prefixes from ``TASK_PREFIXES``, so the prefixes the model learns are the ones it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flowvid.checks import is_integer
from flowvid.sampling.base import GuidedText, TextInput
from flowvid.text.template import TASK_PREFIXES

TASKS = ("t2v", "i2v", "extend", "v2v")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def task_caption(task: str, caption: str) -> str:
    """The caption for ``task``: ``task_caption("extend", "a red circle moves left")`` is
    ``"(extend) a red circle moves left"``; ``task_caption(task, "")`` is the task's unconditional caption."""
    _check_task(task)
    return TASK_PREFIXES[task] + caption


@dataclass(frozen=True)
class TaskInputs:
    """What a sampler needs for one task: captions with their task prefix, the unconditional (or
    negative) caption, the prefix frames and the noise of the whole video (``z[:, :P]`` is ignored where a
    prefix is given)."""

    captions: list[str]
    uncond_caption: str
    prefix: torch.Tensor | None
    z: torch.Tensor


#: Seeds run from 0 to 2**32 - 1: torch's CPU generator keeps only the low 32 bits of a seed, so seed
#: ``s + 2**32`` (or a negative one) would draw the very noise of another seed.
SEED_LIMIT = 2**32


def check_seed(seed: int, count: int = 1, name: str = "seed") -> None:
    """A ValueError, before any work, unless the seeds ``seed, ..., seed + count - 1`` are distinct seeds
    of torch's generator; ``name`` is what the caller called the seed (``--seed`` on a command line)."""
    if not is_integer(seed) or not 0 <= seed <= SEED_LIMIT - count:
        raise ValueError(f"{name} must be an integer from 0 to {SEED_LIMIT - count:,} for {count} sample"
                         f"{'' if count == 1 else 's'} (torch's generator keeps 32 bits of a seed), got {seed!r}")


def initial_noise(shape: Sequence[int], seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed``: the same seed gives the same video on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device)


def task_inputs(task: str, captions: Sequence[str], frames: int, latent_shape: Sequence[int], seed: int,
                source: torch.Tensor | None = None, noise_std: float = 0.0,
                device: torch.device | str | None = None, negative_caption: str = "") -> TaskInputs:
    """Build the inputs of ``task`` for a video of ``frames`` latent frames of ``latent_shape`` (h, w, c).

    Args:
        source: known latent frames (B, P, h, w, c): the image (P = 1) for ``i2v``, the clip to
            continue for ``extend``, the source clip for ``v2v``; None for ``t2v``.
        noise_std: the noise-augmentation level the flow was trained at; the same noise is added to
            the prefix, so that it looks like the noisy latents the model saw.
        seed: fixes the sampling noise and the prefix's augmentation noise.
        negative_caption: what guidance steers away from: the unconditional branch reads it (with the
            task prefix) instead of the empty caption, like a negative prompt in diffusion pipelines.
    """
    _check_task(task)
    batch = len(captions)
    check_seed(seed)
    if task == "t2v" and source is not None:
        raise ValueError("t2v takes no source frames; use i2v, extend or v2v to condition on frames")
    if task != "t2v":
        if source is None:
            raise ValueError(f"{task} needs source latent frames (B, P, h, w, c)")
        if source.dim() != 5 or source.shape[0] != batch or tuple(source.shape[2:]) != tuple(latent_shape):
            expected = f"({batch}, P, {', '.join(map(str, latent_shape))})"
            raise ValueError(f"expected source latent frames of shape {expected}, got {tuple(source.shape)}")
        if task == "i2v" and source.shape[1] != 1:
            raise ValueError(f"i2v conditions on one image, i.e. one latent frame; got {source.shape[1]} frames")
        if source.shape[1] >= frames:
            raise ValueError(f"{task}: {source.shape[1]} source frames leave nothing to sample in {frames} frames")
    z = initial_noise((batch, frames, *latent_shape), seed, device)
    prefix = None
    if source is not None:
        prefix = source.float().to(device) + noise_std * initial_noise(source.shape, seed + 1, device)
    return TaskInputs([task_caption(task, c) for c in captions], task_caption(task, negative_caption), prefix, z)


@torch.no_grad()
def encode_text(text_encoder, captions: Sequence[str], guidance: float = 0.0, uncond_caption: str = "") -> TextInput:
    """The sampler's ``text``: the captions' embedding, and for guidance a ``GuidedText`` with the
    embedding of ``uncond_caption`` (``TaskInputs.uncond_caption``). No encoder means an unconditional
    model; guidance then is an error."""
    if text_encoder is None:
        if guidance > 0:
            raise ValueError(f"guidance={guidance} needs a text encoder for the unconditional text; "
                             "this model has none (use guidance=0)")
        return None
    cond = text_encoder.encode(list(captions))
    if guidance <= 0:
        return cond
    return GuidedText(cond, text_encoder.encode([uncond_caption]))


@torch.no_grad()
def sample_task(flow, sampler, inputs: TaskInputs, text_encoder=None, guidance: float = 0.0) -> torch.Tensor:
    """Latents (B, T, h, w, c) for ``inputs`` (from ``task_inputs``): encode the text, then sample.

    ``sampler.last_stats`` afterwards describes the run (iterations per block for Jacobi).
    """
    text = encode_text(text_encoder, inputs.captions, guidance, inputs.uncond_caption)
    return sampler.sample(flow, inputs.z, text, guidance, inputs.prefix)
