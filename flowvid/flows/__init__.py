"""Normalizing-flow blocks and the global-local video flow."""

from flowvid.flows.autoregressive import AffineBlock, affine_parameters
from flowvid.flows.base import BlockFactory, BlockSpec, FlowBlock
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.flows.permutations import FlipWithinFrame, Flip, Identity, Permutation
from flowvid.flows.presets import PRESETS

__all__ = [
    "AffineBlock", "BlockFactory", "BlockSpec", "Flip", "FlipWithinFrame", "FlowBlock", "GlobalLocalFlow",
    "Identity", "PRESETS", "Permutation", "affine_parameters",
]
