"""Core rules added for CodeGen's fixed mp_num blocks and DeBERTa's (heads, -1) head view (numpy only)."""

import numpy as np

from graphgrow.core.plan import WidenPlan
from graphgrow.core.sites import rescale_shape
from graphgrow.core.spaces import SpaceTable


def _qkv_plan(head_counts):
    """A fused [q | v | k] space of 4 blocks x 3 pieces x 16 channels (one head of 16 per piece and block)."""
    table = SpaceTable()
    sp = table.new_space("qkv", 192, "produced")
    counts = np.ones(192, np.int64)
    for block, c in enumerate(head_counts):  # (q, v and k of a head take the same count: the attention ties them)
        counts[block * 48:(block + 1) * 48] = c
    return sp, WidenPlan(table, counts, units={sp.id: 16}, block_layouts={sp.id: (4, 3)})


def test_block_layout_cuts_each_piece_back_into_the_blocks():
    """4 heads to 6 (heads 0 and 2 copied): each piece's head sequence q0 q0 q1 q2 q2 q3 (96 channels) is cut into
    4 blocks of 24, so a head straddles blocks, exactly as CodeGen's split(local_dim) and reshape read it."""
    sp, plan = _qkv_plan([2, 1, 2, 1])
    g = plan.mapping(sp)
    assert len(g) == 288
    blocks = g.reshape(4, 3, 24)  # (block, piece, local)
    for piece in range(3):
        seq = blocks[:, piece, :].ravel()  # the piece read across the blocks, as the family reads q, v, k
        heads = seq.reshape(6, 16)
        old_heads = heads // 48  # (old head = old block: one head per block)
        assert (old_heads == old_heads[:, :1]).all()  # every new head is one old head, whole
        assert old_heads[:, 0].tolist() == [0, 0, 1, 2, 2, 3]
        assert (heads % 48 // 16 == piece).all()  # and of the same piece (q stays q)
        assert (heads % 16 == np.arange(16)).all()  # channel by channel


def test_block_layout_whole_factor_keeps_heads_in_their_blocks():
    sp, plan = _qkv_plan([2, 2, 2, 2])
    g = plan.mapping(sp).reshape(4, 3, 32)
    assert ((g // 48) == np.arange(4)[:, None, None]).all()  # block b holds the copies of its own head


def test_heads_literal_with_head_dim_minus_one_follows_the_width():
    """view(B, L, heads, -1) of a space cut into heads of 16: the heads literal grows, head_dim stays."""
    assert rescale_shape([2, 12, 4, -1], [2, 3], 2 * 12 * 64, 2 * 12 * 128, (2, 12, 4, 16), unit=16) == [2, 12, 8, -1]
    # without heads (unit 1) the -1 absorbs the growth, as before
    assert rescale_shape([2, 12, 4, -1], [2, 3], 2 * 12 * 64, 2 * 12 * 128, (2, 12, 4, 16), unit=1) is None
