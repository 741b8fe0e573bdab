"""`graphgrow widen` / `inspect` on ONNX files: results, bad input, no torch on the path."""

import io
import json
import os
import subprocess
import sys
import warnings

import onnx
import pytest

torch = pytest.importorskip("torch", reason="exports its test models with torch")

from graphgrow import models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "graphgrow", *args], capture_output=True, text=True,
                           cwd=cwd or ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    path = d / "resnet.onnx"
    m = models.ZOO["resnet_small"].build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, models.example_inputs("resnet_small", batch=1), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], dynamic_axes={"image": {0: "N"}})
    return path


def _snapshot(folder):
    return {p: os.path.getmtime(os.path.join(folder, p)) for p in os.listdir(folder)}


def test_widen_check_inspect_roundtrip(model_file, tmp_path):
    out = tmp_path / "wide.onnx"
    rep = tmp_path / "rep.json"
    r = cli("widen", str(model_file), "--factor", "1.5", "-o", str(out), "--report", str(rep), "--shape", "image=2x3x32x32")
    assert r.returncode == 0, r.stderr
    assert "15/16 channel spaces widened" in r.stdout and "equivalent" in r.stdout
    d = json.loads(rep.read_text())
    assert d["params_after"] > 2 * d["params_before"] and d["check"]["outputs"][0]["max_rel"] <= 1e-4
    onnx.checker.check_model(str(out))
    # written with the permissions of any new file (the atomic write's temporary file is 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask
    r = cli("check", str(model_file), str(out), "--shape", "image=4x3x32x32")
    assert r.returncode == 0 and "equivalent" in r.stdout
    r = cli("inspect", str(model_file), "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert len(info["spaces"]) == 16 and len(info["groups"]) == 3
    dot = tmp_path / "g.dot"
    assert cli("inspect", str(model_file), "--dot", str(dot)).returncode == 0
    assert dot.read_text().startswith("graph channel_spaces")


def test_widen_options(model_file, tmp_path):
    out = tmp_path / "w.onnx"
    r = cli("widen", str(model_file), "--factor", "2", "--only", "layer1", "--divisor", "8", "-o", str(out), "--noise",
            "0.05", "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "r.json").read_text())
    widened = [s["name"] for s in d["spaces"] if s["new_width"] > s["old_width"]]
    assert widened and all("layer1" in n or "conv1" in n for n in widened)
    r = cli("widen", str(model_file), "--width", "/layer3/layer3.1/conv1/Conv=100", "-o", str(out))
    assert r.returncode == 0, r.stderr


def test_widen_does_not_import_torch(model_file, tmp_path):
    code = ("import sys, runpy; sys.argv = ['graphgrow', 'widen', %r, '-o', %r, '--factor', '1.3'];"
            "import graphgrow.cli as c; rc = c.main(sys.argv[1:]);"
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)") % (str(model_file),
                                                                                     str(tmp_path / "n.onnx"))
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr


def _bad(args, tmp_path, model_file=None, code=2):
    before = _snapshot(tmp_path)
    src = model_file.read_bytes() if model_file else None
    r = cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(tmp_path) == before  # nothing written
    if model_file:
        assert model_file.read_bytes() == src  # input untouched
    return lines[0]


def test_bad_inputs(model_file, tmp_path):
    assert "no such file" in _bad(["widen", str(tmp_path / "missing.onnx")], tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all" * 10)
    _bad(["widen", str(junk), "-o", str(tmp_path / "o.onnx")], tmp_path)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    _bad(["widen", str(trunc), "-o", str(tmp_path / "o.onnx")], tmp_path)
    msg = _bad(["widen", str(model_file), "-o", str(tmp_path / "nodir" / "o.onnx")], tmp_path, model_file)
    assert "does not exist" in msg
    msg = _bad(["widen", str(model_file), "-o", str(model_file)], tmp_path, model_file)
    assert "input" in msg
    _bad(["widen", str(model_file), "--factor", "0.9", "-o", str(tmp_path / "o.onnx")], tmp_path, model_file)
    _bad(["widen", str(model_file), "--only", "nomatch", "-o", str(tmp_path / "o.onnx")], tmp_path, model_file)
    _bad(["widen", str(model_file), "--shape", "nope=1x3", "-o", str(tmp_path / "o.onnx")], tmp_path, model_file)


def test_checker_failure_unknown_op_and_external_data(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    # fails the checker: a node reads a value nobody produces
    g = helper.make_graph([helper.make_node("Relu", ["nothing"], ["y"])], "g", [x], [y])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    assert "checker" in _bad(["widen", str(bad), "-o", str(tmp_path / "o.onnx")], tmp_path)
    # an op on the channel path from a domain graphgrow (and onnxruntime) does not know
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                           helper.make_node("Mystery", ["c"], ["y"], domain="acme")], "g", [x], [y], [w])
    unk = tmp_path / "unknown.onnx"
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("acme", 1)])
    unk.write_bytes(m.SerializeToString())
    _bad(["widen", str(unk), "-o", str(tmp_path / "o.onnx")], tmp_path)
    # external data pointing outside the model's folder
    sub = tmp_path / "sub"
    sub.mkdir()
    ext = onnx.ModelProto()
    ext.CopyFrom(m)
    t = ext.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 24)
    (sub / "ext.onnx").write_bytes(ext.SerializeToString())
    assert "outside" in _bad(["widen", str(sub / "ext.onnx"), "-o", str(sub / "o.onnx")], tmp_path)


def test_check_input_names_differ(model_file, tmp_path):
    m = onnx.load(str(model_file))
    m.graph.input[0].name = "other"
    for n in m.graph.node:
        for i, v in enumerate(n.input):
            if v == "image":
                n.input[i] = "other"
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    assert "input" in _bad(["check", str(model_file), str(other)], tmp_path)


def test_external_data_model_widens(model_file, tmp_path):
    m = onnx.load(str(model_file))
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(m, str(d / "m.onnx"), save_as_external_data=True, location="m.weights", size_threshold=0)
    r = cli("widen", str(d / "m.onnx"), "--factor", "1.5", "-o", str(d / "w.onnx"))
    assert r.returncode == 0, r.stderr
    r = cli("check", str(d / "m.onnx"), str(d / "w.onnx"))
    assert r.returncode == 0, r.stderr


def test_save_large_model_uses_external_data(tmp_path, monkeypatch):
    """Models over the protobuf limit are written as model + .data beside it, atomically."""
    from graphgrow.onnx import io as gio

    monkeypatch.setattr(gio, "TWO_GB", 1000)  # pretend the small model is huge
    src = models.ZOO["lenet"].build().eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(src, models.example_inputs("lenet", batch=1), f, dynamo=False, opset_version=17)
    m = onnx.load_from_string(f.getvalue())
    written = gio.save_model(m, str(tmp_path / "big.onnx"))
    assert written == [str(tmp_path / "big.onnx"), str(tmp_path / "big.onnx.data")]
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    back = gio.load_model(str(tmp_path / "big.onnx"))
    assert len(back.graph.initializer) == len(m.graph.initializer)


def test_model_onnxruntime_cannot_run_is_refused_in_one_line(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    # passes the checker, but its Reshape asks for the wrong number of elements
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])
    inits = [numpy_helper.from_array(np.ones((6, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array([1, 5, 16], np.int64), "shape")]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("Reshape", ["r", "shape"], ["y"])], "g", [x], [y], inits)
    bad = tmp_path / "cannot_run.onnx"
    bad.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    msg = _bad(["widen", str(bad), "-o", str(tmp_path / "o.onnx")], tmp_path, bad)
    assert "onnxruntime cannot run the original model" in msg and "1x3x4x4" in msg
