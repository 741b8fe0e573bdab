"""torch.export graphs lifted to torch-level ops: same function, widened exactly, unknown ATen ops frozen."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphgrow
from graphgrow.fx.aten import lift_exported


class Block(nn.Module):
    """Pre-LN attention + MLP written with modules and functions, as transformers writes them."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 7)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(a)
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.head(x)


def lifted(model, x):
    return lift_exported(torch.export.export(model, (x,), strict=False).module())


def test_lifted_graph_computes_the_same_and_uses_torch_ops():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 32)
    gm = lifted(model, x)
    assert torch.equal(gm(x), model(x))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert F.linear in targets and F.layer_norm in targets and F.scaled_dot_product_attention in targets
    assert not [t for t in targets if "aten" in str(t) and "linear" in str(t)]
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"qkv.weight", "ln1.bias", "head.weight"}


@pytest.mark.parametrize("factor", [2, 1.5])
def test_lifted_graph_widens_exactly(factor):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 32)
    gm = lifted(model, x)
    wide = graphgrow.widen(gm, factor, example_inputs=(x,))
    rep = wide.graphgrow_report
    assert rep.check.passed and rep.check.outputs[0].max_rel < 1e-5
    widths = {s.name: s.new_width for s in rep.spaces}
    assert widths["up.weight"] == int(round(128 * factor))
    assert widths["qkv.weight"] == int(round(96 * factor))  # heads of 8 copied whole: 4 -> 8 or 6 heads


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))  # cumsum runs across channels


def test_an_aten_op_without_a_torch_twin_freezes_its_channels():
    torch.manual_seed(0)
    model, x = Unknown().eval(), torch.randn(3, 8)
    wide = graphgrow.widen(lifted(model, x), 2, example_inputs=(x,))
    space = next(s for s in wide.graphgrow_report.spaces if s.name == "a.weight")
    assert space.new_width == 16 and "cumsum" in space.frozen_reasons[0]
