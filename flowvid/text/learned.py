"""A small text encoder learned together with the flow: the offline default for the demo."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from flowvid.caller_warnings import warn_caller
from flowvid.checks import is_count
from flowvid.fingerprint import json_fingerprint
from flowvid.nn.transformer import TransformerLayer
from flowvid.registry import TEXT_ENCODERS
from flowvid.text.base import TextEmbedding, TextEncoder
from flowvid.text.tokenizer import SHAPES_WORDS, WordTokenizer, split_words


@TEXT_ENCODERS.register("learned")
class LearnedTextEncoder(TextEncoder):
    """Word embeddings + learned positions + a small bidirectional transformer, trained with the model.

    The empty caption (no words at all) is one learned ``<null>`` token: the unconditional embedding
    is learned like any other, and every row has a real token, so attention over the text never
    meets an all-masked row. Padding is masked and zero.

    Args:
        width: D, the size of each token state.
        max_length: L, tokens per caption (longer captions are truncated and counted).
        depth: transformer layers.
        head_dim: channels per attention head (``width`` must be a multiple).
        vocabulary: the words it knows; default: the synthetic shapes captions. The prompt template's
            words, digits and punctuation are always included; other words become ``<unk>`` and are
            counted in ``unknown_count`` (the first ones met are named in a warning).
            ``flowvid data vocabulary DIR`` lists the words of a shard folder's captions.
    """

    trainable = True

    def __init__(
        self,
        width: int = 64,
        max_length: int = 48,
        depth: int = 2,
        head_dim: int = 16,
        vocabulary: Sequence | None = None,
    ):
        super().__init__()
        # A bare Sequence, its words checked here: jsonargparse checks a Sequence[str] word by word at a cost
        # that grows with the square of its length, minutes for a vocabulary of a few thousand words.
        if isinstance(vocabulary, str):
            raise ValueError(f"LearnedTextEncoder vocabulary must be a list of words, got the string {vocabulary[:40]!r}")
        not_words = [word for word in vocabulary or () if not isinstance(word, str)]
        if not_words:
            raise ValueError(f"LearnedTextEncoder vocabulary entries must be strings, got {not_words[0]!r}")
        for name, value in (("width", width), ("max_length", max_length), ("depth", depth), ("head_dim", head_dim)):
            if not is_count(value) or value < 1:
                raise ValueError(f"LearnedTextEncoder {name} must be an integer >= 1, got {value!r}")
        if head_dim % 2:
            raise ValueError(f"LearnedTextEncoder head_dim must be even (rotary pairs), got {head_dim}")
        self.width = width
        self.max_length = max_length
        self.tokenizer = WordTokenizer(SHAPES_WORDS if vocabulary is None else vocabulary)
        self.unknown_count = 0
        # Set where the weights come from an export (InitFromExport): fine-tuning cannot change the vocabulary.
        self.vocabulary_fixed = False
        self.embed = nn.Embedding(len(self.tokenizer), width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        # Positions are learned, so the layers' rotary embedding is the identity rotation.
        self.register_buffer("no_rotation", torch.zeros(max_length, head_dim // 2), persistent=False)

    def identity(self) -> dict[str, str]:
        """Name and sizes, plus what the trained weights cannot tell apart: the vocabulary (another one
        of the same size loads the same weights and maps words to other ids) and the layers' shape."""
        return {**super().identity(), "depth": str(len(self.layers)), "head_dim": str(self.no_rotation.shape[1] * 2),
                "vocabulary_sha256": json_fingerprint(self.tokenizer.vocabulary)}

    def record_unknown(self, captions: Sequence[str], count: int) -> None:
        """Add the ``count`` unknown words of ``captions`` to ``unknown_count``, warning the first time only,
        with their names: a model trained on captions it cannot read learns to ignore them, and a prompt of
        words a trained model never learned says less than it seems. In training mode the warning says how to
        make them known, unless it is fine-tuned from an export (``vocabulary_fixed``); otherwise (sampling,
        validation) the vocabulary came with the weights and is fixed."""
        if count and not self.unknown_count:
            unknown = sorted({word for caption in captions for word in split_words(caption)
                              if word not in self.tokenizer.ids})
            named = ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
            # The words, not their occurrences: the count is read next to the names it lists.
            warn_caller(f"{type(self).__name__}: {self._unknown_words_said(len(unknown), named)}")
        self.unknown_count += count

    def _unknown_words_said(self, count: int, named: str) -> str:
        if self.training and self.vocabulary_fixed:
            return (f"{count} word(s) unknown to its vocabulary became <unk> ({named}); later ones are only counted "
                    "(unknown_count). Its vocabulary came with the exported weights and cannot change when "
                    "fine-tuning: these words stay <unk> (a model trained from scratch learns them)")
        if self.training:
            return (f"{count} word(s) unknown to its vocabulary became <unk> ({named}); later ones are only counted "
                    "(unknown_count). Give it the words of the captions as its vocabulary "
                    "(`flowvid data vocabulary DIR` lists those of a shard folder)")
        return (f"the model never learned {count} word(s) of the text it was given ({named}): they read as <unk>, "
                "so the text says less than it seems; later ones are only counted (unknown_count). Its vocabulary "
                "came with its weights: use words of its training captions")

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        ids, mask, truncated, unknown = self.tokenizer(captions, self.max_length)
        self.record_truncation(truncated)
        self.record_unknown(captions, unknown)
        ids, mask = ids.to(self.embed.weight.device), mask.to(self.embed.weight.device)
        h = self.embed(ids) + self.position
        may_attend = mask[:, None, None, :]  # every query sees the caption's real tokens
        angles = self.no_rotation
        for layer in self.layers:
            h = layer(h, angles.cos(), angles.sin(), may_attend)
        return TextEmbedding(self.norm(h) * mask[..., None], mask)
