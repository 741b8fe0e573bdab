"""Experts applied one at a time to slices of a view of one stored parameter (DBRX's ``w.view(-1, ffn, d)[e]``,
as F.linear and as a matrix product): one producer over the stacked [E, ffn, d] weight; the grown parameter is
stored [E * ffn', d'] and the graph's view literal follows it."""

import pytest

torch = pytest.importorskip("torch")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import graphgrow  # noqa: E402


class ViewedExperts(nn.Module):
    def __init__(self, experts=4, ffn=12, d=16):
        super().__init__()
        self.ffn, self.d = ffn, d
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 8)
        self.w1 = nn.Parameter(torch.randn(experts * ffn, d) / 4)
        self.w2 = nn.Parameter(torch.randn(experts * ffn, d) / 4)

    def forward(self, x):
        h = self.inp(x)
        w1, w2 = self.w1.view(-1, self.ffn, self.d), self.w2.view(-1, self.ffn, self.d)
        y = h
        for e in range(4):
            y = y + torch.matmul(F.relu(F.linear(h, w1[e])), w2[e])
        return self.out(y)


@pytest.mark.parametrize("factor,ffn,d", [(2, 24, 32), (1.5, 18, 24)])
def test_experts_over_a_viewed_parameter_grow(factor, ffn, d):
    torch.manual_seed(0)
    model, x = ViewedExperts().eval(), torch.randn(5, 8)
    grown = graphgrow.widen(model, factor, example_inputs=(x,))
    assert tuple(grown.w1.shape) == (4 * ffn, d) and tuple(grown.w2.shape) == (4 * ffn, d)
    assert grown.graphgrow_report.params_before == 1816
    for seed in (1, 2):
        z = torch.randn(7, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            a, b = model(z), grown(z)
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    views = [n.args[1] for n in grown.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views == [[-1, ffn, d], [-1, ffn, d]]
    frozen = {s.name: s.frozen_reasons for s in grown.graphgrow_report.spaces if s.frozen_reasons}
    assert list(frozen) == ["out"]  # (the model output)


def test_expert_blocks_stay_per_expert():
    """Each expert's rows of the stored weight become that expert's grown block: expert 0's new block holds only
    rows computed from expert 0's old rows."""
    torch.manual_seed(0)
    model, x = ViewedExperts().eval(), torch.randn(5, 8)
    model.w1.data[:12] = 0  # expert 0's gate rows zero: its grown block is zero, the others' are not
    grown = graphgrow.widen(model, 2, example_inputs=(x,))
    blocks = grown.w1.detach().view(4, 24, 32)
    assert float(blocks[0].abs().max()) == 0.0
    assert all(float(blocks[e].abs().amax(1).min()) > 0 for e in (1, 2, 3))  # (every row of theirs)
