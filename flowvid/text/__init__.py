"""Text encoders: captions -> token states and a padding mask for the deep block.

Importing this package registers the built-in ``learned`` encoder in ``TEXT_ENCODERS``.
"""

from flowvid.text.base import TextEmbedding, TextEncoder
from flowvid.text.cache import cache_embeddings, embedding_from_cache
from flowvid.text.learned import LearnedTextEncoder
from flowvid.text.template import TASK_PREFIXES, build_prompt
from flowvid.text.tokenizer import WordTokenizer

__all__ = [
    "LearnedTextEncoder",
    "TASK_PREFIXES",
    "TextEmbedding",
    "TextEncoder",
    "WordTokenizer",
    "build_prompt",
    "cache_embeddings",
    "embedding_from_cache",
]
