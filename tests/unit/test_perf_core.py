"""The fast paths of the transformer parts compute exactly what the plain formulas say."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from flowvid.flows import AffineBlock, BlockSpec, GlobalLocalFlow
from flowvid.flows.autoregressive import ROTATION_CACHE_SIZE
from flowvid.nn import (
    Attention, BandedMask, apply_rope, banded_attention, frame_window_mask, prefix_causal_bands, prefix_causal_mask,
)
from flowvid.nn.attention import CPU_BF16_MIN_KEYS, attention
from flowvid.nn.attention import attention_bands, block_sparse_attention
from flowvid.nn.rope import rope_angles, rotate_pairs, rotate_pairs_real
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding


def rotate_by_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (a, b) -> (a cos - b sin, a sin + b cos), written out."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_rotate_pairs_matches_the_rotation_formula_on_strided_views():
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, 8)  # (B, N, q/k/v, H, D): q and k are strided views
    angles = torch.randn(5, 4)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]
    for view in (qkv[:, :, 0], qkv[:, :, 1]):
        expected = rotate_by_formula(view, angles.cos()[:, None], angles.sin()[:, None])
        torch.testing.assert_close(rotate_pairs(view, rotation), expected, rtol=0, atol=1e-6)
    odd_offset = torch.randn(41)[1:].view(5, 8)  # a view that cannot be read as complex pairs in place
    expected = rotate_by_formula(odd_offset, angles.cos(), angles.sin())
    torch.testing.assert_close(rotate_pairs(odd_offset, torch.polar(torch.ones_like(angles), angles)), expected,
                               rtol=0, atol=1e-6)


def test_apply_rope_keeps_dtype_and_computes_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8).bfloat16()
    angles = torch.randn(6, 4)
    out = apply_rope(x, angles.cos(), angles.sin())
    assert out.dtype == torch.bfloat16
    expected = rotate_by_formula(x.float(), angles.cos(), angles.sin()).bfloat16()
    assert torch.equal(out, expected)


def test_the_real_valued_rotation_torch_compile_runs_equals_the_complex_one():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 1, 4)
    expected = rotate_pairs(x, torch.polar(torch.ones_like(angles), angles))
    torch.testing.assert_close(rotate_pairs_real(x, angles.cos(), angles.sin()), expected, rtol=0, atol=1e-6)
    compiled = torch.compile(apply_rope, backend="eager", fullgraph=True)  # takes the real-valued path
    torch.testing.assert_close(compiled(x, angles.cos(), angles.sin()), expected, rtol=0, atol=1e-6)


def brute_force_mask(num_queries: int, first_query: int, num_keys: int, valid: torch.Tensor | None) -> torch.Tensor:
    prefix = 0 if valid is None else valid.shape[1]
    batch = 1 if valid is None else valid.shape[0]
    allowed = torch.zeros(batch, 1, num_queries, num_keys, dtype=torch.bool)
    for b in range(batch):
        for i in range(num_queries):
            q = first_query + i
            for k in range(num_keys):
                if k < prefix:
                    allowed[b, 0, i, k] = bool(valid[b, k]) or k == q
                else:
                    allowed[b, 0, i, k] = q >= prefix and k <= q
    return allowed


@pytest.mark.parametrize("num_queries, first_query, num_keys, prefix",
                         [(7, 0, 7, 0), (9, 0, 9, 3), (4, 5, 9, 3), (1, 8, 9, 3), (3, 0, 3, 3)])
def test_prefix_causal_mask_matches_its_definition(num_queries, first_query, num_keys, prefix):
    torch.manual_seed(prefix)
    valid = torch.rand(2, prefix) > 0.5 if prefix else None
    if valid is not None:
        valid[1] = False  # an empty caption: prefix queries still see themselves
    mask = prefix_causal_mask(num_queries, first_query, num_keys, valid, device=torch.device("cpu"))
    assert torch.equal(mask.expand(-1, 1, -1, -1), brute_force_mask(num_queries, first_query, num_keys, valid))


def test_cached_mask_parts_are_not_changed_by_later_calls_with_other_text():
    first = prefix_causal_mask(6, 0, 6, torch.tensor([[True, False]]))
    before = first.clone()
    prefix_causal_mask(6, 0, 6, torch.tensor([[True, True]]))
    assert torch.equal(first, before)
    assert torch.equal(prefix_causal_mask(6, 0, 6, torch.tensor([[True, False]])), before)


def plain_attention(attention: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal multi-head attention written with explicit scores and a softmax."""
    batch, length, width = x.shape
    q, k, v = attention.qkv(x).view(batch, length, 3, attention.heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = rotate_by_formula(q, cos, sin), rotate_by_formula(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    out = scores.softmax(-1) @ v
    return attention.proj(out.transpose(1, 2).reshape(batch, length, width))


def test_attention_equals_the_plain_formula_forward_and_backward():
    torch.manual_seed(0)
    attention = Attention(32, 8)
    x = torch.randn(2, 10, 32, requires_grad=True)
    angles = rope_angles((2, 5), 1, 8)
    fast = attention(x, angles.cos(), angles.sin())
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    plain = plain_attention(attention, x, angles.cos(), angles.sin())
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4)


def make_block(text_width: int | None = 6) -> AffineBlock:
    """A small block moved off its identity initialisation (the same weights on every call)."""
    torch.manual_seed(0)
    spec = BlockSpec(3, (2, 3), width=16, depth=1, head_dim=8, permutation="flip_within_frame", text_width=text_width)
    block = AffineBlock(spec)
    perturb_parameters(block)
    return block


def test_rotation_tables_are_built_once_and_equal_fresh_ones():
    block = make_block()
    x = torch.randn(2, 12, 3)
    text = TextEmbedding(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
    block(x, text)
    cached = block._rotation(0, 12, x.device, prefix=4)
    block(x, text)
    assert block._rotation(0, 12, x.device, prefix=4)[0] is cached[0]
    fresh = block._build_rotation(0, 12, x.device, prefix=4)
    assert torch.equal(cached[0], fresh[0]) and torch.equal(cached[1], fresh[1])
    assert torch.equal(cached[0][:4], torch.ones(4, 4))  # text positions are not rotated
    assert torch.equal(cached[1][:4], torch.zeros(4, 4))


def test_rotation_cache_stays_bounded():
    block = make_block(text_width=None)
    for first in range(ROTATION_CACHE_SIZE + 10):
        block._rotation(first % 12, 1 + first // 12, torch.device("cpu"))
    assert len(block._rotations) <= ROTATION_CACHE_SIZE


def test_block_output_does_not_depend_on_what_was_cached_before():
    """A block that has sampled (many cached runs of slots) still encodes exactly as a fresh one."""
    block = make_block(text_width=None).eval()
    twin = make_block(text_width=None).eval()
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        cache = block.start_inverse(2, 12)
        for first in range(0, 12, 4):
            block.affine(block.shift(x)[:, first:first + 4], cache)
            cache.advance(4)
        assert torch.equal(block(x)[0], twin(x)[0])


def test_a_cache_reset_or_rewound_keeps_its_text():
    """Passes after ``reset`` or ``rewind`` compute what they computed the first time: the caption stays."""
    block = make_block(text_width=6).eval()
    x = torch.randn(2, 12, 3)
    text = TextEmbedding(torch.randn(2, 4, 6), torch.tensor([[True] * 4, [True, False, False, False]]))
    inputs = block.shift(x)
    with torch.no_grad():
        cache = block.start_inverse(2, 12, text)
        first_pass = block.affine(inputs[:, :6], cache)
        cache.advance(6)
        second_pass = block.affine(inputs[:, 6:], cache)
        cache.rewind(6)
        torch.testing.assert_close(block.affine(inputs[:, :6], cache), first_pass, rtol=0, atol=0)
        cache.advance(6)
        torch.testing.assert_close(block.affine(inputs[:, 6:], cache), second_pass, rtol=0, atol=0)
        cache.reset()
        torch.testing.assert_close(block.affine(inputs[:, :6], cache), first_pass, rtol=0, atol=0)
        with pytest.raises(ValueError, match="4 of text"):
            cache.rewind(1)


@pytest.mark.parametrize("text_width", [None, 8], ids=["unconditional", "text"])
def test_inverse_block_builds_its_masks_on_the_inputs_device(text_width, monkeypatch):
    """A block of several slots without a text prefix once built its mask on the CPU, failing on a GPU.

    The meta device stands in for a GPU: attention there refuses a mask that lives on the CPU. It has
    no autocast, which the block only uses to switch autocast off.
    """
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    block = make_block(text_width=text_width).to("meta")
    text = None
    if text_width:
        text = TextEmbedding(torch.zeros(2, 4, text_width, device="meta"),
                             torch.ones(2, 4, dtype=torch.bool, device="meta"))
    with torch.no_grad():
        cache = block.start_inverse(2, 12, text)
        mu, sigma = block.affine(torch.zeros(2, 4, 3, device="meta"), cache)
    assert mu.device.type == "meta" and mu.shape == (2, 4, 3)
    assert prefix_causal_mask(4, 0, 4, None, device=torch.device("meta")).device.type == "meta"
    with pytest.raises(ValueError, match="needs the device"):
        prefix_causal_mask(4, 0, 4, None)


def masked_attention_and_grads(attend, q, k, v, mask):
    out = attend(q, k, v, mask)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


@pytest.mark.parametrize("mask", [
    prefix_causal_mask(416, 0, 416, torch.tensor([[True] * 10 + [False] * 6, [True] * 16])),
    frame_window_mask(8, 48, past_frames=2),
    frame_window_mask(8, 48, past_frames=None, future_frames=1),
], ids=["text-prefix-causal", "window-of-past-frames", "causal-with-lookahead"])
def test_banded_attention_equals_attention_with_the_full_mask(mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, mask.shape[-1], 16, requires_grad=True) for _ in range(3))
    full = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    for banded, plain in zip(masked_attention_and_grads(banded_attention, q, k, v, mask),
                             masked_attention_and_grads(full, q, k, v, mask)):
        torch.testing.assert_close(banded, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", [
    prefix_causal_mask(416, 0, 416, torch.tensor([[True] * 10 + [False] * 6, [True] * 16])),
    frame_window_mask(8, 48, past_frames=2),
], ids=["text-prefix-causal", "window-of-past-frames"])
def test_block_sparse_attention_equals_attention_with_the_full_mask(mask):
    """The GPU's path of ``banded_attention``; FlexAttention runs only forward on a CPU, and the GPU
    benchmark (benchmarks/gpu.py, text_prefix_attention) checks the gradients on a GPU's kernels."""
    torch.manual_seed(0)
    mask = mask.clone()
    q, k, v = (torch.randn(2, 2, mask.shape[-1], 16) for _ in range(3))
    refuse_dense = mock.Mock(side_effect=AssertionError("the dense path ran"))
    with mock.patch("flowvid.nn.attention.use_block_sparse", return_value=True), \
            mock.patch("flowvid.nn.attention.attention", refuse_dense):
        for _ in range(2):  # the second time with the first queries seeing every key
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.testing.assert_close(banded_attention(q, k, v, BandedMask(mask, None)), expected)
            mask[..., :100, :] = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward pass needs a GPU")
def test_block_sparse_attention_has_the_gradients_of_attention_with_the_full_mask():
    torch.manual_seed(0)
    valid = torch.tensor([[True] * 10 + [False] * 6, [True] * 16], device="cuda")
    mask = prefix_causal_mask(416, 0, 416, valid)
    q, k, v = (torch.randn(2, 2, 416, 16, device="cuda", requires_grad=True) for _ in range(3))
    full = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    for ours, plain in zip(masked_attention_and_grads(block_sparse_attention, q, k, v, mask),
                           masked_attention_and_grads(full, q, k, v, mask)):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keys, computed_in", [(64, torch.float32), (CPU_BF16_MIN_KEYS, torch.bfloat16)])
@pytest.mark.parametrize("causal", [True, False])
def test_short_bf16_attention_on_the_cpu_is_computed_in_fp32_and_returned_in_bf16(keys, computed_in, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, keys, 16).bfloat16().requires_grad_() for _ in range(3))
    mask = None if causal else torch.rand(1, 1, keys, keys) < 0.7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, mask, causal=causal)
    expected = F.scaled_dot_product_attention(*(t.to(computed_in) for t in (q, k, v)), attn_mask=mask,
                                              is_causal=causal).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_banded_attention_skips_the_hidden_keys_of_a_causal_mask():
    length = 1040
    bands = attention_bands(prefix_causal_mask(length, 0, length, torch.ones(1, 16, dtype=torch.bool)))
    computed = sum((end - first) * (key_end - key_first) for first, end, key_first, key_end in bands)
    assert computed < 0.65 * length * length
    assert attention_bands(torch.ones(1, 1, length, length, dtype=torch.bool)) is None  # nothing to skip


@pytest.mark.parametrize("num_queries, first_query, num_keys, prefix",
                         [(416, 0, 416, 16), (1040, 0, 1040, 16), (400, 300, 700, 16),
                          (512, 0, 512, 256)])  # a prefix longer than the first chunk of queries (T5's 256)
def test_prefix_causal_bands_from_the_shape_are_the_bands_read_from_the_mask(num_queries, first_query, num_keys,
                                                                              prefix):
    valid = torch.ones(2, prefix, dtype=torch.bool)
    valid[0, prefix // 2:] = False
    mask = prefix_causal_mask(num_queries, first_query, num_keys, valid)
    assert prefix_causal_bands(num_queries, first_query, num_keys, prefix) == attention_bands(mask)
    assert prefix_causal_bands(150, 0, 150, 16) is None  # one chunk


def test_banded_attention_with_bands_known_from_the_shape_equals_attention_with_the_full_mask():
    torch.manual_seed(0)
    mask = prefix_causal_mask(416, 0, 416, torch.tensor([[True] * 10 + [False] * 6, [True] * 16]))
    q, k, v = (torch.randn(2, 2, 416, 16, requires_grad=True) for _ in range(3))
    banded = lambda q, k, v, mask: banded_attention(q, k, v, BandedMask(mask, prefix_causal_bands(416, 0, 416, 16)))  # noqa: E731
    full = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    for ours, plain in zip(masked_attention_and_grads(banded, q, k, v, mask),
                           masked_attention_and_grads(full, q, k, v, mask)):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text_width", [None, 6])
def test_a_block_compiles_to_one_graph_and_computes_what_it_does_eagerly(text_width):
    """torch.compile (``FlowModule(compile_flow=True)``) sees the whole block: a graph break per layer (the
    chunks of a mask read from its values, complex rotations) would leave the compiler nothing to fuse."""
    torch.manual_seed(0)
    spec = BlockSpec(3, (8, 8), width=16, depth=2, head_dim=8, permutation="flip_within_frame",
                     text_width=text_width)
    block = AffineBlock(spec)
    perturb_parameters(block)
    x = torch.randn(2, 4 * 64, 3, requires_grad=True)  # more queries than one chunk of banded attention
    text = None if text_width is None else TextEmbedding(torch.randn(2, 5, 6), torch.tensor([[True] * 3 + [False] * 2,
                                                                                            [True] * 5]))
    explanation = torch._dynamo.explain(block)(x, text)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for run in (compiled, block):
        z, logdet = run(x, text)
        results.append((z, logdet, *torch.autograd.grad(z.square().sum() - logdet.sum(), (x, block.proj_in.weight))))
    for ours, eager in zip(*results):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_banded_attention_sees_a_mask_changed_in_place():
    torch.manual_seed(0)
    mask = prefix_causal_mask(400, 0, 400, torch.ones(1, 16, dtype=torch.bool)).clone()
    q, k, v = (torch.randn(1, 1, 400, 8) for _ in range(3))
    banded_attention(q, k, v, mask)
    mask[..., :100, :] = True  # the first queries now see every key
    torch.testing.assert_close(banded_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_a_text_conditioned_block_encodes_a_long_video_under_inference_mode():
    """Validation and scoring run under inference mode, whose masks carry no version counter."""
    torch.manual_seed(0)
    spec = BlockSpec(3, (8, 8), width=16, depth=1, head_dim=8, permutation="flip_within_frame", text_width=6)
    block = AffineBlock(spec)
    perturb_parameters(block)
    x = torch.randn(2, 4 * 64, 3)  # 4 frames: more queries than one chunk
    text = TextEmbedding(torch.randn(2, 5, 6), torch.tensor([[True] * 3 + [False] * 2, [True] * 5]))
    with torch.no_grad():
        expected = block(x, text)
    with torch.inference_mode():
        z, logdet = block(x, text)
    torch.testing.assert_close(z, expected[0])
    torch.testing.assert_close(logdet, expected[1])


def test_a_pass_over_some_videos_reads_and_writes_only_their_cache_rows():
    from flowvid.nn.kv_cache import KVCache

    cache = KVCache(num_layers=2, batch=3, heads=1, head_dim=2, capacity=6)
    cache.keys.normal_(), cache.values.normal_()
    cache.key_valid[1, 0] = False
    cache.advance(3)
    index = torch.tensor([0, 2])
    before = cache.keys.clone()
    dropped = cache.rows(index, keep=False)
    keys, _ = dropped.write(1, torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
    assert torch.equal(keys[:, :, :3], before[1, index, :, :3]) and torch.equal(keys[:, :, 3:], torch.ones(2, 1, 2, 2))
    assert torch.equal(cache.keys, before)  # nothing written

    kept = cache.rows(index)
    assert kept.length == 3 and torch.equal(kept.key_valid, cache.key_valid[index])
    keys, _ = kept.write(1, torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
    assert torch.equal(keys, cache.keys[1, index, :, :5])
    changed = (cache.keys != before).any(dim=(0, 2, 4))  # (batch, positions)
    assert changed[index][:, 3:5].all() and changed[1].sum() == 0 and not changed[:, :3].any()


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8)
def test_every_compiled_block_keeps_its_variants_past_torchs_limit_of_eight():
    """Training steps, validation without gradients and a smaller last batch: 13 variants of the one
    ``AffineBlock.forward`` for a four-block flow. At torch's default limit of 8 the later blocks would
    quietly run eagerly; here a hit would fail."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = GlobalLocalFlow(latent_channels=3, frame_size=(2, 2), num_shallow=3, shallow_width=16, shallow_depth=1,
                           deep_width=16, deep_depth=1, head_dim=8, text_width=6)
    flow.compile_blocks(backend="eager")

    def encode(batch: int, frames: int = 3):
        x = torch.randn(batch, frames, 2, 2, 3)
        return flow(x, TextEmbedding(torch.randn(batch, 4, 6), torch.ones(batch, 4, dtype=torch.bool)))

    for batch in (2, 2, 3):
        z, logdet = encode(batch)
        (z.square().mean() - logdet.mean()).backward()
        with torch.no_grad():
            encode(batch + 2, frames=4)
    assert all(block._compiled_call_impl is not None for block in flow.blocks)
    assert torch._dynamo.config.recompile_limit >= 8 * len(flow.blocks)
    torch._dynamo.reset()
