"""An alternative flow block: QK-normalised attention and a SwiGLU feed-forward.

It is registered through the ``flowvid.blocks`` entry point as ``gated``, so a recipe selects it
with ``deep_block: gated`` (or its ``class_path``), and it passes the same conformance kit as the
built-in block.
"""

from __future__ import annotations

from torch import nn

from flowvid.flows.autoregressive import AffineBlock
from flowvid.flows.base import BlockSpec
from flowvid.nn.mlp import SwiGLU
from flowvid.nn.transformer import TransformerLayer


class GatedAffineBlock(AffineBlock):
    """The STARFlow meta-block with QK-norm attention and SwiGLU layers."""

    def __init__(self, spec: BlockSpec, mlp_ratio: float = 4.0, rope_theta: float = 10000.0):
        super().__init__(spec, mlp_ratio=mlp_ratio, rope_theta=rope_theta)

    def make_layer(self) -> nn.Module:
        width = self.spec.width
        return TransformerLayer(width, self.spec.head_dim, mlp=SwiGLU(width, self.mlp_ratio), qk_norm=True)
