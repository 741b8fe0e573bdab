"""Net2DeeperNet on ONNX files: every block kind on exported torchvision models, the paper's configuration
through the CLI, composition with widen, and the refusals (exit 2, nothing written)."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="exports its test models with torch")
from onnx import TensorProto, helper, numpy_helper

from graphgrow import models
from graphgrow.compare import make_session
import graphgrow.onnx as gonnx
from graphgrow.onnx.deepening import nonneg_signs
from test_onnx_models import export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "graphgrow", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def _ops(model, op):
    return sum(1 for n in model.graph.node if n.op_type == op)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "inception.onnx"
    onnx.save(export(models.inception_bn(factorized=True), models.example_inputs("inception_bn", batch=1), False),
              str(path))
    return path


def test_paper_deeper_inception_cli(inception_file, tmp_path):
    out = tmp_path / "deep.onnx"
    rep_path = tmp_path / "report.json"
    r = _cli("deepen", inception_file, "--after", r".*/branch_dbl3x3\.2\.1/act/Relu", "--kernel",
             models.PAPER_DEEPER_KERNEL, "-o", out, "--report", rep_path)
    assert r.returncode == 0, r.stderr
    assert "9 block(s) inserted (conv-bn-relu)" in r.stdout
    src, deep = onnx.load(str(inception_file)), onnx.load(str(out))
    assert _ops(deep, "Conv") == _ops(src, "Conv") + 36 and _ops(deep, "BatchNormalization") == 36
    import json

    rep = json.loads(rep_path.read_text())
    assert rep["check"]["passed"] and max(o["max_rel"] for o in rep["check"]["outputs"]) <= 1e-4
    assert [tuple(map(tuple, i["kernels"])) for i in rep["insertions"]] == [((3, 1), (1, 3), (3, 1), (1, 3))] * 9
    assert _cli("check", inception_file, out).returncode == 0
    # the deepened file widens too (widen after deepen), and stays equivalent to the original
    wrep = gonnx.widen(deep, 1.5)
    wide = wrep.model
    assert wrep.check.passed and len(wrep.widened) > 30
    feeds = {src.graph.input[0].name: np.random.default_rng(0).standard_normal(
        (1, 3, 32, 32)).astype(np.float32)}
    a = make_session(src.SerializeToString()).run(None, feeds)[0]
    b = make_session(wide.SerializeToString()).run(None, feeds)[0]
    assert np.abs(a - b).max() / np.abs(a).max() <= 1e-4


TV = {
    # model: (input size, [(block, after, kernel)])
    "resnet18": (64, [("conv-bn-relu", "/layer1/layer1.1/relu_1/Relu", "3"), ("conv-bn", "/layer2/layer2.0/Add", "3"),
                      ("residual", "/layer3/layer3.1/relu_1/Relu", "3"), ("linear", "/Flatten", "3"),
                      ("residual", "/Flatten", "3")]),
    "googlenet": (64, [("conv-bn-relu", "/inception3a/Concat", "1x3+3x1"), ("conv-bn", "/inception4a/Concat", "5"),
                       ("residual", "/maxpool3/MaxPool", "3"), ("linear", "/Flatten", "3")]),
    "inception_v3": (80, [("conv-bn-relu", "/Mixed_6b/Concat", "1x7+7x1"), ("conv-bn", "/Mixed_5b/Concat", "3"),
                          ("residual", "/Mixed_5c/Concat", "1x3+3x1"), ("linear", "/Flatten", "3")]),
    "mobilenet_v2": (64, [("conv-bn-relu", "/features/features.1/conv/conv.0/conv.0.2/Clip", "3"),
                          ("conv-bn", "/features/features.3/Add", "3"), ("residual", "/features/features.5/Add", "3"),
                          ("linear", "/Flatten", "3")]),
    "vgg11_bn": (224, [("conv-bn-relu", "/features/features.2/Relu", "3"), ("conv-bn", "/features/features.8/Conv", "3"),
                       ("residual", "/features/features.10/Relu", "3"),
                       ("linear", "/classifier/classifier.1/Relu", "3")]),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11_bn" else n for n in TV])
def test_torchvision_block_kinds_onnx(name):
    torchvision = pytest.importorskip("torchvision")
    size, cases = TV[name]
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    src = export(torchvision.models.get_model(name, num_classes=10, **kw), (torch.randn(1, 3, size, size),), False)
    before = src.SerializeToString()
    for block, after, kernel in cases:
        rep = gonnx.deepen(src, after=after, block=block, kernel=kernel)
        deep = rep.model
        assert rep.check.passed and rep.check.worst.max_rel <= 1e-4, (block, after)
        assert [i.block for i in rep.insertions] == [block] and rep.params_after > rep.params_before
        onnx.checker.check_model(deep)
        if block == "linear":
            assert rep.insertions[0].activation
    assert src.SerializeToString() == before, "the input model was modified"


def test_dynamo_export_and_graph_output():
    torchvision = pytest.importorskip("torchvision")
    src = export(torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),), True)
    relus = [n.name for n in src.graph.node if n.op_type == "Relu"]
    rep = gonnx.deepen(src, after=[relus[0], relus[-1]], kernel="1x3+3x1")
    deep = rep.model
    assert len(rep.insertions) == 2 and rep.check.passed
    # a block on the graph output itself: the output keeps its name
    out_name = src.graph.output[0].name
    rep = gonnx.deepen(src, after=out_name, block="residual")
    deep = rep.model
    assert deep.graph.output[0].name == out_name and rep.check.passed and rep.insertions[0].form == "linear"
    # and on the graph input: the consumers are rewired
    rep = gonnx.deepen(src, after=src.graph.input[0].name, block="conv-bn")
    deep = rep.model
    assert rep.check.passed and "may be negative" in rep.insertions[0].nonneg_reason


def _tiny(nodes, inits, out_shape, in_shape=(2, 4, 6, 6)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_nonneg_analysis():
    m = _tiny([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
               helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
               helper.make_node("Concat", ["p", "s"], ["c"], axis=1), helper.make_node("Sub", ["r", "s"], ["d"]),
               helper.make_node("Clip", ["x", "zero"], ["k"]), helper.make_node("Clip", ["x"], ["k2"]),
               helper.make_node("Mul", ["r", "neg"], ["n"]), helper.make_node("Max", ["x", "r"], ["mx"]),
               helper.make_node("Add", ["c", "c"], ["y"])],
              {"zero": np.float32(0), "neg": -np.ones((1, 4, 1, 1))}, (2, 8, 6, 6))
    s = nonneg_signs(m)
    assert [s[v].nonneg for v in ["x", "r", "p", "c", "d", "k", "k2", "n", "mx", "y"]] == \
        [False, True, True, True, False, True, False, False, True, True]
    assert "Sub" in s["d"].reason


def test_rank_one_value_has_no_channel_axis(tmp_path):
    m = _tiny([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], {"axes": np.array([1, 2, 3])},
              (2,))
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"))
    path = tmp_path / "r.onnx"
    onnx.save(m, str(path))
    r = _cli("deepen", path, "--after", "y", "--block", "conv-bn", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "no channel axis" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--after", "nothing_matches"], "matches no node or value"),
    (["--after", ".*Relu", "--kernel", "4"], "not a positive odd number"),
    (["--after", "/layer1/layer1.0/conv1/Conv"], "may be negative"),
    (["--after", "/fc/Gemm", "--block", "conv-bn"], "rank-2 tensor"),
    (["--after", "("], "not a valid regular expression"),
])
def test_cli_refusals(args, message, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "r18.onnx"
    onnx.save(export(torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),), False), str(path))
    stamp = path.read_bytes()
    out = tmp_path / "out.onnx"
    r = _cli("deepen", path, *args, "-o", out)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and path.read_bytes() == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["r18.onnx"]


def test_deepen_does_not_import_torch(inception_file, tmp_path):
    code = ("import sys; from graphgrow.cli import main; rc = main(['-q', 'deepen', %r, '--after', "
            "r'.*/branch_dbl3x3\\.2\\.1/act/Relu', '-o', %r]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)") % (
                str(inception_file), str(tmp_path / "d.onnx"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr


def test_widen_then_deepen_onnx():
    src = export(models.resnet_small(), models.example_inputs("resnet_small", batch=1), False)
    wide = gonnx.widen(src, 1.5).model
    relu = [n.name for n in wide.graph.node if n.op_type == "Relu"][3]
    rep = gonnx.deepen(wide, after=relu, kernel="1x3+3x1")
    deep = rep.model
    assert rep.check.passed and rep.insertions[0].channels == 24  # 16 x 1.5
    feeds = {src.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    a = make_session(src.SerializeToString()).run(None, feeds)[0]
    b = make_session(deep.SerializeToString()).run(None, feeds)[0]
    assert np.abs(a - b).max() / np.abs(a).max() <= 1e-4
