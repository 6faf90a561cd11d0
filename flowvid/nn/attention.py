"""Multi-head self-attention on ``scaled_dot_product_attention``, with the masks the flows need."""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flowvid.nn.kv_cache import KVCache
from flowvid.nn.rope import rope_rotation, rotate_pairs

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch before 2.5: GPUs run masked attention in chunks too
    flex_attention = create_block_mask = None


class QKNorm(nn.RMSNorm):
    """RMSNorm of queries or keys in their own dtype: under bf16 autocast they arrive in bf16, and with an
    fp32 gain ``rms_norm`` skips its fused kernel and warns (either way it accumulates in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Fused-QKV attention with rotary embeddings and an optional KV cache.

    ``cos``/``sin`` hold one rotation per query position (the keys of earlier positions were
    rotated when they were written to the cache).
    """

    def __init__(self, width: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
        self.heads = width // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.q_norm = QKNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(head_dim) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BandedMask | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``mask`` is a boolean (B or 1, 1, Q, K) "may attend" mask, or a ``BandedMask`` (without a cache).

        Without a cache, None means causal; with a cache, None means every cached key is visible
        (a single query at the newest position).
        """
        batch, length, _ = x.shape
        # unbind, not three selects: its backward stacks the three gradients in one tensor instead of
        # zero-filling and summing three full-size ones.
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        rotation = rope_rotation(cos, sin)[:, None]  # (N, 1, D/2[, 2]): the same for every head
        # Rotated q and k come out as (B, N, H, D); transposed to (B, H, N, D) they are views, which
        # is the layout the attention kernels read anyway.
        q = rotate_pairs(self.q_norm(q), rotation).transpose(1, 2)
        k = rotate_pairs(self.k_norm(k), rotation).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if mask is None and cache is None:
            out = attention(q, k, v, causal=True)
        elif cache is None:
            out = banded_attention(q, k, v, mask)
        else:
            out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).flatten(2))


#: On a CPU, the backward pass of the bf16 attention kernel is slower than the fp32 one over short runs
#: of keys (1.3-3.6x at 16 to 128 keys, even with the casts; about equal at 192, faster from 272-384 on,
#: benchmarks/attention_kernels.py): bf16 attention over fewer keys than this runs in fp32 there.
CPU_BF16_MIN_KEYS = 192


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention``; bf16 inputs with few keys are computed in fp32 on a CPU."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] < CPU_BF16_MIN_KEYS:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


#: Queries per chunk of ``banded_attention``: small enough that a causal mask's chunks skip about half
#: of the products, large enough that the kernels stay efficient (measured on CPU, 272 to 2080 tokens).
QUERY_CHUNK = 192
#: Chunks are used only when they skip at least this share of the query x key products.
MIN_SKIPPED_SHARE = 0.1


class BandedMask(NamedTuple):
    """A "may attend" mask with the chunks ``banded_attention`` computes for it, known from how the mask
    was built (``prefix_causal_bands``) instead of read from its values, which torch.compile cannot do
    without breaking the graph."""

    allowed: torch.Tensor
    bands: list[tuple[int, int, int, int]] | None


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | BandedMask) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask)``, computing only the keys queries may see.

    Attention kernels given an explicit mask compute every query x key product, even where the mask
    hides a whole band of keys (the future of a causal sequence behind a text prefix, the frames
    outside a window). On a CPU the queries go in chunks, each over the run of keys its rows can see:
    for a long causal sequence about half of the products. On a GPU, where many small kernel calls cost
    more than the products they skip, it is one block-sparse kernel call (``block_sparse_attention``).
    ``mask`` is boolean, (B or 1, H or 1, Q, K), or a ``BandedMask``. A plain mask's chunks are read from
    its values, except under torch.compile, where it is one masked call.
    """
    allowed = mask.allowed if isinstance(mask, BandedMask) else mask
    if use_block_sparse(q, allowed):
        return block_sparse_attention(q, k, v, allowed)
    bands = mask.bands if isinstance(mask, BandedMask) else attention_bands(mask)
    if bands is None:
        return attention(q, k, v, allowed)
    chunks = [
        attention(q[..., first:last, :], k[..., lo:hi, :], v[..., lo:hi, :], allowed[..., first:last, lo:hi])
        for first, last, lo, hi in bands
    ]
    return torch.cat(chunks, dim=-2)


def use_block_sparse(q: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``banded_attention`` makes one block-sparse call: on GPUs, in eager code (compiled code
    makes one masked call), for masks shared by every head, where torch has FlexAttention (2.5 on)."""
    return (q.device.type == "cuda" and flex_attention is not None and mask.shape[1] == 1
            and not torch.compiler.is_compiling())


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention in one FlexAttention call that skips the blocks of keys ``mask`` hides entirely
    (``mask``: boolean, (B or 1, 1, Q, K)). Its kernels are compiled for the first shape it sees, and
    once more, for any shape, when a second one comes."""
    return _compiled_flex_attention()(q, k, v, block_mask=_block_mask_of(mask))


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is fast only compiled; uncompiled it computes and stores every product.
    return torch.compile(flex_attention)


class _LastMask:
    """A value worked out from a mask, kept for the mask it was worked out from: every layer of a block
    gets the same mask in one forward pass. (Inference tensors have no version counter, so a mask made
    under inference mode is not kept.)"""

    def __init__(self, work_out: Callable[[torch.Tensor], Any]):
        self.work_out = work_out
        self.last: tuple[weakref.ref, int, object] | None = None

    def __call__(self, mask: torch.Tensor) -> Any:
        if mask.is_inference():
            return self.work_out(mask)
        if self.last is None or self.last[0]() is not mask or self.last[1] != mask._version:
            self.last = (weakref.ref(mask), mask._version, self.work_out(mask))
        return self.last[2]


def _block_mask(mask: torch.Tensor):
    batch, _, num_queries, num_keys = mask.shape
    if batch == 1:  # one mask for the whole batch: FlexAttention still asks for every sample's index
        shared = mask[0, 0]

        def may_attend(b, h, query, key):
            return shared[query, key]
    else:
        per_sample = mask[:, 0]

        def may_attend(b, h, query, key):
            return per_sample[b, query, key]
    return create_block_mask(may_attend, B=None if batch == 1 else batch, H=None, Q_LEN=num_queries,
                             KV_LEN=num_keys, device=mask.device)


_block_mask_of = _LastMask(_block_mask)


def attention_bands(mask: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """The chunks ``banded_attention`` computes for ``mask``: (first query, end query, first key, end
    key) each, or None when chunks would not skip enough of the products to pay."""
    if torch.compiler.is_compiling():  # reading the mask's values would break the graph
        return None
    return _bands_of(mask)


def _bands(mask: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    num_queries, num_keys = mask.shape[-2:]
    if num_queries <= QUERY_CHUNK:
        return None
    visible = mask.flatten(0, -3).any(0)  # (Q, K): keys some sample or head may see
    columns = torch.arange(num_keys, device=mask.device)
    lo = torch.where(visible, columns, num_keys).amin(1)
    hi = torch.where(visible, columns, -1).amax(1) + 1
    firsts, ends = _query_chunks(num_queries)
    key_lo = torch.stack([lo[a:b].min() for a, b in zip(firsts, ends)]).tolist()
    key_hi = torch.stack([hi[a:b].max() for a, b in zip(firsts, ends)]).tolist()
    return _worth_it(list(zip(firsts, ends, key_lo, key_hi)), num_queries, num_keys)


_bands_of = _LastMask(_bands)


def prefix_causal_bands(num_queries: int, first_query: int, num_keys: int,
                        prefix: int) -> list[tuple[int, int, int, int]] | None:
    """The chunks of a ``prefix_causal_mask`` of this shape and ``prefix`` text positions, whatever its
    text padding: a chunk of queries sees at most the keys up to its last query, none after, and the
    whole text prefix (text queries read every text key, even those after their own position)."""
    if num_queries <= QUERY_CHUNK:
        return None
    firsts, ends = _query_chunks(num_queries)
    bands = [(first, end, 0, min(num_keys, max(prefix, first_query + end))) for first, end in zip(firsts, ends)]
    return _worth_it(bands, num_queries, num_keys)


def _query_chunks(num_queries: int) -> tuple[list[int], list[int]]:
    count = math.ceil(num_queries / QUERY_CHUNK)
    bounds = [num_queries * index // count for index in range(count + 1)]
    return bounds[:-1], bounds[1:]


def _worth_it(bands: list[tuple[int, int, int, int]], num_queries: int,
              num_keys: int) -> list[tuple[int, int, int, int]] | None:
    computed = sum((b - a) * (h - l) for a, b, l, h in bands)
    return None if computed > (1 - MIN_SKIPPED_SHARE) * num_queries * num_keys else bands


#: Masks up to this many entries are kept for reuse (training reuses one shape every step, Jacobi
#: re-evaluates a block of slots several times); larger ones are rebuilt on every call.
MAX_CACHED_MASK_ENTRIES = 1 << 22


def prefix_causal_mask(
    num_queries: int,
    first_query: int,
    num_keys: int,
    prefix_valid: torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """"May attend" mask for a sequence ``[prefix ; tokens]`` with causal tokens.

    Positions ``[0, P)`` are the prefix (text), ``P = prefix_valid.shape[1]``; queries are positions
    ``[first_query, first_query + num_queries)``. Prefix queries see the valid prefix and themselves
    (so a fully padded caption never gives an empty row); token queries see the valid prefix and
    every token position up to their own. The mask lives on ``prefix_valid``'s device, or on
    ``device``, which a call without a prefix must give (a default would put it on the CPU, and attention
    on a GPU would fail). The result may be shared between calls: do not modify it.
    """
    prefix = 0 if prefix_valid is None else prefix_valid.shape[1]
    if prefix_valid is not None:
        device = prefix_valid.device
    elif device is None:
        raise ValueError("prefix_causal_mask without a prefix (prefix_valid=None) needs the device of the mask")
    # (Compiled code builds the mask in its graph, where a cache would only be traced through.)
    if num_queries * num_keys <= MAX_CACHED_MASK_ENTRIES and not torch.compiler.is_compiling():
        allowed = _cached_text_independent_part(num_queries, first_query, num_keys, prefix, device,
                                                torch.is_inference_mode_enabled())
    else:
        allowed = _text_independent_part(num_queries, first_query, num_keys, prefix, device)
    if prefix == 0:
        return allowed[None, None]
    # Valid prefix keys are visible to every query; the rest of the mask does not depend on the text.
    valid_keys = F.pad(prefix_valid.bool(), (0, num_keys - prefix))
    return (allowed[None] | valid_keys[:, None, :])[:, None]


def _text_independent_part(num_queries: int, first_query: int, num_keys: int, prefix: int,
                           device: torch.device | None) -> torch.Tensor:
    """(Q, K): token queries see earlier and equal token positions, prefix queries only themselves."""
    query_pos = torch.arange(first_query, first_query + num_queries, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    causal_tokens = (key_pos <= query_pos) & (key_pos >= prefix) & (query_pos >= prefix)
    return causal_tokens | (key_pos == query_pos)


@functools.lru_cache(maxsize=32)
def _cached_text_independent_part(num_queries: int, first_query: int, num_keys: int, prefix: int,
                                  device: torch.device | None, inference: bool) -> torch.Tensor:
    """``_text_independent_part``, kept apart for inference mode: a mask made there is an inference
    tensor, which autograd cannot save for the backward pass of a later step with gradients."""
    return _text_independent_part(num_queries, first_query, num_keys, prefix, device)


def frame_window_mask(
    num_frames: int,
    tokens_per_frame: int,
    past_frames: int | None = None,
    future_frames: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Bidirectional inside a frame; frame n sees frames ``[n - past_frames, n + future_frames]``.

    ``past_frames=None`` means all earlier frames. Shape (1, 1, T*F, T*F).
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    delta = frame[None, :] - frame[:, None]  # key frame minus query frame
    allowed = delta <= future_frames
    if past_frames is not None:
        allowed &= delta >= -past_frames
    return allowed[None, None]
