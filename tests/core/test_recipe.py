"""Recipes (weights planned without values) apply exactly the arithmetic the in-memory widening computes."""

import numpy as np
import pytest

from graphgrow.core import arithmetic as ar
from graphgrow.core.fill import norm_rescale
from graphgrow.core.provenance import RowMatch
from graphgrow.core.recipe import Recipe, same_values


def _match(n_old, content):
    content = np.asarray(content)
    copies = np.bincount(content, minlength=n_old)
    return RowMatch(content, [np.array([i]) for i in range(n_old)], copies, n_old)


def test_recorded_steps_equal_direct_computation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    mapping = np.array([0, 1, 2, 2, 3, 4, 5, 5])
    match = _match(4, [0, 1, 1, 2, 3, 3])
    direct = ar.consume(ar.gather_fill(w, 0, mapping, None), 1, match) * np.float32(0.5)
    r = ar.consume(ar.gather_fill(Recipe("w", w.shape), 0, mapping, None), 1, match) * np.float32(0.5)
    assert r.shape == direct.shape == (8, 6)
    assert np.array_equal(r.apply(w), direct)


def test_fills_and_norm_rescale_recorded():
    rng = np.random.default_rng(1)
    gamma = rng.standard_normal(4).astype(np.float32)
    m = RowMatch(np.array([0, 1, 2, 3]), [np.array([i]) for i in range(4)], np.ones(4, np.int64), 4,
                 fills=np.array([False] * 4 + [True, True]))
    m = RowMatch(np.array([0, 1, 2, 3, 0, 0]), m.old_of_content, m.copies, 4, fills=m.fills)
    direct, eps = norm_rescale(m, {"weight": gamma}, 0, 1e-6, "rms", "zero")
    lazy, eps2 = norm_rescale(m, {"weight": Recipe("g", (4,))}, 0, 1e-6, "rms", "zero")
    assert eps == eps2 and lazy["weight"].shape == (6,)
    assert np.array_equal(lazy["weight"].apply(gamma), direct["weight"])
    filled = ar.gather_fill(Recipe("g", (4,)), 0, np.array([0, 1, 2, 3, -1]), "mean")
    assert filled.apply(gamma)[-1] == pytest.approx(gamma.mean(), rel=1e-6)


def test_a_fill_reaching_a_plain_gather_is_refused_when_recorded():
    with pytest.raises(ValueError, match="fill"):
        ar.gather(Recipe("w", (3, 2)), 0, np.array([0, -1]))


def test_same_values_compares_recipes_of_one_source():
    a = ar.gather(Recipe("e", (5, 3)), 1, np.array([0, 1, 2, 2]))
    b = ar.gather_fill(Recipe("e", (5, 3)), 1, np.array([0, 1, 2, 2]), None)
    c = ar.gather(Recipe("e", (5, 3)), 1, np.array([0, 1, 1, 2]))
    assert same_values(a, b) and not same_values(a, c)
    assert not same_values(a, ar.gather(Recipe("other", (5, 3)), 1, np.array([0, 1, 2, 2])))
    with pytest.raises(ValueError, match="planned from"):
        a.apply(np.zeros((4, 3), np.float32))


def test_offset_gain_rescaled_on_a_recipe():
    """scale_affine on a weightless parameter records (w + 1) s - 1 like the array arithmetic."""
    arr = np.array([0.5, -0.25, 2.0], np.float32)
    r = ar.scale_affine(Recipe("g", (3,)), 0.5, 1.0)
    assert np.allclose(r.apply(arr), ar.scale_affine(arr, 0.5, 1.0))


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_take_by_runs_equals_numpy_take_with_zero_fills(monkeypatch, chunk):
    """arithmetic.take copies runs of consecutive positions as slices and gathers the rest; on any index mixing
    runs, scattered picks and -1 fills it equals np.take with the -1 positions zero, on every axis."""
    from graphgrow.core import arithmetic
    from graphgrow.core.arithmetic import MIN_RUN, take

    monkeypatch.setattr(arithmetic, "GATHER_CHUNK", chunk)  # (7: the gathered part in slabs of a row or two)
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((60, 64, 62)).astype(np.float32)
    fixed = [np.concatenate([np.arange(60), rng.integers(0, 60, 30)]),
             np.concatenate([np.arange(60), -np.ones(30, np.int64)]),
             np.concatenate([[-1, -1], np.arange(5, 5 + 2 * MIN_RUN), [3, 9, 2], [-1], np.arange(MIN_RUN)]),
             np.repeat(np.arange(30), 2), np.zeros(0, np.int64), np.array([5]), -np.ones(4, np.int64)]
    randoms = []
    for _ in range(200):
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            kind = int(rng.integers(0, 3))
            if kind == 0:
                start = int(rng.integers(0, 40))
                parts.append(np.arange(start, start + int(rng.integers(1, 20))))
            elif kind == 1:
                parts.append(rng.integers(0, 60, int(rng.integers(1, 10))))
            else:
                parts.append(-np.ones(int(rng.integers(1, 5)), np.int64))
        randoms.append(np.concatenate(parts))
    for index in fixed + randoms:
        for axis in (0, 1, 2):
            want = np.take(arr, np.where(index < 0, 0, index), axis=axis)
            np.moveaxis(want, axis, 0)[index < 0] = 0
            got = take(arr, index, axis)
            assert got.shape == want.shape and np.array_equal(got, want), (index.tolist(), axis)
    with pytest.raises(IndexError):
        take(arr, np.concatenate([np.arange(MIN_RUN), [60, 3]]), 0)
