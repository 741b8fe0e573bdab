"""The compact label forms of the ONNX adapter (factored, element) against the full label arrays they stand
for: every shortcut must give exactly the labels the full computation gives."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from graphgrow.core.labels import element_labels, resalt, varying_axes
from graphgrow.core.label_tensor import LabelTensor as LN, keeps_order as _keeps_order, reshaped as _reshaped, resalt_labels, same_labels

SHAPES = st.lists(st.sampled_from([1, 1, 2, 3, 4]), min_size=1, max_size=5).map(tuple)


def _factored(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, size=shape[axis])
    return LN.channels(shape, axis, ids, 7)


def _reshape_targets(shape, rng):
    """Some C-order reshapes of ``shape``: merges and splits of neighbouring axes, size-1 axes added."""
    out = [tuple(shape), (int(np.prod(shape)),), tuple(shape) + (1,), (1,) + tuple(shape)]
    for i in range(len(shape) - 1):
        out.append(tuple(shape[:i]) + (shape[i] * shape[i + 1],) + tuple(shape[i + 2:]))
    for i, d in enumerate(shape):
        for f in (2, 3):
            if d % f == 0 and d > f:
                out.append(tuple(shape[:i]) + (f, d // f) + tuple(shape[i + 1:]))
    return out


@settings(max_examples=150, deadline=None)
@given(SHAPES, st.integers(0, 4), st.integers(0, 2**16), st.randoms(use_true_random=False))
def test_compact_forms_match_full_labels(shape, axis, salt, rnd):
    axis %= len(shape)
    x = _factored(shape, axis, salt)
    e = LN.element(shape, 3, salt)
    assert np.array_equal(e.a, element_labels(shape, 3, salt))
    for lab in (x, e):
        full = np.array(lab.a)
        # an elementwise op
        r = resalt_labels(lab, salt + 1)
        assert np.array_equal(r.a, resalt(full, salt + 1))
        assert sorted(lab.vary) == varying_axes(full) and np.array_equal(lab.chans, np.unique(full >> 40))
        assert same_labels(r, LN(resalt(full, salt + 1))) and not same_labels(r, lab)
        # reshapes: the compact result, where there is one, is the reshaped full array
        for target in _reshape_targets(shape, np.random.default_rng(salt)):
            out = _reshaped(lab, target)
            if out is not None:
                assert out.shape == target and np.array_equal(out.a, full.reshape(target))
                assert sorted(out.vary) == varying_axes(full.reshape(target))
        # transposes that keep the order are reshapes too
        perm = list(range(len(shape)))
        rnd.shuffle(perm)
        if _keeps_order(lab, perm):
            want = np.transpose(full, perm)
            out = _reshaped(lab, want.shape, perm)
            assert np.array_equal(out.a, want) and sorted(out.vary) == varying_axes(want)


def test_transposes_that_reorder_elements_are_not_shortcut():
    x = _factored((2, 3, 4), 1)
    assert _keeps_order(x, [1, 0, 2])  # the channel axis moves, the others keep their order
    assert not _keeps_order(x, [2, 1, 0])  # the position axes swap
    e = LN.element((2, 1, 4), 0, 0)
    assert _keeps_order(e, [1, 0, 2]) and not _keeps_order(e, [2, 1, 0])
    # splitting the channel axis leaves the factored form: the caller replays on the full labels
    assert _reshaped(x, (2, 3, 2, 2)) is not None and _reshaped(x, (6, 4)) is None


def test_element_labels_of_empty_tensors_hold_no_channel():
    e = LN.element((0, 3), 5, 1)
    assert len(e.chans) == 0 and e.a.shape == (0, 3)


def _check(lab: LN, full: np.ndarray):
    assert lab.shape == full.shape and np.array_equal(lab.a, full)
    assert sorted(lab.vary) == varying_axes(full) and np.array_equal(lab.chans, np.unique(full >> 40))


CHAIN_SHAPES = st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 12]), min_size=1, max_size=4).map(tuple).filter(
    lambda s: int(np.prod(s)) <= 4000)


@settings(max_examples=300, deadline=None)
@given(CHAIN_SHAPES, st.integers(0, 4), st.integers(0, 2**16), st.randoms(use_true_random=False))
def test_chains_of_moves_on_factored_labels_match_full_labels(shape, axis, salt, rnd):
    """Reshapes (splitting channel axes: several channel axes), order-keeping transposes and gathers along
    channel axes, chained: every compact result equals the same moves on the full arrays."""
    from graphgrow.core.label_tensor import gathered as _gathered

    lab = _factored(shape, axis % len(shape), salt)
    full = np.array(lab.a)
    for _ in range(4):
        if lab.ndim == 0:
            break
        move = rnd.choice(["reshape", "transpose", "gather", "resalt"])
        if move == "reshape":
            targets = _reshape_targets(lab.shape, None)
            f = lab.factors()
            splits = [tuple(lab.shape[:c]) + (k, lab.shape[c] // k) + tuple(lab.shape[c + 1:])
                      for c in (f[0] if f else ()) for k in (2, 3) if lab.shape[c] % k == 0 and lab.shape[c] > k]
            target = rnd.choice(splits if splits and rnd.random() < 0.5 else targets)  # channel axes split often
            nxt, want = _reshaped(lab, target), full.reshape(target)
        elif move == "transpose":
            perm = list(range(lab.ndim))
            rnd.shuffle(perm)
            if not _keeps_order(lab, perm):
                continue
            want = np.transpose(full, perm)
            nxt = _reshaped(lab, want.shape, perm)
        elif move == "gather":
            ax = rnd.randrange(lab.ndim)
            index = np.array(rnd.randrange(-lab.shape[ax], lab.shape[ax])) if rnd.random() < 0.5 else \
                np.array([rnd.randrange(lab.shape[ax]) for _ in range(rnd.randrange(1, 4))])
            want = np.take(full, index, axis=ax)
            nxt = _gathered(lab, ax, index, want.shape) if lab.factors() is not None else None
        else:
            s = rnd.randrange(2**16)
            nxt, want = resalt_labels(lab, s), resalt(full, s)
        if nxt is None:
            break  # the adapter falls back to the full labels here
        _check(nxt, want)
        lab, full = nxt, want


def test_concatenated_matches_full_arrays():
    """Concatenating pieces factored along the axis (DenseNet, Inception) equals np.concatenate of the full
    labels; pieces factored along another axis, or over other grids, are left to the full path."""
    from graphgrow.core.label_tensor import concatenated

    a = LN.channels((2, 3, 4, 5), 1, np.arange(3), salt=7)
    b = LN.channels((2, 6, 4, 5), 1, np.arange(10, 16), salt=9)
    out = concatenated([a, b], 1)
    assert out is not None and out.part is not None
    np.testing.assert_array_equal(out.a, np.concatenate([a.a, b.a], axis=1))
    assert concatenated([a, b], -3).shape == (2, 9, 4, 5)
    c = LN.channels((2, 3, 4, 6), 1, np.arange(3), salt=7)  # another position grid
    assert concatenated([a, c], 1) is None
    d = LN.channels((2, 3, 4, 5), 3, np.arange(5), salt=7)  # factored along another axis
    assert concatenated([a, d], 1) is None
    e = LN.element((2, 3, 4, 5), 4, 1)
    assert concatenated([a, e], 1) is None
