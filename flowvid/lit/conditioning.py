"""How a training batch is turned into a task: captions dropped for guidance, extension, video-to-video.

One model serves every task because the flow is frame-causal:

* text-to-video: the caption alone;
* image-to-video: nothing to do in training. Every frame is already modelled given the earlier ones,
  so at sampling time the encoded image is the first latent frame and the sampler continues from it;
* extension: the first latent frame is dropped and the caption gets ``"(extend) "``, so the model
  also learns to start from a frame in the middle of a clip;
* video-to-video: the source clip's latents come first and the target's after them, in one
  sequence, and the caption gets ``"(v2v) "``.

A task prefix belongs to the task, not to the caption: classifier-free guidance drops the caption
and keeps the prefix, so the unconditional branch of a guided sampler is ``prefix + ""``.
"""

from __future__ import annotations

import torch

from flowvid.text.template import TASK_PREFIXES

EXTEND_PREFIX = TASK_PREFIXES["extend"]
V2V_PREFIX = TASK_PREFIXES["v2v"]


def drop_captions(captions: list[str], probability: float) -> tuple[list[str], torch.Tensor]:
    """Replace each caption by ``""`` with ``probability``; also return the (B,) mask of kept ones."""
    keep = torch.rand(len(captions)) >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist())], keep


def add_prefix(captions: list[str], prefix: str) -> list[str]:
    return [prefix + caption for caption in captions]


def chance(probability: float) -> bool:
    """True with ``probability`` (from torch's seeded generator, so a seeded run repeats itself)."""
    return probability > 0 and bool(torch.rand(()) < probability)
