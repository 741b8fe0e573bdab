"""graphgrow.core.moe's expert-growth arithmetic (numpy only): where each grown expert comes from, in place and
by groups, the copy sets the layer check rotates within, and a repeat piece's scale and layout."""

import numpy as np
import pytest

from graphgrow.core.moe import Piece, apply_piece, copy_sets, source_expert


def test_in_place_repeat():
    assert [source_expert(e, 4, 2) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert copy_sets(4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert copy_sets(1, 8) == [list(range(8))]  # an upcycle: every expert a copy of the dense MLP


def test_groups_repeated_as_blocks():
    # 8 experts in 2 groups of 4, x2: grown groups (0, 0), (0, 1), (1, 0), (1, 1), each a copy of a source group
    assert [source_expert(e, 8, 2, groups=2) for e in range(16)] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    assert copy_sets(8, 2, groups=2)[5] == [9, 13]
    sets = copy_sets(6, 3, groups=3)
    assert sorted(i for s in sets for i in s) == list(range(18)) and all(len(s) == 3 for s in sets)


@pytest.mark.parametrize("groups", [1, 2])
def test_repeat_piece_layout_and_scale(groups):
    src = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    piece = Piece("w", (16, 3), "repeat", ("w",), copies=2, axis=0, scale=0.5, groups=groups)
    out = apply_piece(piece, lambda k: src)
    assert out.shape == (16, 3) and out.dtype == np.float64
    for e in range(16):
        assert np.array_equal(out[e], src[source_expert(e, 8, 2, groups)] * 0.5)
    plain = apply_piece(Piece("w", (16, 3), "repeat", ("w",), copies=2, axis=0, groups=groups), lambda k: src)
    assert plain.dtype == np.float32  # (an unscaled repeat keeps the stored dtype: bit-identical copies)


def test_repeat_on_a_later_axis():
    bias = np.arange(4, dtype=np.float32).reshape(1, 4)  # ERNIE's (1, E) score correction
    out = apply_piece(Piece("b", (1, 8), "repeat", ("b",), copies=2, axis=1), lambda k: bias)
    assert out.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
