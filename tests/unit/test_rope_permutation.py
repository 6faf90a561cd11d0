"""Rotary positions of a permuted block: slot s is rotated by the (x, y, frame) position of the token it
predicts, ``permutation.index[s]``, not by its own place in the block's order.

A table that ignored the permutation would still be the same in the forward and the inverse pass, so
no inversion or log-determinant test can see it; these check the table itself.
"""

import pytest
import torch

from flowvid.flows import AffineBlock
from flowvid.flows.base import BlockSpec
from flowvid.nn.rope import rope_angles

FRAME = (2, 3)  # 6 tokens per frame, in raster order: natural position n is row n // 3, column n % 3
HEAD_DIM = 8


def block(permutation: str, frame_local: bool = False) -> AffineBlock:
    return AffineBlock(BlockSpec(3, FRAME, width=16, depth=1, head_dim=HEAD_DIM, permutation=permutation,
                                 frame_local=frame_local))


def expected_rotation(natural: list[int], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the natural positions, read off the raster-order table of the whole video."""
    angles = rope_angles(FRAME, frames, HEAD_DIM)[natural]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("permutation, frame_local, first_slot, count, frames, natural", [
    # Reversed inside each frame, frame order kept: the deep block's frame-causal order.
    ("flip_within_frame", False, 0, 12, 2, [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6]),
    ("flip_within_frame", False, 7, 4, 2, [10, 9, 8, 7]),  # a run of slots, as a Jacobi pass asks for
    # The whole sequence reversed: the first slots of a two-frame video predict the last tokens of frame 1.
    ("flip", False, 0, 12, 2, list(range(11, -1, -1))),
    # A frame-local block sees every frame as frame 0.
    ("flip", True, 0, 6, 1, [5, 4, 3, 2, 1, 0]),
])
def test_a_slot_is_rotated_by_the_position_of_the_token_it_predicts(permutation, frame_local, first_slot, count,
                                                                    frames, natural):
    cos, sin = block(permutation, frame_local)._rotation(first_slot, count, torch.device("cpu"))
    expected_cos, expected_sin = expected_rotation(natural, frames)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)


def test_text_positions_before_the_slots_are_not_rotated():
    cos, sin = block("flip_within_frame")._rotation(0, 6, torch.device("cpu"), prefix=2)
    assert torch.equal(cos[:2], torch.ones(2, HEAD_DIM // 2)) and torch.equal(sin[:2], torch.zeros(2, HEAD_DIM // 2))
    expected_cos, expected_sin = expected_rotation([5, 4, 3, 2, 1, 0], frames=1)
    torch.testing.assert_close(cos[2:], expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[2:], expected_sin, rtol=0, atol=0)


def test_the_identity_order_rotates_each_slot_by_its_own_position():
    cos, sin = block("identity")._rotation(0, 12, torch.device("cpu"))
    expected_cos, expected_sin = expected_rotation(list(range(12)), frames=2)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)
