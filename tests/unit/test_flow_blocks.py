"""Every built-in and shipped plugin block passes the conformance kit."""

from flowvid.flows import AffineBlock
from flowvid.testing import FlowBlockConformance
from flowvid_plugins.blocks import GatedAffineBlock


class TestAffineBlock(FlowBlockConformance):
    block_class = AffineBlock


class TestGatedAffineBlock(FlowBlockConformance):
    block_class = GatedAffineBlock
