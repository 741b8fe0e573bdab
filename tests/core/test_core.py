"""Unit tests of the frontend-neutral core (numpy only)."""

import subprocess
import sys

import numpy as np
import pytest

from graphgrow.core import arithmetic as ar
from graphgrow.core.labels import channel_labels, channel_of, element_labels, resalt, varying_axes
from graphgrow.core.plan import GrowthConstraints, solve_plan, target_width
from graphgrow.core.provenance import Mismatch, match_rows
from graphgrow.core.spaces import SpaceTable


def test_target_width():
    assert target_width(10, 1.41) == 14
    assert target_width(3, 1.1) == 3
    assert target_width(10, 1.3, divisor=8) == 16


def test_plan_counts_and_mapping():
    t = SpaceTable()
    a = t.new_space("a", 10, "produced")
    b = t.new_space("b", 10, "produced")
    c = GrowthConstraints(t)
    c.tie(a.chan_ids, b.chan_ids)  # a residual add
    plan = solve_plan(c, {a.id: 15, b.id: 15}, seed=0)
    assert plan.new_size(a) == plan.new_size(b) == 15
    assert np.array_equal(plan.replication_counts(a), plan.replication_counts(b))
    g = plan.mapping(a)
    assert len(g) == 15 and set(g.tolist()) == set(range(10))  # every old unit kept
    assert np.all(np.diff(g) >= 0)  # each old unit followed by its copies


def test_plan_blocks_and_freeze():
    t = SpaceTable()
    a = t.new_space("a", 12, "produced")
    c = GrowthConstraints(t)
    c.tie_blocks(a.chan_ids, 4)  # 4 groups of a grouped conv
    plan = solve_plan(c, {a.id: 18}, seed=1)
    per_group = plan.replication_counts(a).reshape(4, 3).sum(1)
    assert len(set(per_group.tolist())) == 1
    c.freeze(a.chan_ids[:1], "test")
    plan = solve_plan(c, {a.id: 24}, seed=1)
    assert plan.replication_counts(a).reshape(4, 3)[:, 0].tolist() == [1, 1, 1, 1]
    assert a.frozen_reasons == ["test"]


def _fused_heads(tie_groups: bool):
    """A fused projection of 2 groups x (2 query heads, key, value) x head_dim 4, split over three axes."""
    t = SpaceTable()
    a = t.new_space("qkv", 32, "produced")
    c = GrowthConstraints(t)
    heads = a.chan_ids.reshape(8, 4)
    assert c.units(heads) is None
    c.split_outer(a.chan_ids, 16)
    if tie_groups:  # (the attention ties each group's query heads to their key and value head)
        for g in range(2):
            c.tie(heads[4 * g, :1], heads[4 * g + 1 : 4 * g + 4, :1])
    return a, c


def test_a_group_the_attention_ties_is_copied_whole():
    a, c = _fused_heads(True)
    plan = solve_plan(c, {a.id: 64}, seed=0)
    assert c.layout_units()[a.id] == 16
    g = plan.mapping(a)
    blocks = g.reshape(4, 16)  # (whole groups, each followed by its copies)
    assert all(b.tolist() == list(range(b[0], b[0] + 16)) and b[0] % 16 == 0 for b in blocks)
    assert np.all(np.diff(blocks[:, 0]) >= 0) and set(blocks[:, 0].tolist()) == {0, 16}


def test_untied_heads_of_an_outer_block_copy_one_by_one():
    a, c = _fused_heads(False)
    plan = solve_plan(c, {a.id: 64}, seed=0)
    assert c.layout_units()[a.id] == 4
    g = plan.mapping(a)
    assert g[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_labels_roundtrip_and_resalt_keeps_contents_apart():
    lab = channel_labels((2, 3, 4, 4), 1, np.array([7, 8, 9]), salt=5)
    assert channel_of(lab)[0, :, 0, 0].tolist() == [7, 8, 9]
    assert varying_axes(lab) == [1]
    x = element_labels((2, 3), 1, 2)
    assert len(np.unique(x)) == 6
    # cat([x, f(x)]) then another op: the two halves must never compare equal
    both = np.concatenate([lab, resalt(lab, 11)], axis=1)
    again = resalt(both, 12)
    assert not np.array_equal(again[:, :3], again[:, 3:])


def test_match_rows_and_mismatch():
    old = channel_labels((1, 3, 2, 2), 1, np.array([0, 1, 2]), 1)
    new = old[:, [0, 0, 1, 2, 2]]
    m = match_rows(old, new, 1)
    assert m.source().tolist() == [0, 0, 1, 2, 2]
    assert m.copies.tolist() == [2, 1, 2]
    with pytest.raises(Mismatch):
        match_rows(old, old[:, [0, 1]], 1)  # channel 2 lost
    with pytest.raises(Mismatch):
        match_rows(old, channel_labels((1, 3, 2, 2), 1, np.array([0, 1, 5]), 1), 1)  # foreign content


def test_consume_divides_and_exact_noise_sums_to_zero():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3))
    old = channel_labels((1, 3), 1, np.array([0, 1, 2]), 1)
    m = match_rows(old, old[:, [0, 1, 1, 1, 2]], 1)
    new = ar.consume(w, 1, m)
    x = rng.normal(size=3)
    assert np.allclose(new @ x[[0, 1, 1, 1, 2]], w @ x, atol=1e-12)
    noisy = ar.consume(w, 1, m, noise=0.5, noise_mode="exact", rng=rng)
    assert np.allclose(noisy @ x[[0, 1, 1, 1, 2]], w @ x, atol=1e-12)
    assert not np.allclose(noisy, new)
    paper = ar.consume(w, 1, m, noise=0.5, noise_mode="paper", rng=rng)
    assert not np.allclose(paper @ x[[0, 1, 1, 1, 2]], w @ x, atol=1e-3)


def test_consume_duplicated_channels_sums_columns():
    w = np.arange(12.0).reshape(3, 4)
    lab = channel_labels((1, 2), 1, np.array([0, 1]), 1)
    old = np.concatenate([lab, lab], 1)  # cat([x, x])
    new = np.concatenate([lab[:, [0, 0, 1]], lab[:, [0, 0, 1]]], 1)
    m = match_rows(old, new, 1)
    out = ar.consume(w, 1, m)
    x = np.array([1.0, 2.0])
    assert np.allclose(out @ x[[0, 0, 1, 0, 0, 1]], w @ x[[0, 1, 0, 1]])


def test_core_does_not_import_torch():
    code = ("import sys, importlib.util, types; pkg = types.ModuleType('graphgrow'); pkg.__path__ = ['graphgrow'];"
            "sys.modules['graphgrow'] = pkg;"
            "import graphgrow.core.plan, graphgrow.core.arithmetic, graphgrow.core.provenance, graphgrow.core.report;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_resalt_never_keeps_a_salt():
    """An op's result never compares equal to its input: the salt mix has no fixed point, for any op salt
    (checked for every 16-bit input salt and 512 op salts, plus the salts hypothesis once found)."""
    from graphgrow.core.labels import SALT_MASK, mix_salt as _mix

    old = np.arange(SALT_MASK + 1, dtype=np.int64)
    for salt in list(range(512)) + [277, 2**16 - 1, 2**16, 123457]:
        new = _mix(old, salt)
        assert not (new == old).any()
        assert len(np.unique(new)) == SALT_MASK + 1  # still a bijection: distinct contents stay distinct
    lab = element_labels((2, 3), 5, 276)
    assert not np.array_equal(resalt(lab, 277), lab)


def test_per_head_bias_follows_the_head_copies():
    """A per-head additive bias (T5's relative position bias table: one column per head) joins the scores, whose
    channels are the query heads: tied head to column, the table's columns are copied exactly as the heads."""
    t = SpaceTable()
    q = t.new_space("q", 4 * 3, "produced")  # 4 heads of 3 channels
    bias = t.new_space("bias", 4, "produced")  # the table's columns
    c = GrowthConstraints(t)
    assert c.units(q.chan_ids.reshape(4, 3)) is None
    c.tie(q.chan_ids[::3], bias.chan_ids)  # scores' head h + bias column h (the scores carry one channel per head)
    plan = solve_plan(c, {q.id: 24, bias.id: 8}, seed=3)
    heads = plan.mapping(q).reshape(-1, 3)
    assert np.array_equal(heads[:, 0] // 3, plan.mapping(bias))  # new head j copies the head its bias column copies
    assert np.array_equal(heads, heads[:, :1] + np.arange(3))  # whole heads


def test_scale_affine_keeps_an_offset_gain():
    """Gemma's RMSNorm gain 1 + w scaled by s: (1 + w') = s (1 + w)."""
    w = np.array([0.5, -0.25, 0.0], np.float32)
    assert np.allclose(1 + ar.scale_affine(w, 0.5, 1.0), 0.5 * (1 + w))
    assert np.allclose(ar.scale_affine(w, 2.0), 2 * w)


def test_reshape_literal_counting_copied_blocks_grows():
    from graphgrow.core.sites import rescale_shape

    # Falcon's kv groups on transformers 5.25: [B, L, 8, 16] -> view(B, L, 2, -1, 16), each group (2 queries, key,
    # value: 4 x 16 channels) copied whole at x2. The -1 would take the new channels into every group and cut the
    # copies apart: the literal group count follows the width instead
    raw, va, old = [2, 12, 2, -1, 16], [2, 3, 4], (2, 12, 2, 4, 16)
    assert rescale_shape(raw, va, 2 * 12 * 128, 2 * 12 * 256, old, unit=16, block=64) == [2, 12, 4, -1, 16]
    # heads copied one by one (no block): the -1 follows the width, nothing to rewrite
    assert rescale_shape(raw, va, 2 * 12 * 128, 2 * 12 * 256, old, unit=16) is None
    # 5.24's view(B, L, -1, 4, 16): the -1 already counts the groups
    assert rescale_shape([2, 12, -1, 4, 16], va, 2 * 12 * 128, 2 * 12 * 256, old, unit=16, block=64) is None
    # the per-head [q | k | v] (heads, 3, head_dim), each head's block of 48 copied whole: the head count grows
    assert rescale_shape([2, 12, 4, 3, 16], va, 2 * 12 * 192, 2 * 12 * 384, (2, 12, 4, 3, 16), unit=16,
                         block=48) == [2, 12, 8, 3, 16]
