"""Pre-computed text embeddings for shards (``text.npy`` / ``textmask.npy`` per sample).

A frozen encoder gives the same states for a caption every time, so they can be computed once when
the latent shards are written instead of at every training step. A learned encoder cannot be cached:
its states change as it trains.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from flowvid.text.base import CACHE_DTYPE, TextEmbedding, TextEncoder


@torch.no_grad()
def cache_embeddings(
    encoder: TextEncoder, captions: Sequence[str], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``captions`` into float16 (``CACHE_DTYPE``) token states ``(N, L, D)`` and a bool mask
    ``(N, L)``: the very states ``encoder.encode`` gives when training or sampling, which rounds them alike.

    Padding positions are zero in the states and False in the mask.
    """
    if encoder.trainable:
        raise ValueError(f"{type(encoder).__name__} is trained with the model, so its embeddings cannot be "
                         f"cached; cache only frozen encoders (trainable = False)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens, masks = [], []
    for start in range(0, len(captions), batch_size):
        embedding = encoder.encode(captions[start:start + batch_size])
        tokens.append(embedding.tokens.to(CACHE_DTYPE).cpu().numpy())
        masks.append(embedding.mask.bool().cpu().numpy())
    if not tokens:
        return (np.zeros((0, encoder.max_length, encoder.width), np.float16),
                np.zeros((0, encoder.max_length), bool))
    return np.concatenate(tokens), np.concatenate(masks)


def embedding_from_cache(tokens: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> TextEmbedding:
    """Cached arrays (a batch ``(B, L, D)`` and ``(B, L)``) back to a float32 ``TextEmbedding``."""
    tokens, mask = torch.as_tensor(tokens), torch.as_tensor(mask)
    if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
        raise ValueError(f"expected cached tokens (B, L, D) and mask (B, L), "
                         f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
    return TextEmbedding(tokens.float(), mask.bool())
