"""Property test: random DAGs of conv / grouped conv / BN / activations / add / concat /
split / flatten / linear either widen exactly or are refused cleanly."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphgrow
from helpers import widen_and_compare

ACTS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}


class RandomDAG(nn.Module):
    """Interprets a list of ops over earlier tensors; every tensor is N x C x 6 x 6."""

    def __init__(self, ops, in_ch=3, classes=3):
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleDict()
        chans = [in_ch]
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "conv":
                _, src, out, k, groups = op
                self.layers[str(i)] = nn.Conv2d(chans[src], out, k, padding=k // 2, groups=groups)
                chans.append(out)
            elif kind == "bn":
                self.layers[str(i)] = nn.BatchNorm2d(chans[op[1]])
                with torch.no_grad():
                    self.layers[str(i)].running_mean.normal_()
                    self.layers[str(i)].running_var.uniform_(0.5, 2)
                chans.append(chans[op[1]])
            elif kind in ACTS or kind == "pool":
                chans.append(chans[op[1]])
            elif kind == "add":
                chans.append(chans[op[1]])
            elif kind == "cat":
                chans.append(chans[op[1]] + chans[op[2]])
            elif kind == "split":
                _, src, at, part = op
                chans.append(at if part == 0 else chans[src] - at)
        self.chans = chans
        self.head = nn.Linear(chans[-1] * 9, classes)

    def forward(self, x):
        vals = [x]
        for i, op in enumerate(self.ops):
            kind = op[0]
            if kind in ("conv", "bn"):
                vals.append(self.layers[str(i)](vals[op[1]]))
            elif kind in ACTS:
                vals.append(ACTS[kind](vals[op[1]]))
            elif kind == "pool":
                vals.append(F.max_pool2d(vals[op[1]], 3, 1, 1))
            elif kind == "add":
                vals.append(vals[op[1]] + vals[op[2]])
            elif kind == "cat":
                vals.append(torch.cat([vals[op[1]], vals[op[2]]], 1))
            elif kind == "split":
                _, src, at, part = op
                vals.append(torch.split(vals[src], [at, self.chans[src] - at], 1)[part])
        y = F.avg_pool2d(vals[-1], 2)
        return self.head(torch.flatten(y, 1))


@st.composite
def dags(draw):
    chans = [3]
    ops = []
    n = draw(st.integers(2, 9))
    for _ in range(n):
        kinds = ["conv", "conv", "bn", "act", "pool", "cat"]
        idx = len(chans) - 1
        if any(c == chans[idx] for c in chans[:-1]):
            kinds.append("add")
        if chans[idx] >= 2:
            kinds.append("split")
        kind = draw(st.sampled_from(kinds))
        src = draw(st.sampled_from([idx, idx, draw(st.integers(0, idx))]))
        if kind == "conv":
            groups = draw(st.sampled_from([1, 1, 2, chans[src]]))
            if chans[src] % groups:
                groups = 1
            out = draw(st.integers(1, 6)) * (groups if groups > 1 and groups != chans[src] else 1)
            if groups == chans[src] and groups > 1:
                out = chans[src] * draw(st.sampled_from([1, 1, 2]))
            k = draw(st.sampled_from([1, 3]))
            ops.append(("conv", src, out, k, groups))
            chans.append(out)
        elif kind == "bn":
            ops.append(("bn", src))
            chans.append(chans[src])
        elif kind == "act":
            ops.append((draw(st.sampled_from(sorted(ACTS))), src))
            chans.append(chans[src])
        elif kind == "pool":
            ops.append(("pool", src))
            chans.append(chans[src])
        elif kind == "add":
            other = draw(st.sampled_from([j for j, c in enumerate(chans[:-1]) if c == chans[idx]]))
            ops.append(("add", idx, other))
            chans.append(chans[idx])
        elif kind == "cat":
            other = draw(st.integers(0, idx))
            ops.append(("cat", idx, other))
            chans.append(chans[idx] + chans[other])
        elif kind == "split":
            at = draw(st.integers(1, chans[idx] - 1))
            part = draw(st.integers(0, 1))
            ops.append(("split", idx, at, part))
            chans.append(at if part == 0 else chans[idx] - at)
    return ops


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=dags(), factor=st.sampled_from([1.1, 1.5, 2.0, 3.0]), seed=st.integers(0, 3))
def test_random_dag_exact_or_refused(ops, factor, seed):
    torch.manual_seed(seed)
    model = RandomDAG(ops)
    try:
        wide, rep, err = widen_and_compare(model, (torch.randn(2, 3, 6, 6),), factor, seed=seed)
    except graphgrow.GraphGrowError as exc:  # a clean refusal is allowed, a wrong model is not
        assert not isinstance(exc, graphgrow.VerificationError), f"{ops}: {exc}"
        return
    assert err < 1e-9, f"{ops} x{factor}: max_rel {err:.3g}"
    for s in rep.spaces:
        assert s.new_width >= s.old_width
        if s.new_width == s.old_width and s.old_width * factor >= s.old_width + 1:
            assert s.frozen_reasons, f"{s.name} stayed at {s.old_width} without a reason"
