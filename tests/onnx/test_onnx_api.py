"""The public ONNX Python API (graphgrow.onnx.widen / deepen / analyze / check) on a small helper-built model:
report objects, saving, refusals, no torch import."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from tiny_onnx import tiny_cnn

import graphgrow.onnx as gonnx
from graphgrow.compare import CheckReport
from graphgrow.core.report import GrowthReport
from graphgrow.errors import InputMismatchError, InvalidArgumentError, ModelFileError, VerificationError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_widen_returns_a_report_with_the_model():
    m = tiny_cnn()
    before = m.SerializeToString()
    res = gonnx.widen(m, 1.5)
    assert isinstance(res, gonnx.WidenResult) and isinstance(res, GrowthReport) and dataclasses.is_dataclass(res)
    assert [(s.name, s.old_width, s.new_width) for s in res.spaces] == [("c1", 6, 9), ("c2", 5, 8), ("head", 4, 4)]
    assert (res.params_before, res.params_after) == (318, 720)
    assert res.check.passed and res.check.worst.max_rel <= 1e-5
    assert res.summary().startswith("2/3 channel spaces widened, 1 frozen; params 318 -> 720; equivalent")
    d = res.to_dict()
    assert d["params_after"] == 720 and d["check"]["passed"] and "model" not in d
    assert isinstance(res.model, onnx.ModelProto) and res.source is None
    onnx.checker.check_model(res.model)
    assert m.SerializeToString() == before  # the input is not modified
    assert gonnx.widen(m, 1.5, check=False).check is None


def test_widen_path_save_atomic_and_refusals(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(src))
    data = src.read_bytes()
    res = gonnx.widen(src, widths={"c1": 10}, factor=None)
    assert res.source == str(src) and [s.new_width for s in res.spaces] == [10, 5, 4]
    assert res.save(tmp_path / "w.onnx") == [str(tmp_path / "w.onnx")]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "w.onnx"]  # no temporary file left
    assert gonnx.check(src, tmp_path / "w.onnx").passed
    with pytest.raises(InvalidArgumentError, match="is the input file"):
        res.save(src)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        res.save(tmp_path / "no" / "w.onnx")
    assert src.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["m.onnx", "w.onnx"]


@pytest.mark.parametrize("call, error, words", [
    (lambda: gonnx.widen(42), InvalidArgumentError, "onnx.ModelProto or the path"),
    (lambda: gonnx.widen("/nonexistent/m.onnx"), ModelFileError, "no such file"),
    (lambda: gonnx.widen(tiny_cnn(), 0.5), InvalidArgumentError, "factor"),
    (lambda: gonnx.widen(tiny_cnn(), batches=0), InvalidArgumentError, "batches must be a positive integer"),
    (lambda: gonnx.widen(tiny_cnn(), only="nomatch"), InvalidArgumentError, "nomatch"),
    (lambda: gonnx.widen(tiny_cnn(), init="zeros"), InvalidArgumentError, "init"),
    (lambda: gonnx.deepen(tiny_cnn(), after="c1"), InvalidArgumentError, "may be negative"),
    (lambda: gonnx.deepen(tiny_cnn(), after="relu1", kernel=4), InvalidArgumentError, "odd"),
    (lambda: gonnx.analyze(tiny_cnn(), {"nope": (1, 3)}), InvalidArgumentError, "'nope', which is not an input"),
    (lambda: gonnx.widen(tiny_cnn(), shapes=["x=1x3x8x8"]), InvalidArgumentError, "shapes must be a mapping"),
    (lambda: gonnx.deepen(tiny_cnn(), after="relu1", shapes={"x": (1, -3)}), InvalidArgumentError,
     "non-negative integers"),
    (lambda: gonnx.check(tiny_cnn(), tiny_cnn(), shapes={"x": (1, 3, 8)}), InputMismatchError, "rank 3"),
    (lambda: gonnx.check(tiny_cnn(), tiny_cnn(), inputs={"z": np.zeros((1, 3, 8, 8), np.float32)}),
     InputMismatchError, "missing 'x'"),
])
def test_refusals_are_one_sentence(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value) and "\n" not in str(info.value)


def test_not_equivalent_raises_with_the_report(monkeypatch):
    # a wrong mapping (every consumer weight 0.1 % off) fails in float32 and in the float64 re-check;
    # mere rounding (factor 3 divides by 3) under a zero tolerance is rescued by the float64 re-check
    res = gonnx.widen(tiny_cnn(), 3.0, atol=0.0, rtol=0.0)
    assert res.check.passed and res.check.float32_passed is False
    from graphgrow.core import arithmetic

    consume = arithmetic.consume
    monkeypatch.setattr(arithmetic, "consume", lambda *a, **k: consume(*a, **k) * 1.001)
    with pytest.raises(VerificationError, match="widened model is not equivalent: output 'y'") as info:
        gonnx.widen(tiny_cnn(), 3.0)
    assert info.value.report.check.passed is False and info.value.report.params_after > 318


def test_deepen(tmp_path):
    res = gonnx.deepen(tiny_cnn(), after="relu1", kernel="1x3+3x1")
    assert isinstance(res, gonnx.DeepenResult)
    assert [(i.after, i.block, i.channels, i.kernels) for i in res.insertions] == \
        [("relu1", "conv-bn-relu", 6, [[1, 3], [3, 1]])]
    assert (res.params_before, res.params_after) == (318, 582) and res.check.passed
    assert res.to_dict()["insertions"][0]["after"] == "relu1"
    assert res.save(tmp_path / "d.onnx") == [str(tmp_path / "d.onnx")]
    assert gonnx.check(tiny_cnn(), tmp_path / "d.onnx").passed


def test_analyze():
    res = gonnx.analyze(tiny_cnn())
    assert isinstance(res, gonnx.AnalysisResult)
    assert [(s.name, s.old_width, bool(s.frozen_reasons)) for s in res.spaces] == \
        [("c1", 6, False), ("c2", 5, False), ("head", 4, True)]
    assert res.groups == [] and res.to_dict()["groups"] == []
    assert res.summary() == "3 channel spaces, 2 widenable, 1 frozen; 0 coupled groups; params 318"
    assert res.to_dot().startswith("graph channel_spaces {")


def test_check_models_and_paths(tmp_path):
    res = gonnx.check(tiny_cnn(), tiny_cnn(), batches=2)
    assert isinstance(res, gonnx.CheckResult) and isinstance(res, CheckReport)
    assert res.passed and res.equivalent and res.batches == 2 and res.outputs[0].max_abs == 0.0
    assert res.input_shapes == {"x": (1, 3, 8, 8)}
    d = res.to_dict()
    assert d["equivalent"] is True and d["input_shapes"] == {"x": [1, 3, 8, 8]} and d["reference"] is None
    onnx.save(tiny_cnn(1), str(tmp_path / "other.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    res = gonnx.check(tiny_cnn(), tmp_path / "other.onnx", inputs={"x": x}, batches=1)
    assert not res.passed and res.candidate == str(tmp_path / "other.onnx") and res.outputs[0].max_rel > 0.1


def test_the_onnx_api_never_imports_torch(tmp_path):
    code = ("import sys, onnx; sys.path.insert(0, %r); from tiny_onnx import tiny_cnn; import graphgrow.onnx as g\n"
            "m = tiny_cnn(); w = g.widen(m, 1.5); d = g.deepen(m, after='relu2'); a = g.analyze(m)\n"
            "c = g.check(m, w.model); w.save(%r)\n"
            "assert w.check.passed and d.check.passed and c.passed and len(a.spaces) == 3\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('OK')") % (
                os.path.join(ROOT, "tests"), str(tmp_path / "w.onnx"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr


def test_readme_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## ONNX Python API"):]
    code = section[section.index("```python\n") + 10: section.index("```\n", section.index("```python\n") + 10)]
    code += "\nimport sys; assert 'torch' not in sys.modules, 'torch was imported'\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("2/3 channel spaces widened, 1 frozen; params 5,360 -> 11,496; equivalent: 1 output")
    assert lines[1].startswith("3 channel spaces, 2 widenable, 1 frozen; 0 coupled groups")
    assert lines[2].startswith("True ")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.wide.onnx"]
