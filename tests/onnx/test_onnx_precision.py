"""Rounding or error on ONNX (no torch): a failed float32 check is re-checked on float64 copies of the graphs.

The graph has large activations that cancel in its output (BN shift 1e4 removed by zero-mean 1x1 weights),
so float32 rounding alone moves the output by ~1e-3 of its scale.  onnxruntime has no double Conv; the
float64 copies run in onnx.reference.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphgrow.cli import main
from graphgrow.compare import RTOL64
from graphgrow.onnx.engine import widen_model
from graphgrow.onnx.precision import rounding_of, to_float64


def cancelling(offset=1e4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    w = {"W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "B1": rng.standard_normal(8).astype(np.float32),
         "s": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32),
         "b": (offset + rng.standard_normal(8)).astype(np.float32),
         "m": rng.standard_normal(8).astype(np.float32), "v": (rng.random(8) + 0.5).astype(np.float32),
         "W2": w2 - w2.mean(axis=1, keepdims=True), "W3": rng.standard_normal((4, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "W3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "cancelling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_to_float64_converts_weights_types_and_casts():
    m = to_float64(cancelling())
    assert {t.data_type for t in m.graph.initializer} == {TensorProto.DOUBLE}
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    onnx.checker.check_model(m)


def test_widen_float32_false_refusal_decided_by_float64():
    wide, report = widen_model(cancelling(), 2.0)
    rep = report.check
    w32, w64 = rep.worst.max_rel, rep.float64.worst.max_rel
    print(f"onnx: float32 max_rel {w32:.2e}, floor {rep.floor32:.2e}, float64 max_rel {w64:.2e}")
    assert not rep.float32_passed and w32 > 1e-4
    assert rep.floor32 > 1e-5
    assert w64 < 1e-10 and rep.decided_by == "float64" and rep.passed
    assert "decided by float64" in report.summary()


def _corrupt(model: onnx.ModelProto, factor=1.001) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for i, t in enumerate(bad.graph.initializer):
        if t.name == "W2":
            a = numpy_helper.to_array(t).copy()
            a[:, 3] *= factor
            bad.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, "W2"))
    return bad


def test_wrong_mapping_fails_in_float32_and_float64_onnx():
    model = cancelling()
    wide, _ = widen_model(model, 2.0)
    bad = _corrupt(wide)
    wide64, _ = widen_model(to_float64(model), 2.0, check=False)
    assert rounding_of(wide, wide64) == ""
    assert "W2" in rounding_of(bad, wide64)
    bad64 = _corrupt(wide64)
    from graphgrow.onnx.engine import input_specs, verify

    rep = verify(model, bad, input_specs(model), candidate64=bad64)
    w32, w64 = rep.worst.max_rel, rep.float64.worst.max_rel
    print(f"onnx corrupted: float32 max_rel {w32:.2e}, float64 max_rel {w64:.2e}")
    assert not rep.float32_passed and w32 > 1e-4
    assert not rep.float64.passed and w64 > 1e3 * RTOL64 and not rep.passed


def doubled(model: onnx.ModelProto) -> onnx.ModelProto:
    """conv1/BN doubled by hand (every channel twice, conv2 columns halved: exact in float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        a = numpy_helper.to_array(t)
        if t.name in ("W1", "B1", "s", "b", "m", "v"):
            a = np.repeat(a, 2, axis=0)
        elif t.name == "W2":
            a = np.repeat(a, 2, axis=1) / np.float32(2)
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    return out


def test_check_cli_shows_both_figures(tmp_path, capsys):
    model = cancelling()
    wide, _ = widen_model(model, 2.0)
    ref, exact, wide_f, bad = (tmp_path / f"{n}.onnx" for n in ("ref", "exact", "wide", "bad"))
    onnx.save(model, str(ref))
    onnx.save(doubled(model), str(exact))
    onnx.save(wide, str(wide_f))
    onnx.save(_corrupt(doubled(model)), str(bad))
    # weights exact in float32, outputs off by rounding: the float64 copies agree and decide
    assert main(["check", str(ref), str(exact), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print(f"check exact: float32 {d['float32_max_rel']:.2e}, float64 {d['float64_max_rel']:.2e}, "
              f"floor {d['float32_floor']:.2e}")
    assert d["equivalent"] is True and d["decided_by"] == "float64" and d["float32_passed"] is False
    assert d["float32_max_rel"] > 1e-4 and d["float64_max_rel"] < 1e-10 and d["float32_floor"] > 1e-5
    assert d["float64_weights"] == "float32 cast"
    # a widening with copy counts of 3 carries float32 weight rounding: the cast copies cannot clear it
    assert main(["check", str(ref), str(wide_f), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print(f"check widened: float32 {d['float32_max_rel']:.2e}, float64 (cast) {d['float64_max_rel']:.2e}")
    assert d["decided_by"] == "float32" and d["float64_max_rel"] > RTOL64
    assert main(["check", str(ref), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "float64 re-check (float32 weights cast) max_rel" in out and "decided by float32" in out


def test_widen_cli_refuses_a_wrong_mapping_in_float64(tmp_path, capsys, monkeypatch):
    from graphgrow.core import arithmetic

    real = arithmetic.consume

    def off_by_a_bit(weight, axis, match, **kw):
        out = real(weight, axis, match, **kw)
        if out.ndim == 4 and out.shape[1] == 16:
            out = out.copy()
            out[:, 3] *= 1.001
        return out

    monkeypatch.setattr(arithmetic, "consume", off_by_a_bit)
    src, dst = tmp_path / "m.onnx", tmp_path / "w.onnx"
    onnx.save(cancelling(), str(src))
    assert main(["widen", str(src), "--factor", "2", "-o", str(dst)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "in float64" in err and not dst.exists()
