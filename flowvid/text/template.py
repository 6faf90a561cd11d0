"""The prompt the text encoder sees: the caption wrapped in metadata prefixes.

The layout follows the STARFlow-V training prompt::

    Noise Level 500:
    A video with 16 fps:
    (extend) a red circle moves left

     in a 16:9 aspect ratio.

In that training, classifier-free-guidance dropout replaced only the caption with "" and kept the
metadata, so the unconditional prompt still said how noisy, how fast and how wide the video is.
flowvid's training and samplers do not apply this template (they encode the caption after its task
prefix, and dropout keeps the prefix alone): it is here for prompts to models trained on it.
"""

from __future__ import annotations

import math

#: Caption prefixes that name a task other than plain text-to-video.
TASK_PREFIXES = {"t2v": "", "i2v": "", "extend": "(extend) ", "v2v": "(v2v) ", "last": "(last) "}


def format_aspect_ratio(aspect_ratio: str | tuple[int, int]) -> str:
    """"16:9" stays as given; ``(width, height)`` in pixels becomes "W:H" in lowest terms."""
    if isinstance(aspect_ratio, str):
        return aspect_ratio
    width, height = aspect_ratio
    if width < 1 or height < 1:
        raise ValueError(f"aspect ratio needs a positive width and height, got {aspect_ratio}")
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def build_prompt(
    caption: str,
    fps: float | None = None,
    noise_level: float | None = None,
    aspect_ratio: str | tuple[int, int] | None = None,
    task_prefix: str = "",
) -> str:
    """Wrap ``caption`` in the metadata the model is conditioned on.

    Args:
        caption: what the video shows ("" for the unconditional branch of guidance).
        fps: frame rate; ``None`` describes a still image ("An image:").
        noise_level: the noise augmentation sigma, written as ``int(sigma * 1000)``; ``None`` omits it.
        aspect_ratio: "16:9" or ``(width, height)``; ``None`` omits it.
        task_prefix: put before the caption, e.g. ``TASK_PREFIXES["extend"]``.
    """
    parts = []
    if noise_level is not None:
        parts.append(f"Noise Level {int(noise_level * 1000)}:\n")
    if fps is None:
        parts.append(f"An image:\n{task_prefix}{caption}\n")
    else:
        rate = int(fps) if float(fps).is_integer() else fps
        parts.append(f"A video with {rate} fps:\n{task_prefix}{caption}\n")
    if aspect_ratio is not None:
        parts.append(f"\n in a {format_aspect_ratio(aspect_ratio)} aspect ratio.\n")
    return "".join(parts)
