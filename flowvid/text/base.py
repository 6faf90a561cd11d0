"""The TextEncoder contract: captions -> token states and a padding mask for the deep block."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from flowvid.caller_warnings import warn_caller

#: The dtype shards cache a frozen encoder's states in. ``encode`` rounds a frozen encoder's states to it,
#: so that a caption embeds alike from a cache and when computed (training without a cache, sampling).
CACHE_DTYPE = torch.float16


class TextEmbedding(NamedTuple):
    """Token states ``(B, L, D)`` and a boolean mask ``(B, L)`` that is True on real tokens."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, int) and index in (0, 1):
            return tuple.__getitem__(self, index)
        return TextEmbedding(self.tokens[index], self.mask[index])

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        return TextEmbedding(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


class TextEncoder(nn.Module, ABC):
    """Encodes a batch of captions. The empty string means "unconditional".

    ``width`` is D, the size of each token state; ``max_length`` is L. Padding positions carry zeros
    in ``tokens`` and False in ``mask``. Over-long captions are truncated and counted in
    ``truncated_count``. ``encode`` rounds a frozen encoder's states to ``CACHE_DTYPE``.
    """

    width: int
    max_length: int
    #: True when the encoder learns with the model; a frozen one's embeddings can be cached in shards.
    trainable: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.truncated_count = 0

    @classmethod
    def check_files(cls, **init_args: Any) -> None:
        """As ``LatentCodec.check_files``: raise FileNotFoundError, naming the file and how to get it,
        when a file the constructor with ``init_args`` would read is missing. Default: nothing to read."""

    @abstractmethod
    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        ...

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        embedding = self(check_captions(captions))
        if self.trainable:  # never cached: its states change as it trains
            return embedding
        return TextEmbedding(round_as_cached(embedding.tokens), embedding.mask)

    def record_truncation(self, count: int) -> None:
        """Add ``count`` truncated captions to ``truncated_count``, warning the first time only."""
        if count and not self.truncated_count:
            warn_caller(f"{type(self).__name__}: {count} caption(s) longer than {self.max_length} tokens "
                        f"were truncated; later truncations are only counted (truncated_count)")
        self.truncated_count += count

    def identity(self) -> dict[str, str]:
        """The registered name (the one the class's own package gives it, whatever else is installed), the
        package that defines the class, ``width`` and ``max_length``, as strings."""
        from flowvid.registry import TEXT_ENCODERS, load_plugins, with_package

        load_plugins()  # plugins register their names on first use
        return with_package({"name": TEXT_ENCODERS.name_of(type(self)) or type(self).__name__,
                             "width": str(self.width), "max_length": str(self.max_length)}, type(self))


def round_as_cached(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` rounded to ``CACHE_DTYPE`` and back to their own dtype: the values a cache holds.
    Values beyond its range (65504) become inf, which the flow refuses and a cache skips."""
    return tokens.to(CACHE_DTYPE).to(tokens.dtype)


def check_captions(captions: Sequence[str]) -> list[str]:
    """``captions`` as a list, or a ValueError for a single string (a sequence too: it would be read as one
    caption per character) or an entry that is not a string."""
    if isinstance(captions, str):
        raise ValueError(f"expected a list of captions, got the string {captions[:40]!r}; pass [caption]")
    if not isinstance(captions, Iterable):
        raise ValueError(f"expected a list of captions, got {type(captions).__name__} {repr(captions)[:40]}; "
                         "pass [caption]")
    captions = list(captions)
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"caption {index} is {type(caption).__name__} {str(caption)[:40]!r}, not a string")
    return captions


def same_text_encoder(recorded: dict[str, str], current: dict[str, str]) -> bool:
    """Whether a recorded text-encoder identity is the current one, compared on the keys both have: an
    identity recorded before a key was added (a run or shards of an earlier version) still matches."""
    shared = recorded.keys() & current.keys()
    return "name" in shared and all(recorded[key] == current[key] for key in shared)
