"""Bad input: one clear GraphGrowError each, the original model untouched."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import graphgrow
from graphgrow import InputMismatchError, InvalidArgumentError, TraceError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow in the model's own forward
            return y
        return -y


class Inner(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # untraceable, but only inside a submodule
            return x * 2
        return x


class SubUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.inner = Inner()
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.c(torch.relu(self.b(self.inner(self.a(x)))))).mean((2, 3))


X = (torch.randn(2, 3, 8, 8),)


def _unchanged(model, fn):
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    with pytest.raises(graphgrow.GraphGrowError) as info:
        fn()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400
    return info


@pytest.mark.parametrize("factor", [1.0, 0.5, -2, float("nan"), float("inf"), "wide"])
def test_bad_factor(factor):
    m = Net()
    info = _unchanged(m, lambda: graphgrow.widen(m, factor, example_inputs=X))
    assert info.type is InvalidArgumentError and "factor" in str(info.value)


def test_regex_matching_nothing_and_invalid():
    m = Net()
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, only="nomatch"))
    assert info.type is InvalidArgumentError and "nomatch" in str(info.value)
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, exclude="zzz"))
    assert "zzz" in str(info.value)
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, only="(("))
    assert "regular expression" in str(info.value)


def test_wrong_example_inputs():
    m = Net()
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=(torch.randn(2, 5, 8, 8),)))
    assert info.type is InputMismatchError and "example inputs" in str(info.value)
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=(torch.zeros(2, 3, 8, 8, dtype=torch.long),)))
    assert info.type is InputMismatchError
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=None))
    assert info.type is InvalidArgumentError


def test_widths_smaller_or_unknown():
    m = Net()
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, widths={"conv": 4}))
    assert "smaller than its current width 8" in str(info.value)
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, widths={"nope": 40}))
    assert "nope" in str(info.value)


def test_bad_options():
    m = Net()
    for kw in ({"init": "zeros"}, {"noise_mode": "loud"}, {"divisor": 0}, {"noise": -1.0}, {"verify": "maybe"}):
        info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X, **kw))
        assert info.type is InvalidArgumentError


def test_untraceable_forward_names_the_line():
    m = Untraceable()
    info = _unchanged(m, lambda: graphgrow.widen(m, 1.5, example_inputs=X))
    assert info.type is TraceError
    assert "test_errors.py" in str(info.value) and "if y.sum() > 0" in str(info.value)


def test_untraceable_submodule_becomes_frozen_leaf():
    m = SubUntraceable().eval()
    wide = graphgrow.widen(m, 1.5, example_inputs=X)
    rep = wide.graphgrow_report
    assert rep.opaque_leaves == ["inner"]
    a = next(s for s in rep.spaces if s.name == "a")
    assert a.new_width == 8 and "inner" in a.frozen_reasons[0]
    assert next(s for s in rep.spaces if s.name == "b").new_width == 12
    with torch.no_grad():
        assert (wide(*X) - m(*X)).abs().max() < 1e-5


def test_not_a_module():
    with pytest.raises(InvalidArgumentError):
        graphgrow.widen(lambda x: x, 1.5, example_inputs=X)


def test_verification_failure_raises(monkeypatch):
    """A rewrite that came out wrong is never returned: it raises VerificationError."""
    from graphgrow.core import arithmetic

    real = arithmetic.consume

    def broken(weight, axis, match, **kw):
        return real(weight, axis, match, **kw) * 1.01

    monkeypatch.setattr(arithmetic, "consume", broken)
    m = Net()
    with pytest.raises(graphgrow.VerificationError) as info:
        graphgrow.widen(m, 1.5, example_inputs=X)
    assert "output0" in str(info.value) and "max_rel" in str(info.value)
    assert not math.isnan(info.value.report.check.worst.max_rel)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.c.weight = self.b.weight  # tied weights
        self.d = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))))


def test_tied_weights_stay_tied():
    m = Tied().eval()
    x = (torch.randn(3, 6),)
    wide = graphgrow.widen(m, 1.5, example_inputs=x)
    assert wide.c.weight is wide.b.weight
    rep = wide.graphgrow_report
    a = next(s for s in rep.spaces if s.name == "a")
    assert a.new_width == 8 and "tied weights" in a.frozen_reasons[0]
    assert next(s for s in rep.spaces if s.name == "d").new_width == 12


def test_analyze_reports_spaces_without_changing():
    from helpers import space

    m = SubUntraceable().eval()
    rep = graphgrow.analyze(m, X)
    assert {s.name for s in rep.spaces} == {"a", "b", "c", "out"}
    assert all(s.new_width == s.old_width for s in rep.spaces)
    assert space(rep, "a").frozen_reasons and not space(rep, "b").frozen_reasons
    assert space(rep, "b").consumers == ["c"] and space(rep, "b").producers == ["b"]
