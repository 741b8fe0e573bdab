"""Tests for numerical equivalence checking (graphgrow/check.py and graphgrow/compare.py)."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from graphgrow.verify import check  # noqa: E402
from graphgrow.compare import (DEFAULT_ATOL, DEFAULT_RTOL, CheckReport, OutputDiff, compare_outputs,  # noqa: E402
                               make_session, random_feeds, run_onnx)
from graphgrow.errors import (GraphGrowError, InputMismatchError, InvalidArgumentError,  # noqa: E402
                              UnsupportedModelError)


# --------------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head_a(h), self.head_b(h)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return {"first": self.a(x), "nested": (self.b(x), x.sum(dim=1))}


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx, mask):
        return self.fc(self.emb(idx) * mask.unsqueeze(-1).float())


class NaNAt(nn.Module):
    def __init__(self, nan: bool):
        super().__init__()
        self.nan = nan

    def forward(self, x):
        if self.nan:
            x = x.clone()
            x[0, 0] = float("nan")
        return x * 2


def _model(cls, seed=0, *args):
    torch.manual_seed(seed)
    return cls(*args)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# check(): identical / perturbed models
# --------------------------------------------------------------------------------------------------------------------


def test_identical_models_torch_backend_exact():
    ref = _model(ConvNet)
    cand = copy.deepcopy(ref)
    rep = check(ref, cand, _x(2, 3, 8, 8), backend="torch")
    assert isinstance(rep, CheckReport)
    assert rep.passed
    assert rep.backend == "torch" and rep.batches == 3
    assert len(rep.outputs) == 1
    out = rep.outputs[0]
    assert out.name == "output0" and out.shape == (2, 5)
    assert out.max_abs == 0.0 and out.max_rel == 0.0
    assert out.cosine == pytest.approx(1.0)
    assert out.ref_max > 0


def test_identical_models_onnxruntime_backend():
    ref = _model(ConvNet)
    cand = copy.deepcopy(ref)
    rep = check(ref, cand, _x(2, 3, 8, 8), backend="onnxruntime", floor=True)
    assert rep.passed
    assert rep.backend == "onnxruntime"
    assert rep.providers == ["CPUExecutionProvider"]
    assert rep.outputs[0].max_rel < 1e-5
    assert rep.floor is not None and 0.0 <= rep.floor < 1e-5
    assert "runtime floor" in rep.summary()


def test_same_object_and_default_tolerances():
    ref = _model(ConvNet)
    rep = check(ref, ref, _x(1, 3, 8, 8), backend="torch")
    assert rep.passed and rep.atol == DEFAULT_ATOL == 1e-5 and rep.rtol == DEFAULT_RTOL == 1e-4


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_perturbed_weight_fails_and_worst_names_it(backend):
    ref = _model(TwoHeads)
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.head_b.weight[0, 0] += 1e-2
    rep = check(ref, cand, _x(4, 6), backend=backend)
    assert not rep.passed
    assert len(rep.outputs) == 2
    a, b = rep.outputs
    assert a.name == "output0" and a.passed
    assert b.name == "output1" and not b.passed
    assert rep.worst is b
    assert b.max_abs > DEFAULT_ATOL and b.max_rel > DEFAULT_RTOL
    assert rep.summary().startswith("NOT equivalent")
    assert "'output1'" in rep.summary()


def test_multi_output_module_gives_one_diff_per_output():
    ref = _model(TwoHeads)
    rep = check(ref, copy.deepcopy(ref), _x(4, 6), backend="onnxruntime")
    assert rep.passed
    assert [o.name for o in rep.outputs] == ["output0", "output1"]
    assert [o.shape for o in rep.outputs] == [(4, 4), (4, 3)]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_nested_dict_outputs_are_flattened_in_order(backend):
    ref = _model(DictOut)
    rep = check(ref, copy.deepcopy(ref), _x(3, 4), backend=backend)
    assert rep.passed
    assert [o.shape for o in rep.outputs] == [(3, 2), (3, 3), (3,)]


def test_integer_and_bool_inputs_random_batches_stay_valid():
    ref = _model(Embed)
    idx = torch.tensor([[1, 9, 3], [0, 2, 9]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for backend in ("torch", "onnxruntime"):
        rep = check(ref, copy.deepcopy(ref), (idx, mask), backend=backend, batches=4)
        assert rep.passed and rep.batches == 4


def test_shape_mismatch_between_models_fails_without_crash():
    ref = _model(nn.Linear, 0, 4, 5)
    cand = _model(nn.Linear, 0, 4, 6)
    rep = check(ref, cand, _x(2, 4), backend="torch")
    assert not rep.passed
    out = rep.outputs[0]
    assert math.isinf(out.max_abs)
    assert "shape mismatch" in out.note
    assert "NOT equivalent" in rep.summary()
    json.dumps(rep.to_dict(), allow_nan=False)


def test_nan_in_candidate_fails():
    x = _x(2, 3)
    rep = check(NaNAt(False), NaNAt(True), x, backend="torch")
    assert not rep.passed
    assert math.isinf(rep.outputs[0].max_abs)
    assert "non-finite" in rep.outputs[0].note
    # NaN at the same place in both is agreement
    assert check(NaNAt(True), NaNAt(True), x, backend="torch").passed


def test_training_flags_restored_and_parameters_untouched():
    ref = _model(ConvNet)
    cand = copy.deepcopy(ref)
    ref.train()
    cand.train()
    cand.bn.eval()  # mixed flags must come back exactly
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    cand_before = {k: v.clone() for k, v in cand.state_dict().items()}
    rep = check(ref, cand, _x(2, 3, 8, 8), backend="onnxruntime", floor=True)
    assert rep.passed
    assert ref.training and ref.bn.training and ref.conv.training
    assert cand.training and not cand.bn.training and cand.conv.training
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in cand.state_dict().items():
        assert torch.equal(v, cand_before[k]), k


# --------------------------------------------------------------------------------------------------------------------
# check(): argument errors
# --------------------------------------------------------------------------------------------------------------------


def test_missing_inputs_raise():
    ref = _model(ConvNet)
    with pytest.raises(InvalidArgumentError, match="example inputs are required"):
        check(ref, ref)


def test_bad_arguments_raise():
    ref = _model(ConvNet)
    x = _x(1, 3, 8, 8)
    with pytest.raises(InvalidArgumentError):
        check(ref, ref, x, backend="tvm")
    with pytest.raises(InvalidArgumentError):
        check(ref, ref, x, batches=0)
    with pytest.raises(InvalidArgumentError):
        check(ref, ref, x, atol=-1.0)
    with pytest.raises(InvalidArgumentError):
        check(ref, "not a module", x)
    with pytest.raises(InputMismatchError):
        check(ref, ref, _x(1, 5, 8, 8), backend="torch")


def test_cuda_provider_unavailable_raises(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ref = _model(ConvNet)
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        check(ref, ref, _x(1, 3, 8, 8), providers="cuda")
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        check(ref, ref, _x(1, 3, 8, 8), providers=["CUDAExecutionProvider"])


def test_export_failure_is_unsupported_model_error():
    ref = _model(ConvNet)
    with pytest.raises(UnsupportedModelError, match="could not export reference model to ONNX"):
        check(ref, ref, _x(1, 3, 8, 8), opset=999)


# --------------------------------------------------------------------------------------------------------------------
# compare.py
# --------------------------------------------------------------------------------------------------------------------


def test_compare_outputs_basic_definitions():
    a = np.array([1.0, -2.0, 4.0], dtype=np.float32)
    b = np.array([1.0, -2.0, 4.002], dtype=np.float32)
    rep = compare_outputs([a], [b], ["y"], atol=1e-5, rtol=1e-4)
    o = rep.outputs[0]
    assert isinstance(o, OutputDiff)
    assert o.name == "y" and o.shape == (3,)
    assert o.ref_max == pytest.approx(4.0)
    assert o.max_abs == pytest.approx(0.002, rel=1e-3)
    assert o.max_rel == pytest.approx(0.0005, rel=1e-3)
    assert 0.99 < o.cosine <= 1.0
    assert not o.passed  # 0.002 > atol and 5e-4 > rtol
    assert compare_outputs([a], [b], ["y"], atol=1e-2, rtol=0).passed
    assert compare_outputs([a], [b], ["y"], atol=0, rtol=1e-3).passed


def test_compare_outputs_zero_reference_and_zero_cosine():
    z = np.zeros((2, 2))
    rep = compare_outputs([z], [z.copy()])
    assert rep.passed and rep.outputs[0].cosine == 1.0 and rep.outputs[0].max_rel == 0.0
    rep = compare_outputs([z], [np.full((2, 2), 1e-3)])
    o = rep.outputs[0]
    assert o.max_rel == o.max_abs == pytest.approx(1e-3)  # max|a| == 0: max_rel falls back to max_abs
    assert o.cosine == 0.0


def test_compare_outputs_accumulates_over_batches():
    r1, c1 = np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-3])
    r2, c2 = np.array([10.0, 1.0]), np.array([10.0 + 1e-2, 1.0])
    rep = compare_outputs([[r1], [r2]], [[c1], [c2]], atol=1.0, rtol=1.0)
    o = rep.outputs[0]
    assert rep.batches == 2
    assert o.max_abs == pytest.approx(1e-2)  # max over batches
    assert o.max_rel == pytest.approx(max(1e-3 / 2, 1e-2 / 10))
    assert o.ref_max == pytest.approx(10.0)
    single = [compare_outputs([r], [c]).outputs[0].cosine for r, c in ((r1, c1), (r2, c2))]
    assert o.cosine == pytest.approx(min(single))


def test_compare_outputs_shape_and_count_mismatch():
    rep = compare_outputs([np.ones((2, 3))], [np.ones((3, 2))])
    o = rep.outputs[0]
    assert not rep.passed and math.isinf(o.max_abs) and o.shape == (2, 3)
    rep = compare_outputs([np.ones(2), np.ones(2)], [np.ones(2)])
    assert [o.passed for o in rep.outputs] == [True, False]
    assert "missing in candidate" in rep.outputs[1].note


def test_compare_outputs_nonfinite():
    ref = np.array([1.0, np.nan, np.inf, 2.0])
    assert compare_outputs([ref], [ref.copy()]).passed  # same NaN / inf positions agree
    cand = ref.copy()
    cand[0] = np.nan  # NaN in candidate where the reference is finite
    rep = compare_outputs([ref], [cand])
    assert not rep.passed and "non-finite" in rep.outputs[0].note
    cand = ref.copy()
    cand[2] = -np.inf
    assert not compare_outputs([ref], [cand]).passed
    cand = ref.copy()
    cand[1] = 5.0  # finite where the reference is NaN is a mismatch too
    assert not compare_outputs([ref], [cand]).passed


def test_report_to_dict_json_table_and_summary():
    ref = [np.ones((1, 4), np.float32), np.zeros(3, np.float32)]
    cand = [np.ones((1, 4), np.float32), np.array([np.nan, 0, 0], np.float32)]
    rep = compare_outputs(ref, cand, ["logits", "aux"])
    rep.floor = 1e-7
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["passed"] is False and back["worst"] == "aux"
    assert [o["name"] for o in back["outputs"]] == ["logits", "aux"]
    assert back["outputs"][1]["max_abs"] == "inf"
    table = rep.table()
    lines = table.splitlines()
    assert lines[0].split() == ["output", "shape", "max_abs", "max_rel", "cosine", "ok"]
    assert any(line.startswith("logits") and " ok" in line for line in lines)
    assert any(line.startswith("aux") and "FAIL" in line for line in lines)
    ok = compare_outputs([np.ones(3)], [np.ones(3)], ["logits"])
    assert ok.summary().startswith("equivalent: 1 output, worst 'logits' max_rel 0.0e+00 (max_abs 0.0e+00, cos 1.0")
    json.dumps(ok.to_dict(), allow_nan=False)


def _tiny_onnx():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, -2.0, 0.5])
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"]),
             helper.make_node("Identity", ["k"], ["s"])]
    graph = helper.make_graph(nodes, "tiny", [x, k], [y, s], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_run_onnx_random_feeds_and_sessions(tmp_path):
    import onnx

    model = _tiny_onnx()
    sess = make_session(model, "cpu")
    feeds = random_feeds(sess, 0, dim_values={"N": 5})
    assert feeds["x"].shape == (5, 3) and feeds["x"].dtype == np.float32
    assert feeds["k"].dtype == np.int64 and feeds["k"].min() >= 0
    again = random_feeds(sess.get_inputs(), 0, dim_values={"N": 5})
    assert all(np.array_equal(feeds[n], again[n]) for n in feeds)  # reproducible from the seed
    assert not np.array_equal(random_feeds(sess, 1, dim_values={"N": 5})["x"], feeds["x"])
    ex = random_feeds({"i": np.array([0, 3]), "b": ((2, 2), np.bool_)}, 3)
    assert ex["i"].max() <= 3 and ex["b"].dtype == np.bool_
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    outs_proto = run_onnx(model, feeds)
    outs_path = run_onnx(str(path), feeds, providers=["CPUExecutionProvider"])
    outs_sess = run_onnx(sess, feeds)
    expected = np.maximum(feeds["x"] * np.array([1.0, -2.0, 0.5], np.float32), 0)
    np.testing.assert_array_equal(outs_proto[0], expected)
    np.testing.assert_array_equal(outs_proto[1], feeds["k"])
    rep = compare_outputs(outs_proto, outs_path, ["y", "s"])
    assert rep.passed and rep.outputs[0].max_abs == 0.0 and rep.outputs[1].max_abs == 0.0
    assert compare_outputs(outs_proto, outs_sess).passed
    with pytest.raises(InputMismatchError):
        run_onnx(model, {"x": feeds["x"]})
    with pytest.raises(GraphGrowError):
        make_session(str(tmp_path / "missing.onnx"))
    with pytest.raises(InvalidArgumentError):
        make_session(model, providers=["NoSuchExecutionProvider"])


def test_compare_module_does_not_import_torch():
    path = os.path.join(_ROOT, "graphgrow", "compare.py")
    code = textwrap.dedent(f"""
        import importlib.util, sys, types
        # a bare package object, so that compare.py's relative imports resolve without running __init__.py
        pkg = types.ModuleType("graphgrow")
        pkg.__path__ = [{os.path.dirname(path)!r}]
        sys.modules["graphgrow"] = pkg
        spec = importlib.util.spec_from_file_location("graphgrow.compare", {path!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["graphgrow.compare"] = mod
        spec.loader.exec_module(mod)
        import numpy as np
        rep = mod.compare_outputs([np.ones(3)], [np.ones(3)])
        assert rep.passed
        assert 'torch' not in sys.modules, 'compare.py imported torch'
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
