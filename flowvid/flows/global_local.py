"""GlobalLocalFlow: shallow flows on each frame on its own, then one deep flow over the whole video.

Data to noise::

    x (B, T, h, w, c) --[shallow block 1..S, each frame alone]--> u --[deep block, all tokens,
    time-major, sees the text]--> z (B, T, h, w, c)

Every shallow block sees one frame, and the deep block is causal over the time-major token order, so
the flow is frame-causal: changing frame n never changes z of frames < n, and the likelihood
factorises over frames.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral
from typing import Any, Union

import torch
from torch import nn

from flowvid.flows.base import BlockFactory, BlockSpec, FlowBlock
from flowvid.flows.presets import PRESETS
from flowvid.registry import BLOCKS, resolve
from flowvid.text.base import TextEmbedding

LOG_2PI = math.log(2 * math.pi)

BlockChoice = Union[str, BlockFactory]


#: Compiled variants each block may need (see ``GlobalLocalFlow.compile_blocks``), with room to spare.
VARIANTS_PER_BLOCK = 8


class GlobalLocalFlow(nn.Module):
    """The STARFlow-V flow.

    Args:
        latent_channels: c, channels per latent token.
        frame_size: (h, w), latent tokens per frame side.
        num_shallow: number of frame-local blocks (their direction alternates inside the frame); 0 leaves
            the deep block alone.
        shallow_width, shallow_depth: width and layers of each shallow block.
        deep_width, deep_depth: width and layers of the deep block.
        head_dim: attention head size of every block.
        text_width: width of the text encoder's token states; None for an unconditional model.
        shallow_block, deep_block: a registered block name or a factory ``BlockSpec -> FlowBlock``
            (in YAML: ``class_path`` + ``init_args`` of a block class whose first argument is the spec).
    """

    def __init__(
        self,
        latent_channels: int,
        frame_size: tuple[int, int],
        num_shallow: int = 2,
        shallow_width: int = 64,
        shallow_depth: int = 2,
        deep_width: int = 128,
        deep_depth: int = 4,
        head_dim: int = 32,
        text_width: int | None = None,
        shallow_block: BlockChoice = "affine",
        deep_block: BlockChoice = "affine",
    ):
        super().__init__()
        _check_sizes(latent_channels=latent_channels, num_shallow=num_shallow, shallow_width=shallow_width,
                     shallow_depth=shallow_depth, deep_width=deep_width, deep_depth=deep_depth, head_dim=head_dim)
        _check_frame_size(frame_size)
        if text_width is not None:
            _check_size("text_width", text_width, minimum=1)
        _check_block_choice("shallow_block", shallow_block)
        _check_block_choice("deep_block", deep_block)
        self.latent_channels = latent_channels
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.text_width = text_width
        shallow_factory: BlockFactory = resolve(BLOCKS, shallow_block)
        deep_factory: BlockFactory = resolve(BLOCKS, deep_block)
        shallow_spec = BlockSpec(latent_channels, self.frame_size, shallow_width, shallow_depth, head_dim,
                                 frame_local=True)
        # Counting back from the deep block (natural order), directions alternate: the shallow block
        # next to it reads each frame backwards.
        self.shallow = nn.ModuleList(
            shallow_factory(replace(shallow_spec, permutation="flip" if (num_shallow - i) % 2 else "identity"))
            for i in range(num_shallow)
        )
        self.deep = deep_factory(
            BlockSpec(latent_channels, self.frame_size, deep_width, deep_depth, head_dim, text_width=text_width)
        )
        for block in self.blocks:
            if not isinstance(block, FlowBlock):
                raise TypeError(f"block factories must build FlowBlocks, got {type(block).__name__}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GlobalLocalFlow":
        """A named configuration (``tiny``, ``demo``, ``starflow-v-7b``, ...) with keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def blocks(self) -> list[FlowBlock]:
        """All blocks in data-to-noise order: shallow ones, then the deep one."""
        return [*self.shallow, self.deep]

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_size[0] * self.frame_size[1]

    def compile_blocks(self, **options: Any) -> None:
        """Compile the forward pass of every block with ``torch.compile`` (blocks already compiled stay as
        they are); the samplers, which call the blocks' ``affine``, stay eager.

        Blocks of one class share one compiled function, and each block compiles its own variants of it
        (its permutation, weight shapes, whether its input needs gradients, training or validation):
        torch's limit of 8 variants per function is raised, so that the later blocks of a deep flow are
        not silently left to run eagerly. Shapes are static by default (``dynamic=False``): the shallow
        blocks see every frame as a sample and the deep block whole videos, and torch would otherwise
        compile the shared function for any batch size, into slower kernels (a demo training step took
        0.91 s instead of 0.79 s eagerly, after 100 s of compilation instead of 28).
        """
        config = torch._dynamo.config  # cache_size_limit: recompile_limit's name in every torch from 2.4 on
        config.cache_size_limit = max(config.cache_size_limit, VARIANTS_PER_BLOCK * len(self.blocks))
        options = {"dynamic": False, **options}
        for block in self.blocks:
            if block._compiled_call_impl is None:
                block.compile(**options)

    # --- checks -----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, text: TextEmbedding | None = None) -> TextEmbedding | None:
        """Raise a ValueError naming expected and actual shapes before any computation.

        Returns ``text`` with its tokens in the flow's dtype (a caller may hand over float64 states).
        """
        h, w = self.frame_size
        expected = f"(B, T, {h}, {w}, {self.latent_channels})"
        if x.dim() != 5:
            raise ValueError(f"expected latents of shape {expected}, got rank {x.dim()} shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (h, w, self.latent_channels):
            raise ValueError(f"expected latents of shape {expected}, got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"expected latents of shape {expected} with B >= 1 and T >= 1, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point latents, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("latents contain NaN or infinite values")
        if text is None:
            return None
        if self.text_width is None:
            raise ValueError("this flow is unconditional (text_width=None) but text was given")
        tokens, mask = text
        if tokens.dim() != 3 or tokens.shape[-1] != self.text_width or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"expected text tokens of shape ({x.shape[0]}, L, {self.text_width}), "
                             f"got {tuple(tokens.shape)}")
        if tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"text mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}")
        return TextEmbedding(self.check_text_tokens(tokens), mask)

    def check_text_tokens(self, tokens: torch.Tensor, what: str = "text tokens") -> torch.Tensor:
        """Finite floating-point text states, cast to the flow's dtype; a ValueError otherwise."""
        if not tokens.is_floating_point():
            raise ValueError(f"expected floating-point {what} (the text encoder's states), got {tokens.dtype}")
        if not torch.isfinite(tokens).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return tokens.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flow's parameters."""
        return next(self.parameters()).dtype

    # --- data -> noise ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, text: TextEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, T, h, w, c) in fp32 and the log-determinant per frame (B, T) in fp32 nats."""
        text = self.check_input(x, text)
        batch, frames = x.shape[:2]
        tokens = x.float().reshape(batch * frames, self.tokens_per_frame, self.latent_channels)
        logdet = torch.zeros(batch * frames, device=x.device)
        for block in self.shallow:
            tokens, block_logdet = block(tokens)
            logdet = logdet + block_logdet.sum(dim=(1, 2))
        logdet = logdet.view(batch, frames)
        sequence = tokens.reshape(batch, frames * self.tokens_per_frame, self.latent_channels)
        z, block_logdet = self.deep(sequence, text)
        logdet = logdet + block_logdet.view(batch, frames, -1).sum(-1)
        return z.view_as(x), logdet

    def forward(self, x: torch.Tensor, text: TextEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, T, h, w, c) and log|det dz/dx| (B,) in fp32 nats, summed over all dimensions."""
        z, logdet = self.encode(x, text)
        return z, logdet.sum(dim=1)

    def nll_per_frame(self, x: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        """Negative log-likelihood of each frame given the earlier ones, nats per dimension (B, T).

        With D_f = h * w * c dimensions per frame::

            nll_f = ( 0.5 * sum(z_f^2) + 0.5 * D_f * ln(2 pi) - logdet_f ) / D_f
        """
        z, logdet = self.encode(x, text)
        dims = self.tokens_per_frame * self.latent_channels
        return (0.5 * z.pow(2).flatten(2).sum(-1) + 0.5 * dims * LOG_2PI - logdet) / dims

    def nll(self, x: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats per dimension (B,), Gaussian constant included::

            nll = ( 0.5 * sum(z^2) + 0.5 * D * ln(2 pi) - logdet ) / D,   D = T * h * w * c
        """
        return self.nll_per_frame(x, text).mean(dim=1)

    def bits_per_dim(self, x: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        """``nll / ln 2`` (B,): bits per dimension of the (noise-augmented) latents."""
        return self.nll(x, text) / math.log(2)


# --- constructor checks ------------------------------------------------------------------------

#: The smallest value each integer size may take. No shallow blocks is allowed: the deep block alone.
MINIMUM_SIZES = {"latent_channels": 1, "num_shallow": 0, "shallow_width": 1, "shallow_depth": 1, "deep_width": 1,
                 "deep_depth": 1, "head_dim": 2}


def _check_sizes(**sizes: Any) -> None:
    """Refuse sizes no block can be built with, before building any (a zero width fails far away, a
    zero channel count gives a NaN likelihood)."""
    for name, value in sizes.items():
        _check_size(name, value, MINIMUM_SIZES[name])
    if sizes["head_dim"] % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {sizes['head_dim']}")


def _check_size(name: str, value: Any, minimum: int) -> None:
    if not _is_size(value, minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _is_size(value: Any, minimum: int = 1) -> bool:
    # bool is an Integral too, but True is never meant as a size.
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum


def _check_frame_size(frame_size: Any) -> None:
    # YAML gives a list, Python code a tuple.
    if not (isinstance(frame_size, (tuple, list)) and len(frame_size) == 2 and all(map(_is_size, frame_size))):
        raise ValueError(f"frame_size must be a pair (h, w) of ints >= 1, got {frame_size!r}")


def _check_block_choice(name: str, choice: Any) -> None:
    if not isinstance(choice, str) and not callable(choice):
        raise ValueError(f"{name} must be a registered block name or a factory BlockSpec -> FlowBlock, "
                         f"got {choice!r} ({type(choice).__name__})")
