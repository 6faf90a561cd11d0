"""The state of inverting one flow block, which samplers drive run by run.

A block maps data to noise slot by slot in its own (permuted) token order::

    z_s = (x_s - mu_s) / sigma_s,   (mu_s, sigma_s) = f(x_0, ..., x_{s-1}, text)

so the inverse ``x_s = mu_s + sigma_s * z_s`` needs every earlier slot first. ``BlockInversion`` holds
the values ``x`` found so far, the noise and the block's KV cache. ``propose(n)`` evaluates the next
``n`` slots from the current values of the slots before them (one parallel pass that writes their
keys/values); ``commit(n)`` makes the first ``n`` of them final. Proposing again without committing
overwrites the same cache slots: that is how Jacobi iterations revise a run. A pass may cover only
some of the videos (``propose(n, samples)``): the others keep their values and keys/values.

With guidance the cache holds two batches, ``[cond; uncond]``; both are fed the same guided values,
so the unconditional branch shares the guided history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowvid.flows.base import FlowBlock
from flowvid.flows.guidance import guided_affine
from flowvid.nn.kv_cache import KVCache
from flowvid.text.base import TextEmbedding


def _pad_text(text: TextEmbedding, length: int) -> TextEmbedding:
    missing = length - text.tokens.shape[1]
    return TextEmbedding(F.pad(text.tokens, (0, 0, 0, missing)), F.pad(text.mask.bool(), (0, missing)))


def guidance_batch(cond: TextEmbedding, uncond: TextEmbedding) -> TextEmbedding:
    """``[cond; uncond]`` as one batch, padding the shorter text and repeating a batch-1 ``uncond``."""
    length = max(cond.tokens.shape[1], uncond.tokens.shape[1])
    cond, uncond = _pad_text(cond, length), _pad_text(uncond, length)
    if uncond.tokens.shape[0] == 1:
        batch = cond.tokens.shape[0]
        uncond = TextEmbedding(uncond.tokens.expand(batch, -1, -1), uncond.mask.expand(batch, -1))
    return TextEmbedding.cat([cond, uncond.to(cond.tokens.device, cond.tokens.dtype)])


class BlockInversion:
    """Inverting ``block`` for noise ``z`` (B, N, C) given in natural token order.

    Args:
        block: the flow block.
        z: its noise, natural order.
        text: the caption's text states (deep block only).
        uncond: the unconditional text states; required when ``guidance > 0``.
        guidance: the guidance weight ``w``; 0 runs the conditional branch alone.
    """

    def __init__(self, block: FlowBlock, z: torch.Tensor, text: TextEmbedding | None = None,
                 uncond: TextEmbedding | None = None, guidance: float = 0.0):
        self.block = block
        self.guidance = guidance
        self.z = block.permutation.forward(z.float())
        # Slot values: final below ``done``, current guesses above it (samplers write the guesses).
        self.x = self.z.clone()
        # The affine parameters of the latest pass over each slot (warm starts reuse them).
        self.mu = torch.zeros_like(self.z)
        self.sigma = torch.ones_like(self.z)
        self.done = 0
        batch, num_tokens, _ = z.shape
        if guidance > 0:
            text = guidance_batch(text, uncond)
            batch *= 2
        self.cache = block.start_inverse(batch, num_tokens, text)

    @property
    def num_slots(self) -> int:
        return self.z.shape[1]

    def inputs(self, first: int, count: int) -> torch.Tensor:
        """The shifted inputs of slots ``[first, first + count)``: slot s reads the value of slot s - 1."""
        if first == 0:
            start = self.block.start_token(self.x.shape[0]).to(self.x.dtype)
            return torch.cat([start, self.x[:, :count - 1]], dim=1)
        return self.x[:, first - 1:first + count - 1]

    def _affine(self, inputs: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache if cache is None else cache
        if self.guidance <= 0:
            return self.block.affine(inputs, cache)
        mu, sigma = self.block.affine(torch.cat([inputs, inputs]), cache)
        mu_cond, mu_uncond = mu.chunk(2)
        sigma_cond, sigma_uncond = sigma.chunk(2)
        return guided_affine(mu_cond, sigma_cond, mu_uncond, sigma_uncond, self.guidance)

    def prefill(self, tokens: torch.Tensor) -> None:
        """Make known values (B, n, C), natural order, the first ``n`` slots: one parallel pass."""
        count = tokens.shape[1]
        if self.done:
            raise RuntimeError("prefill must come before any other slot is final")
        self.x[:, :count] = self.block.permutation.forward(tokens.float())
        self.mu[:, :count], self.sigma[:, :count] = self._affine(self.inputs(0, count))
        self.commit(count)

    def propose(self, count: int, samples: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 values of slots ``[done, done + count)`` given the current values before them, of every
        video or of the videos ``samples`` (ascending indices) only."""
        first = self.done
        run = slice(first, first + count)
        if samples is None or len(samples) == self.x.shape[0]:
            mu, sigma = self._affine(self.inputs(first, count))
            self.mu[:, run], self.sigma[:, run] = mu, sigma
            return mu + sigma * self.z[:, run]
        mu, sigma = self._affine(self.inputs(first, count)[samples], self.cache.rows(self._cache_rows(samples)))
        self.mu[samples, run], self.sigma[samples, run] = mu, sigma
        return mu + sigma * self.z[samples, run]

    def rehearse(self, count: int) -> None:
        """A pass over the next ``count`` slots of the first video that changes nothing: its results and
        keys/values are dropped. A rank whose videos are all done runs it while another rank's still move,
        so that models sharded over the ranks (FSDP, ZeRO-3) see every rank in every pass."""
        first_video = self._cache_rows(torch.zeros(1, dtype=torch.long, device=self.x.device))
        self._affine(self.inputs(self.done, count)[:1], self.cache.rows(first_video, keep=False))

    def _cache_rows(self, samples: torch.Tensor) -> torch.Tensor:
        """The cache rows of videos ``samples``: with guidance, their conditional and unconditional rows."""
        return samples if self.guidance <= 0 else torch.cat([samples, samples + self.x.shape[0]])

    def commit(self, count: int) -> None:
        """The next ``count`` slots are final (their values must be in ``x``, their K/V in the cache)."""
        self.cache.advance(count)
        self.done += count

    def result(self) -> torch.Tensor:
        """All slot values in natural token order (B, N, C)."""
        return self.block.permutation.inverse(self.x)

    def frame(self, index: int, tokens_per_frame: int) -> torch.Tensor:
        """The values of frame ``index`` in natural order, for blocks whose order keeps frames in place."""
        first = index * tokens_per_frame
        return self.block.permutation.inverse(self.x[:, first:first + tokens_per_frame])
