"""Index dispatch relations of the core (mixture-of-experts token moves, stacked experts, broadcast gates), numpy only."""

import numpy as np
import pytest

from graphgrow.core import arithmetic as ar
from graphgrow.core.growth import Conflict, NotUnderstood
from graphgrow.core.label_tensor import LabelTensor, label_channel_ids
from graphgrow.core.plan import solve_plan
from graphgrow.core.relations import RelationRun


class Run(RelationRun):
    """A run of a graph whose nodes are strings (the hooks a frontend provides)."""

    def site(self, node):
        return f"node {node!r}"

    def node_key(self, node):
        return node

    def salt(self, node):
        return 1 + sum(map(ord, node)) % 1000

    def input_pairs(self, node):
        return []

    def fixed_outputs(self, node):
        return LabelTensor.element((1,), 0, self.salt(node))

    def old_outputs(self, node):
        return self.old[node]


def model_input(run, shape):
    """A model input: one fixed channel over every element."""
    return LabelTensor.element(shape, run.table.new_space("input", 1, "fixed").base, 3)


def moe_block(run, w_up, w_down, x_in, tokens, index_shape):
    """stream -> token gather -> grouped up (stacked [E, out, in]) -> grouped down ([E, out, in]) -> inverse gather."""
    old = lambda k: run.env[k] if run.analysis else run.old[k]  # noqa: E731
    h, w_h, _ = run.produce("h", "embed", x_in, x_in, np.eye(4, dtype=np.float32), in_axis=-1, out_axis=-1, w_in=0,
                            w_out=1, shape=(tokens, 4))
    run.env["h"] = h
    g = run.gather_positions("gather", h, old("h"), 0, 1, index_shape)
    run.env["gather"] = g
    up, w_u, _ = run.produce("up", "experts.up", g, old("gather"), w_up, in_axis=-1, out_axis=-1, w_in=2, w_out=1,
                             shape=(index_shape[0], w_up.shape[1]))
    run.env["up"] = up
    down, w_d, _ = run.produce("down", "experts.down", up, old("up"), w_down, in_axis=-1, out_axis=-1, w_in=2,
                               w_out=1, shape=(index_shape[0], 4))
    run.env["down"] = down
    back = run.gather_positions("back", down, old("down"), 0, 1, (tokens,))
    run.env["back"] = back
    return h, g, up, down, back, (w_h, w_u, w_d)


def test_token_gather_passes_channels_and_stacked_experts_grow_alike():
    tokens, experts, inner = 6, 3, 5
    rng = np.random.default_rng(0)
    w_up = rng.normal(size=(experts, inner, 4)).astype(np.float32)
    w_down = rng.normal(size=(experts, 4, inner)).astype(np.float32)
    an = Run()
    x = model_input(an, (tokens, 4))
    h, g, up, down, back, _ = moe_block(an, w_up, w_down, x, tokens, (2 * tokens,))
    # the gathered rows hold the stream's channels along the same axis: no tie, no freeze
    assert g.shape == (2 * tokens, 4) and g.vary == [1]
    assert np.array_equal(label_channel_ids(g, 1), label_channel_ids(h, 1))
    assert np.array_equal(label_channel_ids(back, 1), label_channel_ids(down, 1)) and back.shape == (tokens, 4)
    assert not an.constraints.frozen.any()
    with pytest.raises(NotUnderstood):  # computed indices along a channel axis are not understood
        an.gather_positions("bad", h, h, 1, 1, (3,))

    spaces = {sp.name: sp for sp in an.table.spaces if sp.kind == "produced"}
    plan = solve_plan(an.constraints, {spaces["embed"].id: 8, spaces["experts.up"].id: 10,
                                         spaces["experts.down"].id: 8}, seed=0)
    ap = Run(plan=plan, analysis=an)
    h2, g2, up2, down2, back2, (w_h, w_u, w_d) = moe_block(ap, w_up, w_down, x, tokens, (2 * tokens,))
    assert g2.shape == (2 * tokens, 8) and back2.shape == (tokens, 8)
    assert w_u.shape == (experts, 10, 8) and w_d.shape == (experts, 8, 10)
    # every expert reads the copies of a stream channel divided by their count and writes its units' copies:
    # the expert's function is unchanged, slice by slice
    src_in, src_mid, src_out = (plan.mapping(spaces[k]) for k in ("embed", "experts.up", "experts.down"))
    v = rng.normal(size=4).astype(np.float32)
    for e in range(experts):
        old_mid = w_up[e] @ v
        new_mid = w_u[e] @ v[src_in]
        assert np.allclose(new_mid, old_mid[src_mid], rtol=1e-6, atol=1e-6)
        assert np.allclose(w_d[e] @ new_mid, (w_down[e] @ old_mid)[src_out], rtol=1e-5, atol=1e-5)


def test_gathered_axis_that_changed_length_is_a_conflict():
    an = Run()
    x = model_input(an, (4, 3))
    h, _, _ = an.produce("h", "p", x, x, np.eye(3, dtype=np.float32), in_axis=-1, out_axis=-1, w_in=0, w_out=1,
                         shape=(4, 3))
    an.env["h"] = h
    plan = solve_plan(an.constraints, {}, seed=0)
    ap = Run(plan=plan, analysis=an)
    longer = LabelTensor.channels((5, 3), 1, label_channel_ids(h, 1), 9)
    with pytest.raises(Conflict):
        ap.gather_positions("g", longer, h, 0, 1, (7,))


def test_broadcast_gate_freezes_its_one_output_as_an_expert_count():
    an = Run()
    x = model_input(an, (4, 3))
    h, _, _ = an.produce("h", "stream", x, x, np.eye(3, dtype=np.float32), in_axis=-1, out_axis=-1, w_in=0,
                         w_out=1, shape=(4, 3))
    gate, _, _ = an.produce("gate", "shared_expert_gate", x, x, np.ones((1, 3), np.float32), in_axis=-1, out_axis=-1,
                            w_in=1, w_out=0, shape=(4, 1))
    out = an.broadcast_gate("mul", gate, None, h)
    assert np.array_equal(label_channel_ids(out, 1), label_channel_ids(h, 1))
    assert an.constraints.frozen[gate.chans].all() and not an.constraints.frozen[h.chans].any()
    sp = next(s for s in an.table.spaces if s.name == "shared_expert_gate")
    assert any("expert count" in r for r in sp.frozen_reasons)


def test_stacked_weights_record_their_recipe():
    """Stacked expert weights go through the same recorded arithmetic as 2-d ones (checkpoint streaming)."""
    w = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = ar.gather(w, 1, np.array([0, 0, 1, 2]))
    assert out.shape == (2, 4, 4) and np.array_equal(out[:, 1], w[:, 0])
