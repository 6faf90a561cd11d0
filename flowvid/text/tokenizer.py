"""A word-level tokenizer over a fixed vocabulary, for the learned text encoder.

Text is NFKC-normalised, lower-cased and split into words (runs of letters, accented ones included),
single digits and single punctuation marks; whitespace separates and is dropped. Normalising first
makes text that looks the same tokenize the same: "café" written with a combining accent (as macOS
file names hold it) is the word "café", full-width "ＲＥＤ" is "red". Numbers are spelled digit by
digit, so the prompt template's "Noise Level 500" or "16:9" needs no number words. Words outside
the vocabulary become ``<unk>`` and are counted.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

import torch

PAD, UNK, NULL = "<pad>", "<unk>", "<null>"
#: Token ids 0, 1, 2 in every vocabulary.
SPECIAL_TOKENS = (PAD, UNK, NULL)

# A letter is a word character that is neither a digit nor "_"; any other non-space character is one piece.
_PIECE = re.compile(r"[^\W\d_]+|[0-9]|\S")

DIGITS = tuple("0123456789")
PUNCTUATION = tuple(":().,;!?'\"-/")
#: The words of ``flowvid.text.template.build_prompt``'s metadata and task prefixes.
TEMPLATE_WORDS = ("noise", "level", "a", "an", "video", "image", "with", "fps", "in", "aspect", "ratio",
                  "extend", "v", "last")
#: The words of the synthetic shapes captions ("a red circle moves left and a blue square moves up").
SHAPES_WORDS = (
    "a", "and", "moves",
    "circle", "square", "triangle",
    "red", "green", "blue", "yellow", "magenta", "cyan",
    "left", "right", "up", "down",
)


def split_words(text: str) -> list[str]:
    """"Noise Level 16:9" -> ["noise", "level", "1", "6", ":", "9"]."""
    return _PIECE.findall(unicodedata.normalize("NFKC", text).lower())


class WordTokenizer:
    """Maps text to ids over ``SPECIAL_TOKENS + digits + punctuation + template words + words``.

    Id order is fixed by sorting, so the same word list always gives the same ids.
    """

    def __init__(self, words: Iterable[str]):
        words = [unicodedata.normalize("NFKC", w).lower() for w in words]
        for word in words:
            if split_words(word) != [word]:
                raise ValueError(f"vocabulary entries must be single words, digits or punctuation marks, got {word!r}")
        pieces = sorted(set(DIGITS) | set(PUNCTUATION) | set(TEMPLATE_WORDS) | set(words))
        self.vocabulary: tuple[str, ...] = (*SPECIAL_TOKENS, *pieces)
        self.ids = {piece: index for index, piece in enumerate(self.vocabulary)}
        self.pad_id, self.unk_id, self.null_id = (self.ids[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __call__(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Token ids ``(B, max_length)``, mask ``(B, max_length)``, and the numbers of truncated captions
        and of unknown words.

        A caption without any word (the empty string) becomes the single ``<null>`` token, so every
        row has at least one real token.
        """
        ids = torch.full((len(captions), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(captions), max_length, dtype=torch.bool)
        truncated = unknown = 0
        for row, caption in enumerate(captions):
            pieces = split_words(caption)
            tokens = [self.ids.get(piece, self.unk_id) for piece in pieces] or [self.null_id]
            unknown += sum(piece not in self.ids for piece in pieces)
            if len(tokens) > max_length:
                truncated += 1
                tokens = tokens[:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask, truncated, unknown
