"""Transformer parts: attention with causal/frame masks and a KV cache, 3-D RoPE, MLPs."""

from flowvid.nn.attention import (
    Attention, BandedMask, banded_attention, frame_window_mask, prefix_causal_bands, prefix_causal_mask,
)
from flowvid.nn.kv_cache import KVCache
from flowvid.nn.mlp import MLP, SwiGLU
from flowvid.nn.rope import apply_rope, rope_angles, rope_pair_split
from flowvid.nn.transformer import TransformerLayer

__all__ = [
    "Attention", "BandedMask", "KVCache", "MLP", "SwiGLU", "TransformerLayer", "apply_rope", "banded_attention",
    "frame_window_mask", "prefix_causal_bands", "prefix_causal_mask", "rope_angles", "rope_pair_split",
]
