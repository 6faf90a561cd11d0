"""The attention building blocks against references written out from their definitions.

The references: masks built from the documented rules (text queries see the valid text
and themselves, video query i the valid text and video positions <= i, padded text is never a key of
another query; frame n sees frames ``[n - past, n + future]``), softmax attention written out in
float64, a key/value cache compared with one pass over the whole sequence, and rotary embeddings
compared with explicit 2 x 2 rotations.
"""

import itertools
import math

import pytest
import torch

from flowvid.nn import Attention, BandedMask, KVCache, banded_attention, frame_window_mask
from flowvid.nn import prefix_causal_bands, prefix_causal_mask
from flowvid.nn.attention import QUERY_CHUNK
from flowvid.nn.rope import rope_angles, rope_pair_split, rope_rotation, rotate_pairs, rotate_pairs_real

HEAD_DIM = 4


def reference_prefix_causal_mask(text_valid: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, 1, P + N, P + N) from the definition, each rule written for (query, key) position grids."""
    batch, prefix = text_valid.shape
    total = prefix + num_tokens
    query, key = torch.meshgrid(torch.arange(total), torch.arange(total), indexing="ij")
    key_is_valid_text = torch.zeros(batch, total, dtype=torch.bool)
    key_is_valid_text[:, :prefix] = text_valid
    text_key = (key < prefix) & (key_is_valid_text[:, None, :] | (key == query))
    video_key = (key >= prefix) & (query >= prefix) & (key <= query)
    return (text_key | video_key)[:, None]


def reference_attention(q, k, v, allowed):
    """Softmax attention in float64 with an explicit boolean mask."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


def values_and_grads(attend, q, k, v, mask, upstream):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    return (out, *grads)


def text_padding(batch: int, prefix: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return torch.ones(batch, prefix, dtype=torch.bool)
    if kind == "all":
        return torch.zeros(batch, prefix, dtype=torch.bool)
    valid = torch.rand(batch, prefix, generator=generator) < 0.6
    valid[0] = False  # a row whose caption is entirely padding
    if batch > 1:
        valid[-1] = True
    return valid


# (text length, video tokens): totals below, equal to, just above, and at non-multiples of the chunk.
SHAPES = [(0, 7), (1, 30), (5, QUERY_CHUNK - 5), (3, QUERY_CHUNK + 1 - 3), (0, 2 * QUERY_CHUNK),
          (7, 2 * QUERY_CHUNK + 50 - 7), (1, 3 * QUERY_CHUNK - 1 - 1), (16, 400)]


def random_cases():
    for seed, (prefix, tokens) in enumerate(SHAPES):
        batch, heads = (1, 3) if seed % 2 else (3, 1)
        for kind in (("none", "all", "some") if prefix else ("none",)):
            yield pytest.param(prefix, tokens, batch, heads, kind, seed,
                               id=f"P{prefix}-N{tokens}-B{batch}-H{heads}-{kind}")


@pytest.mark.parametrize("prefix,tokens,batch,heads,padding,seed", list(random_cases()))
def test_prefix_causal_banded_attention_matches_float64_reference(prefix, tokens, batch, heads, padding, seed):
    generator = torch.Generator().manual_seed(seed)
    total = prefix + tokens
    valid = text_padding(batch, prefix, padding, generator)
    expected_mask = reference_prefix_causal_mask(valid, tokens)
    mask = prefix_causal_mask(total, 0, total, valid if prefix else None, device=torch.device("cpu"))
    assert torch.equal(mask.expand_as(expected_mask), expected_mask)

    q, k, v, upstream = (torch.randn(batch, heads, total, HEAD_DIM, generator=generator, dtype=torch.float64)
                         for _ in range(4))
    expected = values_and_grads(reference_attention, q, k, v, expected_mask, upstream)
    known_bands = BandedMask(mask, prefix_causal_bands(total, 0, total, prefix))
    for given in (known_bands, mask):  # bands known from the shape, and read from the mask's values
        for ours, reference in zip(values_and_grads(banded_attention, q, k, v, given, upstream), expected):
            torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prefix,total", [(0, QUERY_CHUNK + 1), (1, 2 * QUERY_CHUNK), (9, 3 * QUERY_CHUNK - 1),
                                          (QUERY_CHUNK + 3, 2 * QUERY_CHUNK + 7), (40, 1000)])
@pytest.mark.parametrize("first_query", [0, 5])
def test_prefix_causal_bands_cover_every_visible_key(prefix, total, first_query):
    """Each chunk's run of keys holds every key its queries may see (the values cannot hide a gap
    where the attended keys have near-zero weight)."""
    num_queries = total - first_query
    valid = torch.ones(2, prefix, dtype=torch.bool)
    mask = prefix_causal_mask(num_queries, first_query, total, valid if prefix else None, device=torch.device("cpu"))
    bands = prefix_causal_bands(num_queries, first_query, total, prefix)
    if bands is None:
        return
    assert [b[0] for b in bands] == [0] + [b[1] for b in bands[:-1]] and bands[-1][1] == num_queries
    for first, last, lo, hi in bands:
        rows = mask[..., first:last, :]
        assert not rows[..., :lo].any() and not rows[..., hi:].any(), (first, last, lo, hi)


def test_prefix_causal_mask_of_later_queries_is_the_matching_rows_of_the_whole_mask():
    valid = torch.tensor([[True, False, True], [False, False, False]])
    whole = reference_prefix_causal_mask(valid, 9)
    for first, count in [(3, 1), (3, 4), (7, 5), (11, 1)]:
        part = prefix_causal_mask(count, first, first + count, valid)
        assert torch.equal(part.expand(2, 1, count, first + count), whole[:, :, first:first + count, :first + count])


@pytest.mark.parametrize("frames,per_frame,past,future", [(4, 3, None, 0), (5, 2, 1, 0), (5, 2, 0, 1), (6, 1, 2, 2)])
def test_frame_window_mask_matches_its_definition(frames, per_frame, past, future):
    total = frames * per_frame
    expected = torch.zeros(total, total, dtype=torch.bool)
    for query, key in itertools.product(range(total), range(total)):
        difference = key // per_frame - query // per_frame
        expected[query, key] = difference <= future and (past is None or difference >= -past)
    assert torch.equal(frame_window_mask(frames, per_frame, past, future)[0, 0], expected)


@pytest.mark.parametrize("frames,per_frame,past,future,text", [(8, 48, 2, 0, 0), (5, 50, 1, 1, 3), (9, 25, None, 0, 1),
                                                              (4, 33, 0, 0, 0)])
def test_banded_attention_over_frame_windows_matches_float64_reference(frames, per_frame, past, future, text):
    """Windows hide keys on both sides of a chunk's rows; the chunks read from the mask must keep them."""
    generator = torch.Generator().manual_seed(frames)
    video = frame_window_mask(frames, per_frame, past, future)[0, 0]
    total = text + video.shape[0]
    valid = text_padding(2, text, "some", generator)
    mask = torch.zeros(2, 1, total, total, dtype=torch.bool)
    mask[..., :text] = valid[:, None, None, :]
    mask[..., text:, text:] = video
    mask[..., :text, :text] |= torch.eye(text, dtype=torch.bool)
    q, k, v, upstream = (torch.randn(2, 2, total, HEAD_DIM, generator=generator, dtype=torch.float64)
                         for _ in range(4))
    expected = values_and_grads(reference_attention, q, k, v, mask, upstream)
    for ours, reference in zip(values_and_grads(banded_attention, q, k, v, mask, upstream), expected):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10)


# --- KV cache -------------------------------------------------------------------------------------

WIDTH, HEADS = 12, 3


def attention_layer(seed=0) -> Attention:
    torch.manual_seed(seed)
    return Attention(WIDTH, WIDTH // HEADS).double()


def rotation_tables(total: int, prefix: int):
    angles = torch.cat([torch.zeros(prefix, WIDTH // HEADS // 2),
                        rope_angles((1, total - prefix), 1, WIDTH // HEADS)[:total - prefix]])
    return angles.cos(), angles.sin()


def incremental(layer, x, cos, sin, valid, blocks, prefix=0, cache=None):
    """The layer over ``x`` block by block through a cache, the text (``prefix`` positions) first; with
    ``cache``, the blocks continue where it stands."""
    batch, total, _ = x.shape
    cache = cache or KVCache(1, batch, HEADS, WIDTH // HEADS, total, dtype=torch.float64)
    outputs = []
    if prefix:
        cache.key_valid[:, :prefix] = valid
        outputs.append(layer(x[:, :prefix], cos[:prefix], sin[:prefix], prefix_causal_mask(prefix, 0, prefix, valid),
                             cache))
        cache.advance(prefix)
        cache.prefix = prefix
    for count in blocks:
        first = cache.length
        block = slice(first, first + count)
        text_valid = cache.key_valid[:, :cache.prefix] if cache.prefix else None
        mask = None  # one query without text sees every cached key
        if count > 1 or cache.prefix:
            mask = prefix_causal_mask(count, first, first + count, text_valid, device=x.device)
        outputs.append(layer(x[:, block], cos[block], sin[block], mask, cache))
        cache.advance(count)
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("prefix,blocks", [(0, [1, 3, 1, 5]), (3, [4, 1, 5]), (2, [10])])
def test_cache_filled_block_by_block_equals_one_pass_over_the_sequence(prefix, blocks):
    layer = attention_layer()
    total = prefix + sum(blocks)
    x = torch.randn(2, total, WIDTH, dtype=torch.float64)
    cos, sin = rotation_tables(total, prefix)
    valid = torch.tensor([[True, False, True][:prefix], [False] * prefix])
    with torch.no_grad():
        whole = layer(x, cos, sin, prefix_causal_mask(total, 0, total, valid) if prefix else None)
        blockwise, cache = incremental(layer, x, cos, sin, valid, blocks, prefix)
    torch.testing.assert_close(blockwise, whole, rtol=1e-10, atol=1e-12)
    assert cache.length == total


def test_rewind_then_overwrite_equals_never_having_written_the_overwritten_part():
    layer = attention_layer()
    prefix, total = 2, 9
    valid = torch.tensor([[True, False], [True, True]])
    x = torch.randn(2, total, WIDTH, dtype=torch.float64)
    discarded = torch.randn(2, total, WIDTH, dtype=torch.float64)
    cos, sin = rotation_tables(total, prefix)
    with torch.no_grad():
        clean, clean_cache = incremental(layer, x, cos, sin, valid, [3, 4], prefix)
        _, cache = incremental(layer, x, cos, sin, valid, [3], prefix)
        incremental(layer, discarded, cos, sin, valid, [4], cache=cache)
        cache.rewind(4)
        rewritten, _ = incremental(layer, x, cos, sin, valid, [4], cache=cache)
    torch.testing.assert_close(rewritten, clean[:, prefix + 3:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache.keys, clean_cache.keys, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(total - prefix + 1)


def test_block_written_twice_before_advance_keeps_only_its_second_write():
    """Jacobi iterations overwrite the block at the cache's position in place."""
    layer = attention_layer()
    prefix, total = 2, 9
    valid = torch.tensor([[False, False], [True, False]])
    x = torch.randn(2, total, WIDTH, dtype=torch.float64)
    cos, sin = rotation_tables(total, prefix)
    with torch.no_grad():
        clean, _ = incremental(layer, x, cos, sin, valid, [3, 4], prefix)
        _, cache = incremental(layer, x, cos, sin, valid, [3], prefix)
        first = cache.length
        block = slice(first, first + 4)
        mask = prefix_causal_mask(4, first, first + 4, valid)
        layer(torch.randn(2, 4, WIDTH, dtype=torch.float64), cos[block], sin[block], mask, cache)
        again = layer(x[:, block], cos[block], sin[block], mask, cache)
    torch.testing.assert_close(again, clean[:, block], rtol=1e-10, atol=1e-12)


def test_reset_keeps_the_text_and_forgets_the_tokens():
    layer = attention_layer()
    prefix, total = 3, 8
    valid = torch.tensor([[True, True, False]])
    x = torch.randn(1, total, WIDTH, dtype=torch.float64)
    cos, sin = rotation_tables(total, prefix)
    with torch.no_grad():
        clean, _ = incremental(layer, x, cos, sin, valid, [5], prefix)
        other_tokens = torch.cat([x[:, :prefix], torch.randn(1, total - prefix, WIDTH, dtype=torch.float64)], dim=1)
        _, cache = incremental(layer, other_tokens, cos, sin, valid, [2, 3], prefix)
        cache.reset()
        assert cache.length == prefix
        again, _ = incremental(layer, x, cos, sin, valid, [5], cache=cache)
    torch.testing.assert_close(again, clean[:, prefix:], rtol=1e-10, atol=1e-12)


def test_reset_refuses_positions_the_cache_does_not_hold():
    """Growing the cache by ``reset`` would make never-written (zero) keys visible to every later query."""
    cache = KVCache(1, 1, HEADS, WIDTH // HEADS, capacity=10)
    cache.advance(4)
    cache.prefix = 2
    cache.reset(3)
    assert cache.length == 3
    for length in (4, 10, 1):
        with pytest.raises(ValueError, match=f"cannot reset a cache holding 3 positions to {length}"):
            cache.reset(length)
    assert cache.length == 3


def test_cache_rows_write_and_read_only_their_rows():
    layer = attention_layer()
    total = 6
    x = torch.randn(3, total, WIDTH, dtype=torch.float64)
    cos, sin = rotation_tables(total, 0)
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        whole, _ = incremental(layer, x, cos, sin, None, [2, 4])
        _, cache = incremental(layer, x, cos, sin, None, [2])
        before = cache.keys.clone()
        mask = prefix_causal_mask(4, 2, 6, None, device=x.device)
        peek = layer(x[rows, 2:], cos[2:], sin[2:], mask, cache.rows(rows, keep=False))
        assert torch.equal(cache.keys, before)
        out = layer(x[rows, 2:], cos[2:], sin[2:], mask, cache.rows(rows))
        assert torch.equal(cache.keys[:, 1], before[:, 1])
    torch.testing.assert_close(peek, whole[rows, 2:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, whole[rows, 2:], rtol=1e-10, atol=1e-12)


# --- RoPE -----------------------------------------------------------------------------------------

def explicit_rotation(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Each interleaved pair times its own 2 x 2 rotation matrix, in float64."""
    cos, sin = angles.double().cos(), angles.double().sin()
    matrices = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    pairs = x.double().unflatten(-1, (-1, 2))
    return (matrices @ pairs[..., None])[..., 0].flatten(-2)


@pytest.mark.parametrize("head_dim", [2, 4, 8, 14])
def test_rope_is_a_rotation_of_each_pair(head_dim):
    angles = rope_angles((3, 5), 2, head_dim)
    x = torch.randn(2, 4, angles.shape[0], head_dim, dtype=torch.float64)
    rotated = rotate_pairs(x, rope_rotation(angles.cos(), angles.sin()))
    torch.testing.assert_close(rotated, explicit_rotation(x, angles), rtol=1e-6, atol=1e-6)
    # the real-valued form that compiled code runs
    torch.testing.assert_close(rotate_pairs_real(x, angles.cos(), angles.sin()), rotated, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotated.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))


@pytest.mark.parametrize("head_dim", [4, 8, 16])
def test_rope_scores_depend_only_on_position_differences(head_dim):
    """q . k after rotation is the same for every pair of (frame, y, x) positions with the same offsets."""
    frames, height, width = 4, 3, 5
    angles = rope_angles((height, width), frames, head_dim).double().unflatten(0, (frames, height, width))
    q, k = torch.randn(2, head_dim, dtype=torch.float64)

    def score(query_position, key_position):
        return explicit_rotation(q, angles[query_position]) @ explicit_rotation(k, angles[key_position])

    positions = list(itertools.product(range(frames), range(height), range(width)))
    by_offset: dict[tuple[int, int, int], float] = {}
    for query_position, key_position in itertools.product(positions[::3], positions[::2]):
        offset = tuple(a - b for a, b in zip(query_position, key_position))
        value = score(query_position, key_position)
        assert math.isclose(by_offset.setdefault(offset, value), value, rel_tol=1e-5, abs_tol=1e-5), offset
    x_pairs, y_pairs, t_pairs = rope_pair_split(head_dim)
    # every axis with pairs moves the score: the offsets are not all read as one
    for axis, pairs in enumerate((t_pairs, y_pairs, x_pairs)):
        moved = [0, 0, 0]
        moved[axis] = 1
        if pairs:
            assert not math.isclose(score((0, 0, 0), (0, 0, 0)), score((0, 0, 0), tuple(moved)), rel_tol=1e-6)


def test_rope_angles_follow_time_major_raster_order_with_standard_frequencies():
    """Pair j of an axis with n pairs turns by position * theta^(-j / n), the usual 1 / theta^(2j / d)."""
    head_dim, frames, height, width, theta = 16, 2, 3, 4, 10000.0
    angles = rope_angles((height, width), frames, head_dim, theta=theta).double()
    x_pairs, y_pairs, t_pairs = rope_pair_split(head_dim)
    scale = 32.0 / math.sqrt(height * width)
    expected = []
    for t, y, x in itertools.product(range(frames), range(height), range(width)):
        expected.append([position * theta ** (-j / pairs)
                         for position, pairs in ((x * scale, x_pairs), (y * scale, y_pairs), (t, t_pairs))
                         for j in range(pairs)])
    torch.testing.assert_close(angles, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
