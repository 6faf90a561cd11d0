"""Token orders of a block. Each permutation is its own inverse, applied on the token axis (dim 1)."""

from __future__ import annotations

import torch

from flowvid.registry import PERMUTATIONS


class Permutation:
    """Reorders tokens of a (B, N, C) sequence made of frames of ``tokens_per_frame`` tokens."""

    def __init__(self, tokens_per_frame: int):
        self.tokens_per_frame = tokens_per_frame

    def index(self, num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
        """``index[s]`` is the natural position of the token at slot ``s``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index(x.shape[1], x.device))

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        index = self.index(x.shape[1], x.device)
        return x.index_select(1, torch.argsort(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tokens_per_frame={self.tokens_per_frame})"


@PERMUTATIONS.register("identity")
class Identity(Permutation):
    def index(self, num_tokens, device=None):
        return torch.arange(num_tokens, device=device)

    def forward(self, x):
        return x

    def inverse(self, x):
        return x


@PERMUTATIONS.register("flip")
class Flip(Permutation):
    """Reverses the whole sequence (only for blocks that see one frame; it breaks frame causality)."""

    def index(self, num_tokens, device=None):
        return torch.arange(num_tokens - 1, -1, -1, device=device)

    def forward(self, x):
        return x.flip(1)

    def inverse(self, x):
        return x.flip(1)


@PERMUTATIONS.register("flip_within_frame")
class FlipWithinFrame(Permutation):
    """Reverses the order inside every frame and keeps the frame order (frame-causal)."""

    def index(self, num_tokens, device=None):
        per_frame = self.tokens_per_frame
        if num_tokens % per_frame:
            raise ValueError(f"{num_tokens} tokens are not whole frames of {per_frame}")
        return torch.arange(num_tokens, device=device).view(-1, per_frame).flip(1).reshape(-1)

    def forward(self, x):
        return x.unflatten(1, (-1, self.tokens_per_frame)).flip(2).flatten(1, 2)

    def inverse(self, x):
        return self.forward(x)
