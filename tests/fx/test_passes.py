"""graphgrow passes on torch.fx graphs: names of the original module hierarchy address the same points on a
GraphModule, and a PassManager chain of WidenPass/DeepenPass gives the same model as the API calls in sequence."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torch.fx.passes.infra.pass_manager import PassManager

import graphgrow
from graphgrow import models
from graphgrow.fx.deepen import insertion_candidates
from graphgrow.fx.trace import trace_module
from graphgrow.passes import DeepenPass, WidenPass
from helpers import max_rel


def _points(gm, name):
    return [p.name for p in insertion_candidates(gm)[name]]


def _assert_same_model(a, b):
    """Same state_dict keys, tensor-equal weights (same dtype and shape)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    diff = [k for k in sa if sa[k].dtype != sb[k].dtype or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    assert diff == []


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_container_names_on_graph_module():
    """Container and leaf names resolve to the same nodes on symbolic_trace(model) as on the model itself."""
    model = _resnet18()
    gm = fx.symbolic_trace(model)
    traced, _ = trace_module(model)
    expect = {"layer2": ["layer2_1_relu_1"], "layer1.0": ["layer1_0_relu_1"], "layer4": ["layer4_1_relu_1"],
              "layer1.0.relu": ["layer1_0_relu", "layer1_0_relu_1"], "layer3.0.downsample": ["layer3_0_downsample_1"],
              "flatten": ["flatten"]}
    for name, nodes in expect.items():
        assert _points(gm, name) == _points(traced, name) == nodes
    # no call keys such as "layer1.0.relu@1" leak into the names
    assert not [n for n in insertion_candidates(gm) if "@" in n]


@pytest.mark.parametrize("after, blocks", [("layer2", 1), ("layer1.0.relu", 2), (["layer1.0", "layer3"], 2)])
def test_deepen_graph_module_equals_module(after, blocks):
    """graphgrow.deepen on symbolic_trace(resnet18) is the model graphgrow.deepen gives on resnet18."""
    model = _resnet18()
    x = (torch.randn(1, 3, 64, 64),)
    a = graphgrow.deepen(model, after=after, example_inputs=x)
    b = graphgrow.deepen(fx.symbolic_trace(model), after=after, example_inputs=x)
    assert len(a.graphgrow_report.insertions) == len(b.graphgrow_report.insertions) == blocks
    assert [i.name for i in a.graphgrow_report.insertions] == [i.name for i in b.graphgrow_report.insertions]
    _assert_same_model(a, b)
    with torch.no_grad():
        ref = model(*x)
        assert torch.equal(a(*x), b(*x))
        assert max_rel(ref, b(*x)) <= 1e-5
    assert b.graphgrow_report.check.worst.max_rel <= 1e-5


def _api(model, order, x, factor, after, block):
    if order == "widen-deepen":
        return graphgrow.deepen(graphgrow.widen(model, factor, example_inputs=x), after=after, block=block,
                                example_inputs=x)
    return graphgrow.widen(graphgrow.deepen(model, after=after, block=block, example_inputs=x), factor,
                           example_inputs=x)


def _passes(gm, order, x, factor, after, block):
    wp, dp = WidenPass(factor, example_inputs=x), DeepenPass(after=after, block=block, example_inputs=x)
    res = PassManager([wp, dp] if order == "widen-deepen" else [dp, wp])(gm)
    assert res.modified and isinstance(res.graph_module, fx.GraphModule)
    return res.graph_module, wp.report, dp.report


# (model, input, dtype, widen factor, after, block, expected inserted blocks, tolerance)
CASES = {
    "resnet18-f32": ("resnet18", torch.float32, 1.5, "layer2", "conv-bn-relu", 1, 1e-5),
    "resnet18-f64": ("resnet18", torch.float64, 1.5, r"layer[23]", "residual", 2, 1e-12),
    "senet_small-f64": ("senet_small", torch.float64, 1.5, "layer2", "conv-bn-relu", 1, 1e-12),
    "densenet_small-f32": ("densenet_small", torch.float32, 1.5, "features", "conv-bn", 1, 1e-5),
}


@pytest.mark.parametrize("order", ["widen-deepen", "deepen-widen"])
@pytest.mark.parametrize("case", list(CASES))
def test_pass_manager_equals_api(case, order):
    """PassManager([WidenPass, DeepenPass]) on a traced model == graphgrow.deepen(graphgrow.widen(model)) (and the
    reverse order): same state_dict keys and tensors, same outputs, same widths and number of blocks."""
    name, dtype, factor, after, block, blocks, tol = CASES[case]
    if name == "resnet18":
        model, x = _resnet18(), (torch.randn(1, 3, 64, 64),)
    else:
        model, x = models.ZOO[name].build().eval(), models.example_inputs(name, batch=2)
    model, x = model.to(dtype), tuple(t.to(dtype) for t in x)
    api = _api(model, order, x, factor, after, block)
    gm = fx.symbolic_trace(model)
    got, wrep, drep = _passes(gm, order, x, factor, after, block)
    _assert_same_model(api, got)
    assert len(drep.insertions) == blocks and all(i.block == block for i in drep.insertions)
    widths = {s.name: s.new_width for s in wrep.widened}
    assert widths and all(w > s.old_width for s in wrep.widened for w in [widths[s.name]])
    with torch.no_grad():
        ref, out_api, out = model(*x), api.eval()(*x), got.eval()(*x)
    assert max_rel(out_api, out) <= tol
    assert max_rel(ref, out) <= tol
    assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in api.parameters())
    if order == "deepen-widen":  # the inserted blocks were widened too
        assert any("_deep" in s for s in widths)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) + 1.0


class _Shared(nn.Module):
    """One container called twice, a container with two outputs, and a literal channel constant (x.view(-1, 8*16))
    so that widening returns a GraphModule with rewritten constants."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.shared = _Block(8)
        self.pair = _Pair()
        self.head = nn.Sequential(nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        x = self.shared(self.shared(self.stem(x)))
        a, b = self.pair(x)
        x = torch.nn.functional.adaptive_avg_pool2d(a * b, 4)
        return self.head(x.view(-1, 8 * 16))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return torch.sigmoid(self.a(x)), self.b(x)


def test_shared_container_and_ambiguous_container():
    """A container called twice gives two points (one per call); a container from which two values leave is
    refused with one sentence naming them, on the module and on its GraphModule alike."""
    model = _Shared().eval()
    x = (torch.randn(2, 3, 8, 8),)
    gm = fx.symbolic_trace(model)
    assert _points(gm, "shared") == _points(trace_module(model)[0], "shared") == ["add", "add_1"]
    assert _points(gm, "shared.act") == ["shared_act", "shared_act_1"]
    for m in (model, gm):
        deep = graphgrow.deepen(m, after="shared", block="conv-bn", example_inputs=x)
        rep = deep.graphgrow_report
        assert [i.name for i in rep.insertions] == ["shared_deep", "shared_deep_2"]
        assert rep.check.worst.max_rel <= 1e-6
        with pytest.raises(graphgrow.InvalidArgumentError,
                           match=r"^after names the module 'pair', but 2 values leave it \('sigmoid', 'pair_b'\), so "
                                 r"it has no single output; name one of these nodes instead$"):
            graphgrow.deepen(m, after="pair", block="conv-bn", example_inputs=x)
    # each of the two leaving nodes can be named instead
    deep = graphgrow.deepen(gm, after=["sigmoid", "pair_b"], block="conv-bn", example_inputs=x)
    assert len(deep.graphgrow_report.insertions) == 2


def test_names_survive_widen_graph_module_result_and_deepen():
    """widen returns a GraphModule (a view constant rewritten); container names still resolve on it, on a
    PassManager chain too, and blocks inserted earlier are containers of their own (``stem_deep``)."""
    model = _Shared().eval().double()
    x = (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    wide = graphgrow.widen(model, 2.0, example_inputs=x)
    assert isinstance(wide, fx.GraphModule) and wide.get_submodule("head.0").in_features == 16 * 16
    assert _points(wide, "shared") == ["add", "add_1"] and _points(wide, "stem") == ["stem_1"]
    api = graphgrow.deepen(graphgrow.deepen(wide, after="stem", example_inputs=x), after=["stem_deep", "shared"],
                           block="residual", example_inputs=x)
    wp = WidenPass(2.0, example_inputs=x)
    d1, d2 = DeepenPass(after="stem", example_inputs=x), DeepenPass(after=["stem_deep", "shared"], block="residual",
                                                                      example_inputs=x)
    res = PassManager([wp, d1, d2])(fx.symbolic_trace(model))
    got = res.graph_module
    _assert_same_model(api, got)
    assert [i.name for i in d1.report.insertions] == ["stem_deep"]
    assert [i.name for i in d2.report.insertions] == ["stem_deep_deep", "shared_deep", "shared_deep_2"]
    # the shared conv freezes its input channels (tied weights); the others double
    assert {s.name: s.new_width for s in wp.report.widened} == {"pair.a": 16, "pair.b": 16, "head.0": 32}
    with torch.no_grad():
        ref = model(*x)
        assert max_rel(ref, got(*x)) <= 1e-12 and max_rel(ref, api(*x)) <= 1e-12
    # the new blocks' layers are nodes of the graph, with their own scope: a ReLU proven at the block's end
    assert [n.target for n in got.graph.nodes if str(n.target).startswith("stem_deep.")] == \
        ["stem_deep.0.conv", "stem_deep.0.bn", "stem_deep.0.act"]
    assert _points(got, "stem_deep") == ["stem_deep_0_act"]


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return qualname in ("stem", "pair") or super().is_leaf_module(m, qualname)


def test_graph_module_calls_to_containers_are_inlined():
    """A GraphModule that calls a container (here made a leaf by a custom tracer) is not retraced: the call is
    inlined with the container's scope, so its layers and name resolve; a call returning a tuple stays a leaf."""
    model = _Shared().eval()
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][:2] == ["stem", "shared.conv"]
    copy, leaves = trace_module(gm)
    assert leaves == ["pair"]
    assert [n.target for n in copy.graph.nodes if n.op == "call_module"][:3] == ["stem.0", "stem.1", "shared.conv"]
    assert _points(copy, "stem") == ["stem_1"] and _points(copy, "stem.1") == ["stem_1"]
    x = (torch.randn(2, 3, 8, 8),)
    deep = graphgrow.deepen(gm, after="stem", example_inputs=x)  # conv-bn-relu: the ReLU inside stem is seen
    rep = deep.graphgrow_report
    assert [i.name for i in rep.insertions] == ["stem_deep"] and rep.insertions[0].activation
    with torch.no_grad():
        assert max_rel(model(*x), deep(*x)) <= 1e-6
