"""The STARFlow meta-block: a causal transformer predicts a per-token affine map of the next token.

Data to noise, in the block's token order::

    inputs_s = sos if s == 0 else x_{s-1}          # so token 0 is transformed too
    a_s, mu_s = 4 tanh(proj_out(transformer(inputs)_s) / 4)
    sigma_s   = softplus(a_s + softplus^-1(1))      # sigma = 1 when a = 0
    z_s       = (x_s - mu_s) / sigma_s,   log|det| = -sum log sigma_s

The output projection starts at zero, so every block starts as the identity. The projection, the
affine step and the log-determinant run in fp32 whatever the autocast context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowvid.checks import check_positive
from flowvid.flows.base import BlockSpec, FlowBlock
from flowvid.nn.attention import BandedMask, prefix_causal_bands, prefix_causal_mask
from flowvid.nn.kv_cache import KVCache
from flowvid.nn.rope import rope_angles
from flowvid.nn.transformer import TransformerLayer
from flowvid.registry import BLOCKS, PERMUTATIONS
from flowvid.text.base import TextEmbedding

SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus^-1(1) = 0.5413...
SOFT_CLIP = 4.0
#: Rotation tables a block keeps (one per run of slots it was asked for); beyond that it starts over.
ROTATION_CACHE_SIZE = 256


class FP32RMSNorm(nn.Module):
    """RMSNorm with a zero-initialised gain applied as (1 + w), computed in fp32."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps)


class FP32Linear(nn.Linear):
    """A linear layer computed in fp32 whatever the autocast context or the dtype its weights are kept in
    (DeepSpeed keeps them in bf16). The block calls it as a module rather than reading its weights, so
    that DeepSpeed ZeRO-3 gathers them when it runs (and finds them where its trace of the step says)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def affine_parameters(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mu, sigma) from the raw 2C-channel output of a block."""
    raw = SOFT_CLIP * torch.tanh(raw.float() / SOFT_CLIP)
    log_scale, mu = raw.chunk(2, dim=-1)
    return mu, F.softplus(log_scale + SOFTPLUS_INV_ONE)


@BLOCKS.register("affine")
class AffineBlock(FlowBlock):
    """Causal transformer autoregressive flow block (the STARFlow meta-block)."""

    def __init__(self, spec: BlockSpec, mlp_ratio: float = 4.0, rope_theta: float = 10000.0):
        super().__init__()
        # A rope_theta <= 0 gives NaN rotation angles, so a NaN likelihood at every step.
        for name, value in (("mlp_ratio", mlp_ratio), ("rope_theta", rope_theta)):
            check_positive(f"{type(self).__name__} {name}", value)
        self.spec = spec
        self.mlp_ratio = mlp_ratio
        self.rope_theta = rope_theta
        self.permutation = PERMUTATIONS.get(spec.permutation)(spec.tokens_per_frame)
        self.sos = nn.Parameter(torch.randn(1, 1, spec.channels))
        self.proj_in = nn.Linear(spec.channels, spec.width)
        self.proj_text = nn.Linear(spec.text_width, spec.width) if spec.text_width else None
        self.layers = nn.ModuleList(self.make_layer() for _ in range(spec.depth))
        self.norm_out = FP32RMSNorm(spec.width)
        self.proj_out = FP32Linear(spec.width, 2 * spec.channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self._rotations: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_layer(self) -> nn.Module:
        """One transformer layer; plugins override this to change the layer."""
        return TransformerLayer(self.spec.width, self.spec.head_dim, mlp_ratio=self.mlp_ratio)

    # --- positions -------------------------------------------------------------------------
    def _rotation(self, first_slot: int, count: int, device: torch.device,
                  prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``prefix`` unrotated text positions, then slots ``[first_slot, first_slot + count)``.

        Slot s predicts the token at natural position ``permutation.index[s]``; it is rotated by that
        token's (x, y, frame) position. Frame-local blocks see every frame as frame 0. The tables
        depend only on these arguments, so they are built once and reused (training asks for the same
        ones every step, samplers for the whole sequence on every pass).
        """
        if torch.compiler.is_compiling():  # built in the graph: a cache would add a guard, and a recompilation
            return self._build_rotation(first_slot, count, device, prefix)
        # Tables made in inference mode are inference tensors, which autograd cannot save for a backward pass.
        key = (first_slot, count, prefix, device, torch.is_inference_mode_enabled())
        if key not in self._rotations:
            if len(self._rotations) >= ROTATION_CACHE_SIZE:
                self._rotations.clear()
            self._rotations[key] = self._build_rotation(first_slot, count, device, prefix)
        return self._rotations[key]

    def _build_rotation(self, first_slot: int, count: int, device: torch.device,
                        prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_frame = self.spec.tokens_per_frame
        num_tokens = first_slot + count
        frames = 1 if self.spec.frame_local else -(-num_tokens // per_frame)
        angles = rope_angles(self.spec.frame_size, frames, self.spec.head_dim, self.rope_theta).to(device)
        padded = -(-num_tokens // per_frame) * per_frame
        natural = self.permutation.index(padded, device)[first_slot:num_tokens]
        if self.spec.frame_local:
            natural = natural % per_frame
        angles = torch.cat([angles.new_zeros(prefix, angles.shape[1]), angles[natural]])
        return angles.cos(), angles.sin()

    # --- data -> noise ---------------------------------------------------------------------
    def start_token(self, batch: int) -> torch.Tensor:
        return self.sos.float().expand(batch, 1, -1)

    def _text_states(self, text: TextEmbedding | None, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if text is None or self.proj_text is None:
            return None, None
        tokens, mask = text
        if tokens.shape[0] != batch:
            raise ValueError(f"text batch {tokens.shape[0]} does not match video batch {batch}")
        return self.proj_text(tokens), mask.bool()

    def _run(self, inputs: torch.Tensor, cos, sin, text_states, mask, cache=None) -> torch.Tensor:
        """The raw fp32 outputs of the video tokens; ``cos``/``sin`` cover the text positions too."""
        h = self.proj_in(inputs)
        prefix = 0
        if text_states is not None and cache is None:
            prefix = text_states.shape[1]
            h = torch.cat([text_states, h], dim=1)
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, index)
        with torch.autocast(h.device.type, enabled=False):
            return self.proj_out(self.norm_out(h[:, prefix:]))

    def forward(self, x: torch.Tensor, text: TextEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_tokens, _ = x.shape
        x = x.float()
        xp = self.permutation.forward(x)
        text_states, text_valid = self._text_states(text, batch)
        prefix = 0 if text_states is None else text_states.shape[1]
        cos, sin = self._rotation(0, num_tokens, x.device, prefix)
        mask = None
        if text_states is not None:
            total = prefix + num_tokens
            mask = BandedMask(prefix_causal_mask(total, 0, total, text_valid), prefix_causal_bands(total, 0, total, prefix))
        inputs = self.shift(xp).to(self.proj_in.weight.dtype)
        raw = self._run(inputs, cos, sin, text_states, mask)
        mu, sigma = affine_parameters(raw)
        z = (xp - mu) / sigma
        return self.permutation.inverse(z), self.permutation.inverse(-torch.log(sigma))

    # --- noise -> data (driven by a sampler) ----------------------------------------------------
    def start_inverse(self, batch: int, num_tokens: int, text: TextEmbedding | None = None,
                      dtype: torch.dtype | None = None) -> KVCache:
        device = self.proj_in.weight.device
        text_states, text_valid = self._text_states(text, batch)
        prefix = 0 if text_states is None else text_states.shape[1]
        cache = KVCache(len(self.layers), batch, self.spec.width // self.spec.head_dim, self.spec.head_dim,
                        prefix + num_tokens, device=device, dtype=dtype or self.proj_in.weight.dtype)
        if prefix:
            cache.key_valid[:, :prefix] = text_valid
            cos, sin = self._rotation(0, 0, device, prefix)
            mask = prefix_causal_mask(prefix, 0, prefix, text_valid)
            h = text_states
            for index, layer in enumerate(self.layers):
                h = layer(h, cos, sin, mask, cache, index)
            cache.advance(prefix)
        cache.prefix = prefix
        return cache

    def affine(self, inputs: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (mu, sigma) of slots ``[cache position, + n)``; writes their keys/values, no advance."""
        prefix = cache.prefix
        first = cache.length
        count = inputs.shape[1]
        # Slots take their positions from the whole sequence, as in the forward pass: where a slot's token
        # sits can depend on the sequence's length (``flip`` reverses it).
        slots = slice(first - prefix, first - prefix + count)
        cos, sin = (table[slots] for table in self._rotation(0, cache.capacity - prefix, inputs.device))
        mask = None  # one query with a cache: every cached key is visible
        if count > 1 or prefix:
            valid = cache.key_valid[:, :prefix] if prefix else None
            mask = prefix_causal_mask(count, first, first + count, valid, device=inputs.device)
        raw = self._run(inputs.to(self.proj_in.weight.dtype), cos, sin, None, mask, cache)
        return affine_parameters(raw)
