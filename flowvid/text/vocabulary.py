"""The words of captions, as the learned text encoder's tokenizer splits them: the vocabulary they need,
and how much of them a vocabulary leaves unknown."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from flowvid.text.tokenizer import DIGITS, PUNCTUATION, TEMPLATE_WORDS, WordTokenizer, split_words

#: Pieces every vocabulary holds whatever words it is given.
ALWAYS_KNOWN = frozenset((*DIGITS, *PUNCTUATION, *TEMPLATE_WORDS))
#: More than this share of the caption words unknown refuses a fresh run. A vocabulary written for the
#: captions leaves none unknown, and one that leaves out their rare words (``--min-count``) a few in a
#: hundred; a vocabulary written for other captions (the shapes default, the empty list) leaves most of
#: them unknown, as only the template's "a", "in", "with" and the like are known. Above half, most
#: captions differ from each other mainly in <unk> tokens, which the model cannot tell apart.
REFUSED_UNKNOWN_SHARE = 0.5


def caption_words(captions: Iterable[str]) -> Counter[str]:
    """How often each word of ``captions`` occurs, split as the tokenizer splits them; digits and punctuation
    marks, which the tokenizer spells one by one, are not words here."""
    return Counter(piece for caption in captions for piece in split_words(caption)
                   if piece not in DIGITS and piece not in PUNCTUATION)


def vocabulary_of(words: Counter[str], min_count: int = 1) -> list[str]:
    """The sorted words among ``words`` that occur at least ``min_count`` times, without those every vocabulary
    holds: the ``vocabulary`` that makes them known to the learned text encoder."""
    return sorted(word for word, count in words.items() if count >= min_count and word not in ALWAYS_KNOWN)


@dataclass(frozen=True)
class Coverage:
    """How many word occurrences some captions hold, and which of them a vocabulary does not know."""

    words: int
    unknown: Counter[str]

    @property
    def unknown_share(self) -> float:
        return sum(self.unknown.values()) / self.words if self.words else 0.0

    def unknown_percent(self) -> str:
        """``"92%"``; ``"under 1%"`` rather than a share rounded to none."""
        return f"{self.unknown_share:.0%}" if self.unknown_share >= 0.01 else "under 1%"

    def most_frequent_unknown(self, count: int = 5) -> str:
        """``'dog', 'runs', 'the'``: the ``count`` unknown words met most often."""
        return ", ".join(repr(word) for word, _ in self.unknown.most_common(count))


def coverage(tokenizer: WordTokenizer, captions: Iterable[str]) -> Coverage:
    words = caption_words(captions)
    unknown = Counter({word: count for word, count in words.items() if word not in tokenizer.ids})
    return Coverage(sum(words.values()), unknown)
