"""Conformance tests for flow blocks.

A block plugin's test module subclasses the mixin and says how to build its block::

    from flowvid.testing import FlowBlockConformance

    class TestMyBlock(FlowBlockConformance):
        block_class = MyBlock          # called as block_class(spec, **block_kwargs)
        block_kwargs = {}

pytest then runs every ``test_*`` method below on it, unconditional and text-conditioned, in the token
orders samplers meet (a GlobalLocalFlow's deep block reads ``identity``, its shallow blocks ``flip`` one
frame at a time; ``flip_within_frame`` is the other registered order): invertibility, the log-determinant
against the autograd Jacobian, causality in the order ``spec.permutation`` names, the KV cache driven the
ways samplers drive it (run by run, a run written again before it is final, a pass over some videos of a
batch), a video alone mapped as in its batch, that a text-conditioned block reads its caption (and never
its padding), fp32 log-det under bf16 autocast, the state-dict round trip, and a GlobalLocalFlow made of
the block that the built-in samplers invert.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import pytest
import torch

from flowvid.flows.base import BlockSpec, FlowBlock
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.registry import PERMUTATIONS
from flowvid.sampling.jacobi import JacobiSampler
from flowvid.sampling.sequential import SequentialSampler, invert_block_sequential
from flowvid.text.base import TextEmbedding

#: The token orders samplers meet (``permutation``, ``frame_local``): over the whole video, frame-causal
#: (``identity``: a GlobalLocalFlow's deep block; ``flip_within_frame``), and one frame at a time, read
#: backwards (``flip``: its shallow blocks, which alternate it with ``identity``).
ORDERS = [pytest.param("identity", False, id="identity"),
          pytest.param("flip_within_frame", False, id="flip_within_frame"),
          pytest.param("flip", False, id="flip"),
          pytest.param("flip", True, id="frame_local-flip")]


def perturb_parameters(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value so that zero-initialised blocks are not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.add_(noise.to(parameter.device, parameter.dtype))


class CachedPasses:
    """A block's KV cache driven by hand, the way samplers drive it (``flowvid/sampling/inversion.py``),
    and checked against the block's full forward pass. Tokens are in the block's own order."""

    @torch.no_grad()
    def __init__(self, block: FlowBlock, x: torch.Tensor, text: TextEmbedding | None):
        self.block = block
        self.z_full = block.permutation.forward(block(x, text)[0])
        self.x = block.permutation.forward(x)
        self.inputs = block.shift(self.x)  # the true input of every slot
        self.cache = block.start_inverse(x.shape[0], x.shape[1], text)

    @property
    def num_slots(self) -> int:
        return self.x.shape[1]

    @torch.no_grad()
    def z(self, inputs: torch.Tensor, first: int, count: int, videos: Sequence[int] | None = None,
          keep: bool = True) -> torch.Tensor:
        """z of slots ``[first, first + count)`` from one pass over ``inputs`` of every video, or of
        ``videos`` only (through ``cache.rows``, as a sampler passes over the videos still converging)."""
        run = slice(first, first + count)
        if videos is None:
            mu, sigma = self.block.affine(inputs[:, run], self.cache)
            return (self.x[:, run] - mu) / sigma
        rows = torch.tensor(videos)
        mu, sigma = self.block.affine(inputs[rows, run], self.cache.rows(rows, keep))
        return (self.x[rows, run] - mu) / sigma

    def check(self, first: int, count: int, when: str, videos: Sequence[int] | None = None) -> None:
        """A pass over the true inputs of slots ``[first, first + count)`` gives the full forward's z."""
        expected = self.z_full[:, first:first + count]
        if videos is not None:
            expected = expected[list(videos)]
        torch.testing.assert_close(self.z(self.inputs, first, count, videos), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{when}: the cached pass differs from the forward pass: {m}")


class FlowBlockConformance:
    """Mixin of tests every FlowBlock must pass. Set ``block_class`` (and ``block_kwargs``)."""

    block_class: ClassVar[Any]
    block_kwargs: ClassVar[dict] = {}
    frame_size: ClassVar[tuple[int, int]] = (2, 3)
    channels: ClassVar[int] = 3
    text_width: ClassVar[int] = 8

    def build_block(self, spec: BlockSpec) -> FlowBlock:
        """The block under test for ``spec``: the factory a GlobalLocalFlow is given."""
        return self.block_class(spec, **self.block_kwargs)

    def make_block(self, permutation: str = "identity", text: bool = False, seed: int = 0,
                   frame_local: bool = False) -> FlowBlock:
        torch.manual_seed(seed)
        spec = BlockSpec(self.channels, self.frame_size, width=32, depth=2, head_dim=16, permutation=permutation,
                         text_width=self.text_width if text else None, frame_local=frame_local)
        block = self.build_block(spec)
        perturb_parameters(block, seed=seed)
        return block.eval()

    def make_text(self, batch: int, length: int = 5) -> TextEmbedding:
        torch.manual_seed(1)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length - 2:] = False
        mask[-1, :] = False  # an empty caption
        return TextEmbedding(torch.randn(batch, length, self.text_width) * mask[..., None], mask)

    def sequence(self, batch: int = 2, frames: int = 2) -> torch.Tensor:
        torch.manual_seed(2)
        return torch.randn(batch, frames * self.frame_size[0] * self.frame_size[1], self.channels)

    def ordered_case(self, permutation: str, frame_local: bool,
                     conditioned: bool) -> tuple[FlowBlock, torch.Tensor, TextEmbedding | None]:
        """A block built for that order and the tokens a flow hands it: a frame-local block gets one frame."""
        block = self.make_block(permutation, conditioned, frame_local=frame_local)
        x = self.sequence(frames=1 if frame_local else 2)
        return block, x, self.make_text(x.shape[0]) if conditioned else None

    @pytest.mark.parametrize("permutation, frame_local", ORDERS)
    @pytest.mark.parametrize("conditioned", [False, True])
    def test_inverse_of_forward_is_identity(self, permutation, frame_local, conditioned):
        block, x, text = self.ordered_case(permutation, frame_local, conditioned)
        with torch.no_grad():
            z, _ = block(x, text)
        x_back = invert_block_sequential(block, z, text)
        assert z.dtype == torch.float32
        torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5, msg=lambda m: f"inverse(forward(x)) != x: {m}")

    def batch_jacobian(self, conditioned: bool, permutation: str = "flip_within_frame",
                       frame_local: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A float64 block's d z / d x over a batch of two videos, (B*N*C, B*N*C); and x, log-det."""
        block, x, text = self.ordered_case(permutation, frame_local, conditioned)
        block, x = block.double(), x.double()
        if text is not None:
            text = TextEmbedding(text.tokens.double(), text.mask)

        def flat_forward(values):
            return block(values.view_as(x), text)[0].reshape(-1)

        return torch.autograd.functional.jacobian(flat_forward, x.reshape(-1)), x, block(x, text)[1]

    @pytest.mark.parametrize("permutation, frame_local", ORDERS)
    @pytest.mark.parametrize("conditioned", [False, True])
    def test_logdet_matches_autograd_jacobian(self, permutation, frame_local, conditioned):
        """Per element and per sample, in every order (a flow's shallow blocks' log-det counts in its
        loss as much as its deep block's), over several frames and with text: what the Jacobian says."""
        jacobian, x, logdet = self.batch_jacobian(conditioned, permutation, frame_local)
        assert logdet.shape == x.shape, f"log-det of shape {tuple(logdet.shape)}; per element: {tuple(x.shape)}"
        size = x[0].numel()
        for b in range(x.shape[0]):
            own = jacobian[b * size:(b + 1) * size, b * size:(b + 1) * size]
            # An autoregressive block's Jacobian is triangular: its diagonal holds each element's log-det.
            # The affine step runs in fp32 whatever the block's dtype: fp32 tolerances.
            torch.testing.assert_close(logdet[b].reshape(-1).double(), own.diagonal().abs().log(), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"sample {b}, order {permutation!r}: per-element log-det "
                                                     f"against the Jacobian: {m}")
            torch.testing.assert_close(logdet[b].sum().double(), torch.linalg.slogdet(own)[1], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"sample {b}, order {permutation!r}: log-det against the "
                                                     f"Jacobian's: {m}")

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_samples_of_a_batch_do_not_see_each_other(self, conditioned):
        jacobian, x, _ = self.batch_jacobian(conditioned)
        size = x[0].numel()
        for b, other in ((0, 1), (1, 0)):
            across = jacobian[b * size:(b + 1) * size, other * size:(other + 1) * size]
            assert across.abs().max().item() == 0.0, f"z of sample {b} depends on sample {other} of the batch"

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_a_video_alone_is_mapped_as_in_its_batch(self, conditioned):
        """Samplers meet batches of one video, and a video's noise must not depend on where it sits in its
        batch: each video alone (forward and inverse) gives what it gives in the batch."""
        block, x, text = self.ordered_case("flip_within_frame", False, conditioned)
        with torch.no_grad():
            z, logdet = block(x, text)
            for b in range(x.shape[0]):
                own_text = None if text is None else text[b:b + 1]
                z_alone, logdet_alone = block(x[b:b + 1], own_text)
                assert z_alone.shape == x[b:b + 1].shape and logdet_alone.shape == z_alone.shape, (
                    f"a batch of one video {tuple(x[b:b + 1].shape)} gave z {tuple(z_alone.shape)} and log-det "
                    f"{tuple(logdet_alone.shape)}: keep the batch axis (no squeeze)")
                for name, alone, batched in (("z", z_alone, z[b:b + 1]), ("log-det", logdet_alone, logdet[b:b + 1])):
                    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5, msg=lambda m: (
                        f"video {b} alone gets another {name} than in its batch (does the block read the video's "
                        f"row, or the batch?): {m}"))
                torch.testing.assert_close(invert_block_sequential(block, z_alone, own_text), x[b:b + 1],
                                           rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"video {b} alone: inverse(forward(x)) != x: {m}")

    @pytest.mark.parametrize("permutation, frame_local", ORDERS)
    @pytest.mark.parametrize("conditioned", [False, True])
    def test_changing_a_token_leaves_earlier_slots_unchanged(self, permutation, frame_local, conditioned):
        """Every slot in turn, in the order ``spec.permutation`` names (samplers invert the slots in that
        order): a slot's z depends on that slot and the slots before it, never on later ones."""
        block, x, text = self.ordered_case(permutation, frame_local, conditioned)
        order = PERMUTATIONS.get(permutation)(block.spec.tokens_per_frame)  # the spec's, whatever the block holds
        with torch.no_grad():
            z = order.forward(block(x, text)[0])
            for slot in range(x.shape[1]):
                changed = order.forward(x).clone()
                changed[:, slot] += 1.0
                z_changed = order.forward(block(order.inverse(changed), text)[0])
                assert torch.equal(z[:, :slot], z_changed[:, :slot]), \
                    f"in the order {permutation!r}, slots before {slot} saw slot {slot} change"
                assert not torch.equal(z[:, slot], z_changed[:, slot]), f"slot {slot}'s z ignores its own value"

    def cached_passes(self, conditioned: bool) -> CachedPasses:
        block = self.make_block("flip_within_frame", conditioned)
        x = self.sequence()
        return CachedPasses(block, x, self.make_text(x.shape[0]) if conditioned else None)

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_kv_cache_steps_equal_full_forward(self, conditioned):
        """The exact sampler's way (and a prefix's): a pass over a run of slots, then advance over all of it."""
        passes = self.cached_passes(conditioned)
        for first, count in [(0, 1), (1, 3), (4, passes.num_slots - 4)]:  # uneven runs of slots
            passes.check(first, count, f"slots [{first}, {first + count})")
            passes.cache.advance(count)

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_a_run_written_again_before_advance_counts_as_last_written(self, conditioned):
        """Jacobi's way: a pass over a run of slots from guesses, more passes from better ones, each
        overwriting the last in place, then advance over the slots that came out final and passes over the
        rest of the run. Only the last write of a slot may count."""
        passes = self.cached_passes(conditioned)
        guesses = [torch.randn_like(passes.inputs) for _ in range(2)]
        rest = passes.num_slots - 5
        for first, count, final in [(0, 5, 2), (2, 3, 3), (5, rest, rest)]:
            for guess in guesses:
                passes.z(guess, first, count)
            passes.check(first, count, f"slots [{first}, {first + count}) after passes from guesses")
            passes.cache.advance(final)

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_a_pass_over_some_videos_writes_their_rows_only(self, conditioned):
        """Every video of a Jacobi batch stops on its own: a pass covers the videos still converging through
        ``cache.rows(videos)``, and a rank with none left rehearses through ``cache.rows(videos, keep=False)``,
        which keeps nothing. Later slots must see each video's own last write."""
        passes = self.cached_passes(conditioned)
        per_frame = self.frame_size[0] * self.frame_size[1]
        guess = torch.randn_like(passes.inputs)
        passes.z(guess, 0, per_frame)
        for video in (1, 0):
            passes.check(0, per_frame, f"the first frame of video {video} alone", videos=[video])
        passes.z(guess, 0, per_frame, videos=[0], keep=False)  # a rehearsal: kept nowhere
        passes.cache.advance(per_frame)
        passes.check(per_frame, passes.num_slots - per_frame, "the next frame, after passes over single videos")

    def test_padded_text_positions_are_never_read(self):
        """Text encoders zero their padding, but a block must not rely on it: it reads the mask. Noise in
        the padded positions changes nothing, in the forward pass and in the sampler's cached one."""
        block = self.make_block("flip_within_frame", text=True)
        x = self.sequence()
        text = self.make_text(x.shape[0])
        noisy = TextEmbedding(torch.where(text.mask[..., None], text.tokens, 10 * torch.randn_like(text.tokens)),
                              text.mask)
        with torch.no_grad():
            assert torch.equal(block(x, noisy)[0], block(x, text)[0]), "the forward pass reads padded text"
            xp = block.permutation.forward(x)
            passes = [block.affine(block.shift(xp), block.start_inverse(x.shape[0], x.shape[1], given))
                      for given in (text, noisy)]
        assert all(torch.equal(a, b) for a, b in zip(*passes)), "the cached pass reads padded text"

    def test_other_words_give_other_noise_at_every_token(self):
        """A block built with ``spec.text_width`` is text-conditioned: one that never reads the caption
        passes every other check, and its flow would train unconditionally without a word said. Other
        real text tokens must move the z of every token of their video (the empty caption stays as it is:
        padding is never read)."""
        block = self.make_block("flip_within_frame", text=True)
        x = self.sequence()
        text = self.make_text(x.shape[0])
        words = torch.randn(text.tokens.shape, generator=torch.Generator().manual_seed(4))
        other = TextEmbedding(words * text.mask[..., None], text.mask)
        with torch.no_grad():
            moved = (block(x, text)[0] - block(x, other)[0]).abs().amax(dim=-1)  # (B, N)
        captioned = text.mask.any(dim=1)
        unmoved = (moved[captioned] == 0).nonzero()[:, 1].unique().tolist()
        assert not unmoved, (f"the block ignores its caption (spec.text_width={block.spec.text_width}): other "
                             f"words leave z unchanged at tokens {unmoved} of {x.shape[1]}")

    def test_a_caption_longer_than_the_video_is_read_whole_in_the_forward_pass(self):
        """Captions of T5's 256 tokens outnumber a small video's tokens: the training forward pass (which
        may split its queries into chunks) must read the same text as the sampler's cached passes."""
        block = self.make_block("flip_within_frame", text=True)
        x = self.sequence(frames=4)
        passes = CachedPasses(block, x, self.make_text(x.shape[0], length=256))
        passes.check(0, passes.num_slots, "every slot at once")

    def test_logdet_and_z_stay_fp32_under_bf16_autocast(self):
        block = self.make_block()
        x = self.sequence()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = block(x)
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32, (
            f"under bf16 autocast the block returned z as {z.dtype} and logdet as {logdet.dtype}: compute the "
            "affine step and the log-det in fp32 (the network may run in bf16)")
        z32, logdet32 = block(x)
        gap = (logdet - logdet32).abs().max().item()
        assert gap < 0.1, f"the log-det under bf16 autocast differs from fp32's by {gap:.3g} (0.1 at most)"

    def test_state_dict_round_trip(self):
        block = self.make_block(text=True)
        twin = self.make_block(text=True, seed=7)
        twin.load_state_dict(block.state_dict())
        x = self.sequence()
        text = self.make_text(x.shape[0])
        with torch.no_grad():
            assert torch.equal(block(x, text)[0], twin(x, text)[0])

    def make_flow(self, conditioned: bool) -> GlobalLocalFlow:
        """A tiny GlobalLocalFlow whose shallow and deep blocks are all the block under test."""
        torch.manual_seed(0)
        flow = GlobalLocalFlow(self.channels, self.frame_size, num_shallow=2, shallow_width=32, shallow_depth=1,
                               deep_width=32, deep_depth=2, head_dim=16,
                               text_width=self.text_width if conditioned else None,
                               shallow_block=self.build_block, deep_block=self.build_block)
        perturb_parameters(flow, std=0.05)
        return flow.eval()

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_the_samplers_invert_a_flow_of_these_blocks(self, conditioned):
        """In a GlobalLocalFlow (frame-local shallow blocks in both directions, then the deep block over the
        whole video), the exact sampler and Jacobi, which drives the cache every way above, bring x back."""
        flow = self.make_flow(conditioned)
        x = torch.randn(2, 3, *self.frame_size, self.channels, generator=torch.Generator().manual_seed(3))
        text = self.make_text(x.shape[0]) if conditioned else None
        with torch.no_grad():
            z, _ = flow(x, text)
        for sampler in (SequentialSampler(), JacobiSampler(tol=1e-6)):
            torch.testing.assert_close(sampler.sample(flow, z, text), x, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{type(sampler).__name__} did not invert the flow: {m}")
