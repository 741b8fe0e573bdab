"""Rounding or error: a failed float32 verification is re-checked in float64, which decides.

A model with large activations that cancel in its output (a common offset of 1e4 removed by zero-mean
weights) loses ~1e-3 of its output scale to float32 rounding, so a correct widening differs from the
original by more than the default rtol 1e-4 in float32; in float64 the same widening agrees to ~1e-13.
A wrong mapping (one consumer column scaled by 1.001) fails in both precisions.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphgrow
from graphgrow.compare import RTOL64
from graphgrow.errors import VerificationError
from graphgrow.verify import check, float32_rounding_of


class Cancelling(nn.Module):
    """conv -> BN (shift 1e4) -> ReLU -> 1x1 conv whose weights sum to zero over the input channels."""

    def __init__(self, offset=1e4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(8, generator=g))
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            self.bn.bias.copy_(offset + torch.randn(8, generator=g))
            w = torch.randn(8, 8, 1, 1, generator=g)
            self.conv2.weight.copy_(w - w.mean(dim=1, keepdim=True))
            self.conv2.bias.zero_()

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))))


def _model():
    torch.manual_seed(0)
    return Cancelling().eval()


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_float32_false_refusal_is_decided_by_float64():
    model = _model()
    wide = graphgrow.widen(model, 2.0, example_inputs=(_x(),), seed=0)
    rep = wide.graphgrow_report.check
    w32, w64 = rep.worst.max_rel, rep.float64.worst.max_rel
    print(f"float32 max_rel {w32:.2e}, floor {rep.floor32:.2e}, float64 max_rel {w64:.2e}")
    assert not rep.float32_passed and w32 > 1e-4  # the float32 check alone refuses a correct widening
    assert rep.floor32 > 1e-5  # the original itself rounds at that scale in float32
    assert w64 < 1e-10  # the same widening in float64 (eps64 x the 1e4 cancellation)
    assert rep.decided_by == "float64" and rep.passed
    d = rep.to_dict()
    assert d["decided_by"] == "float64" and d["float32_passed"] is False
    assert d["float32_max_rel"] == w32 and d["float64_max_rel"] == w64 and d["float32_floor"] == rep.floor32
    s = rep.summary()
    assert s.startswith("equivalent") and "float64 re-check max_rel" in s and "decided by float64" in s
    assert "decided by float64" in wide.graphgrow_report.summary()


def test_without_float64_recheck_the_float32_verdict_stands():
    model = _model()
    wide = graphgrow.widen(model, 2.0, example_inputs=(_x(),), seed=0, verify="none")
    rep = check(model, wide, _x(), backend="torch", float64=False)
    assert not rep.passed and rep.float64 is None and rep.decided_by == "float32"


def _corrupt_one_consumer_column(module: nn.Module, factor=1.001) -> nn.Module:
    bad = copy.deepcopy(module)
    with torch.no_grad():
        bad.conv2.weight[:, 3] *= factor
    return bad


@pytest.mark.parametrize("offset", [10.0, 1e4])
def test_wrong_mapping_fails_in_float32_and_float64(offset):
    torch.manual_seed(0)
    model = Cancelling(offset).eval()
    wide = graphgrow.widen(model, 2.0, example_inputs=(_x(),), seed=0)
    bad = _corrupt_one_consumer_column(wide)
    # the float64 reference of the corrupted model: its float64 re-derivation, corrupted the same way
    wide64 = graphgrow.widen(copy.deepcopy(model).double(), 2.0, example_inputs=(_x().double(),), seed=0,
                             verify="none")
    bad64 = _corrupt_one_consumer_column(wide64)
    assert float32_rounding_of(bad.state_dict(), bad64.state_dict()) == ""
    rep = check(model, bad, _x(), backend="torch", candidate64=bad64)
    w32, w64 = rep.worst.max_rel, rep.float64.worst.max_rel
    print(f"offset {offset:g}: float32 max_rel {w32:.2e}, float64 max_rel {w64:.2e}")
    assert not rep.float32_passed and w32 > 1e-4
    assert rep.float64 is not None and not rep.float64.passed and w64 > 1e3 * RTOL64
    assert rep.decided_by == "float64" and not rep.passed
    assert "float64" in rep.failure_message("widened")


def test_wrong_mapping_inside_widen_is_refused_in_float64(monkeypatch):
    """A mapping bug in the arithmetic shows in the float32 result and in its float64 re-derivation alike."""
    from graphgrow.core import arithmetic

    real = arithmetic.consume

    def off_by_a_bit(weight, axis, match, **kw):
        out = real(weight, axis, match, **kw)
        if out.ndim == 4 and out.shape[1] == 16:  # conv2 reads the widened 16 channels
            out = out.copy()
            out[:, 3] *= 1.001
        return out

    monkeypatch.setattr(arithmetic, "consume", off_by_a_bit)
    with pytest.raises(VerificationError) as info:
        graphgrow.widen(_model(), 2.0, example_inputs=(_x(),), seed=0)
    rep = info.value.report.check
    assert rep.decided_by == "float64" and rep.float64.worst.max_rel > 1e3 * RTOL64
    assert "in float64" in str(info.value)


def test_float64_rederivation_that_is_not_the_result_keeps_the_float32_verdict():
    model = _model()
    wide = graphgrow.widen(model, 2.0, example_inputs=(_x(),), seed=0)
    bad = _corrupt_one_consumer_column(wide, 1.0 + 1e-6)  # a change below any tolerance in float32 terms
    wide64 = graphgrow.widen(copy.deepcopy(model).double(), 2.0, example_inputs=(_x().double(),), seed=0,
                             verify="none")
    assert "conv2.weight" in float32_rounding_of(bad.state_dict(), wide64.state_dict())


def test_deepen_float64_rederivation():
    model = _model()
    deep = graphgrow.deepen(model, after="conv2", block="conv-bn", example_inputs=(_x(),))
    rep = deep.graphgrow_report.check
    if not rep.float32_passed:
        assert rep.decided_by == "float64" and rep.float64.worst.max_rel < 1e-10
    assert rep.passed


@pytest.mark.slow
def test_regnetz_b16_with_large_activations():
    """timm regnetz_b16, BN statistics and affine parameters randomized: a correct x1.5 widening fails the
    float32 check (measured 3.7e-4; the original's own float32 error 3.0e-4) and passes in float64 (3.6e-13)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("regnetz_b16", pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.1)
                mod.weight.copy_(1 + torch.randn(mod.num_features, generator=g) * 0.2)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rep = graphgrow.widen(m, 1.5, example_inputs=(x,)).graphgrow_report.check
    assert not rep.float32_passed and rep.worst.max_rel > 1e-4 and rep.floor32 > 1e-4
    assert rep.decided_by == "float64" and rep.float64.worst.max_rel < 1e-11 and rep.passed
