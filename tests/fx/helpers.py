"""Shared assertions for widening tests."""

import copy

import torch

import graphgrow


def max_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def widen_and_compare(model, inputs, factor=1.5, dtype=torch.float64, **kw):
    """Widen in float64 (algorithm errors, not rounding) and return (wide, report, max_rel)."""
    model = model.to(dtype).eval()
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    before = copy.deepcopy(model.state_dict())
    kw.setdefault("verify", "torch")
    wide = graphgrow.widen(model, factor, example_inputs=inputs, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "the original model was modified"
    wide.eval()
    with torch.no_grad():
        ref, out = model(*inputs), wide(*inputs)
    if isinstance(ref, torch.Tensor):
        ref, out = [ref], [out]
    err = max(max_rel(r, o) for r, o in zip(ref, out))
    return wide, wide.graphgrow_report, err


def space(report, name):
    return next(s for s in report.spaces if s.name == name)
