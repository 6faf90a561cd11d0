"""Conformance tests for flow blocks.

A block plugin's test module subclasses the mixin and says how to build its block::

    from flowvid.testing import FlowBlockConformance

    class TestMyBlock(FlowBlockConformance):
        block_class = MyBlock          # called as block_class(spec, **block_kwargs)
        block_kwargs = {}

pytest then runs every ``test_*`` method below on it: invertibility, the log-determinant against the
autograd Jacobian, causality, KV-cache stepping, fp32 log-det under bf16 autocast and the state-dict
round trip, unconditional and text-conditioned.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from flowvid.flows.base import BlockSpec, FlowBlock
from flowvid.sampling.sequential import invert_block_sequential
from flowvid.text.base import TextEmbedding


def perturb_parameters(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value so that zero-initialised blocks are not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.add_(noise.to(parameter.device, parameter.dtype))


class FlowBlockConformance:
    """Mixin of tests every FlowBlock must pass. Set ``block_class`` (and ``block_kwargs``)."""

    block_class: ClassVar[Any]
    block_kwargs: ClassVar[dict] = {}
    frame_size: ClassVar[tuple[int, int]] = (2, 3)
    channels: ClassVar[int] = 3
    text_width: ClassVar[int] = 8

    def make_block(self, permutation: str = "identity", text: bool = False, seed: int = 0) -> FlowBlock:
        torch.manual_seed(seed)
        spec = BlockSpec(self.channels, self.frame_size, width=32, depth=2, head_dim=16, permutation=permutation,
                         text_width=self.text_width if text else None)
        block = self.block_class(spec, **self.block_kwargs)
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

    @pytest.mark.parametrize("permutation", ["identity", "flip_within_frame"])
    @pytest.mark.parametrize("conditioned", [False, True])
    def test_inverse_of_forward_is_identity(self, permutation, conditioned):
        block = self.make_block(permutation, conditioned)
        x = self.sequence()
        text = self.make_text(x.shape[0]) if conditioned else None
        with torch.no_grad():
            z, _ = block(x, text)
        x_back = invert_block_sequential(block, z, text)
        assert z.dtype == torch.float32
        torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5, msg=lambda m: f"inverse(forward(x)) != x: {m}")

    def batch_jacobian(self, conditioned: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A float64 block's d z / d x over a batch of two two-frame videos, (B*N*C, B*N*C); and x, log-det."""
        block = self.make_block("flip_within_frame", conditioned).double()
        x = self.sequence(batch=2, frames=2).double()
        text = self.make_text(2) if conditioned else None
        if text is not None:
            text = TextEmbedding(text.tokens.double(), text.mask)

        def flat_forward(values):
            return block(values.view_as(x), text)[0].reshape(-1)

        return torch.autograd.functional.jacobian(flat_forward, x.reshape(-1)), x, block(x, text)[1]

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_logdet_matches_autograd_jacobian(self, conditioned):
        """Per element and per sample, over several frames and with text: what the Jacobian says."""
        jacobian, x, logdet = self.batch_jacobian(conditioned)
        assert logdet.shape == x.shape
        size = x[0].numel()
        for b in range(x.shape[0]):
            own = jacobian[b * size:(b + 1) * size, b * size:(b + 1) * size]
            # An autoregressive block's Jacobian is triangular: its diagonal holds each element's log-det.
            # The affine step runs in fp32 whatever the block's dtype: fp32 tolerances.
            torch.testing.assert_close(logdet[b].reshape(-1).double(), own.diagonal().abs().log(), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"sample {b}: per-element log-det against the Jacobian: {m}")
            torch.testing.assert_close(logdet[b].sum().double(), torch.linalg.slogdet(own)[1], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"sample {b}: log-det against the Jacobian's: {m}")

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_samples_of_a_batch_do_not_see_each_other(self, conditioned):
        jacobian, x, _ = self.batch_jacobian(conditioned)
        size = x[0].numel()
        for b, other in ((0, 1), (1, 0)):
            across = jacobian[b * size:(b + 1) * size, other * size:(other + 1) * size]
            assert across.abs().max().item() == 0.0, f"z of sample {b} depends on sample {other} of the batch"

    @pytest.mark.parametrize("permutation", ["identity", "flip_within_frame"])
    @pytest.mark.parametrize("conditioned", [False, True])
    def test_changing_a_token_leaves_earlier_slots_unchanged(self, permutation, conditioned):
        """Every slot in turn: a slot's z depends on that slot and the slots before it, never on later ones."""
        block = self.make_block(permutation, conditioned)
        x = self.sequence()
        text = self.make_text(x.shape[0]) if conditioned else None
        with torch.no_grad():
            z = block.permutation.forward(block(x, text)[0])
            for slot in range(x.shape[1]):
                changed = block.permutation.forward(x).clone()
                changed[:, slot] += 1.0
                z_changed = block.permutation.forward(block(block.permutation.inverse(changed), text)[0])
                assert torch.equal(z[:, :slot], z_changed[:, :slot]), f"slots before {slot} saw slot {slot} change"
                assert not torch.equal(z[:, slot], z_changed[:, slot]), f"slot {slot}'s z ignores its own value"

    @pytest.mark.parametrize("conditioned", [False, True])
    def test_kv_cache_steps_equal_full_forward(self, conditioned):
        block = self.make_block("flip_within_frame", conditioned)
        x = self.sequence()
        text = self.make_text(x.shape[0]) if conditioned else None
        with torch.no_grad():
            z_full = block.permutation.forward(block(x, text)[0])
            xp = block.permutation.forward(x)
            inputs = block.shift(xp)
            cache = block.start_inverse(x.shape[0], x.shape[1], text)
            z_steps = []
            for first, count in [(0, 1), (1, 3), (4, x.shape[1] - 4)]:  # uneven runs of slots
                mu, sigma = block.affine(inputs[:, first:first + count], cache)
                cache.advance(count)
                z_steps.append((xp[:, first:first + count] - mu) / sigma)
        torch.testing.assert_close(torch.cat(z_steps, dim=1), z_full, rtol=1e-5, atol=1e-5)

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

    def test_a_caption_longer_than_the_video_is_read_whole_in_the_forward_pass(self):
        """Captions of T5's 256 tokens outnumber a small video's tokens: the training forward pass (which
        may split its queries into chunks) must read the same text as the sampler's cached passes."""
        block = self.make_block("flip_within_frame", text=True)
        x = self.sequence(frames=4)
        text = self.make_text(x.shape[0], length=256)
        with torch.no_grad():
            z_full = block.permutation.forward(block(x, text)[0])
            xp = block.permutation.forward(x)
            cache = block.start_inverse(x.shape[0], x.shape[1], text)
            mu, sigma = block.affine(block.shift(xp), cache)
        torch.testing.assert_close((xp - mu) / sigma, z_full, rtol=1e-5, atol=1e-5)

    def test_logdet_and_z_stay_fp32_under_bf16_autocast(self):
        block = self.make_block()
        x = self.sequence()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = block(x)
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32
        z32, logdet32 = block(x)
        assert (logdet - logdet32).abs().max() < 0.1  # bf16 network, fp32 affine step

    def test_state_dict_round_trip(self):
        block = self.make_block(text=True)
        twin = self.make_block(text=True, seed=7)
        twin.load_state_dict(block.state_dict())
        x = self.sequence()
        text = self.make_text(x.shape[0])
        with torch.no_grad():
            assert torch.equal(block(x, text)[0], twin(x, text)[0])
