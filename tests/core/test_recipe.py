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
