"""ONNX frontend on hand-built graphs: every opset variant and constant style, widened and verified."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphgrow.onnx as gonnx

RNG = np.random.default_rng(0)


def W(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def make(nodes, inits, opset, inputs=(("x", [1, 3, 8, 8]),), out=("y", [1, 4]), ir=None, extra_inputs=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
                          + list(extra_inputs),
                          [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    else:
        m.ir_version = min(m.ir_version, 8)
    onnx.checker.check_model(m)
    return m


def widths(report):
    return {s.name: (s.old_width, s.new_width) for s in report.spaces}


def head(src, c, opset):
    """GlobalAveragePool -> Flatten -> Gemm to 4 outputs (the fixed output)."""
    return ([helper.make_node("GlobalAveragePool", [src], ["hgp"]), helper.make_node("Flatten", ["hgp"], ["hfl"]),
             helper.make_node("Gemm", ["hfl", "hw", "hb"], ["y"], transB=1, name="head")],
            [init("hw", W(4, c)), init("hb", W(4))])


def conv(name, x, w, b, out, **kw):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [out], name=name, **kw)


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
def test_conv_bn_relu_residual_concat(opset):
    n = [conv("c1", "x", "w1", "b1", "a"),
         helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["bn"], name="bn1"),
         helper.make_node("Relu", ["bn"], ["r"]),
         conv("c2", "r", "w2", None, "p", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["p", "r"], ["res"]),
         conv("c3", "x", "w3", "b3", "q"),
         helper.make_node("Concat", ["res", "q"], ["cat"], axis=1),
         helper.make_node("LeakyRelu", ["cat"], ["lr"], alpha=0.1)]
    hn, hi = head("lr", 11, opset)
    inits = [init("w1", W(6, 3, 1, 1)), init("b1", W(6)), init("s", W(6)), init("bb", W(6)), init("m", W(6)),
             init("v", np.abs(W(6)) + 0.5), init("w2", W(6, 6, 3, 3)), init("w3", W(5, 3, 1, 1)), init("b3", W(5))]
    m = make(n + hn, inits + hi, opset)
    rep = gonnx.widen(m, 1.5)
    wide = rep.model
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    assert widths(rep)["c1"] == (6, 9) and widths(rep)["c2"] == (6, 9) and widths(rep)["c3"] == (5, 8)
    onnx.checker.check_model(wide)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_variants(opset):
    kw, extra = {}, []
    if opset < 13:
        kw = {"split": [4, 8]}
    elif opset < 18:
        extra = ["sp"]
    inits = [init("w1", W(12, 3, 1, 1)), init("wa", W(5, 4, 1, 1)), init("wb", W(5, 8, 1, 1))]
    if extra:
        inits.append(init("sp", np.array([4, 8], np.int64)))
    if opset >= 18:
        inits[0] = init("w1", W(12, 3, 1, 1))
        kw = {"num_outputs": 2}
        inits[1], inits[2] = init("wa", W(5, 6, 1, 1)), init("wb", W(5, 6, 1, 1))
    n = [conv("c1", "x", "w1", None, "a"),
         helper.make_node("Split", ["a"] + extra, ["s0", "s1"], axis=1, **kw),
         conv("ca", "s0", "wa", None, "pa"), conv("cb", "s1", "wb", None, "pb"),
         helper.make_node("Add", ["pa", "pb"], ["z"])]
    hn, hi = head("z", 5, opset)
    rep = gonnx.widen(make(n + hn, inits + hi, opset), 1.5)
    assert rep.check.passed
    assert widths(rep)["c1"][1] > 12


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_variants(opset):
    if opset < 10:
        sl = [helper.make_node("Slice", ["a"], ["s"], starts=[2], ends=[7], axes=[1])]
        inits = []
    else:
        sl = [helper.make_node("Slice", ["a", "st", "en", "ax"], ["s"])]
        inits = [init("st", np.array([2], np.int64)), init("en", np.array([7], np.int64)),
                 init("ax", np.array([1], np.int64))]
    n = [conv("c1", "x", "w1", "b1", "a")] + sl + [conv("c2", "s", "w2", None, "z")]
    hn, hi = head("z", 4, opset)
    inits += [init("w1", W(8, 3, 1, 1)), init("b1", W(8)), init("w2", W(4, 5, 1, 1))]
    rep = gonnx.widen(make(n + hn, inits + hi, opset), 2.0)
    assert rep.check.passed
    if opset >= 10:
        assert widths(rep)["c1"] == (8, 16)  # slice bounds rewritten
    else:
        assert rep.check.worst.max_rel < 1e-5  # attribute slices: frozen, still exact


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_matmul_add_flatten(trans_b):
    w1 = W(8, 3 * 4 * 4) if trans_b else W(3 * 4 * 4, 8)
    n = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=trans_b, alpha=0.5, beta=2.0, name="fc1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["mm"], name="fc2"),
         helper.make_node("Add", ["mm", "b2"], ["a2"]),
         helper.make_node("Tanh", ["a2"], ["t"]),
         helper.make_node("MatMul", ["t", "w3"], ["y"], name="fc3")]
    inits = [init("w1", w1), init("b1", W(8)), init("w2", W(8, 6)), init("b2", W(6)), init("w3", W(6, 2))]
    m = make(n, inits, 13, inputs=(("x", [2, 3, 4, 4]),), out=("y", [2, 2]))
    rep = gonnx.widen(m, 1.5)
    assert rep.check.passed and widths(rep)["fc1"] == (8, 12) and widths(rep)["fc2"] == (6, 9)


def test_initializers_as_inputs_constant_nodes_and_folded_weights():
    """Old IR (weights listed as inputs), weights in Constant nodes and computed from constants."""
    w1 = W(6, 3, 1, 1)
    n = [helper.make_node("Constant", [], ["w1c"], value=numpy_helper.from_array(w1)),
         conv("c1", "x", "w1c", None, "a"),
         helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("ConstantOfShape", ["shp"], ["zeros"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Reshape", ["w2flat", "w2shape"], ["w2"]),
         helper.make_node("Cast", ["w2"], ["w2f"], to=TensorProto.FLOAT),
         conv("c2", "r", "w2f", "zeros", "z")]
    hn, hi = head("z", 4, 13)
    inits = [init("shp", np.array([4], np.int64)), init("w2flat", W(24)),
             init("w2shape", np.array([4, 6, 1, 1], np.int64))]
    extra = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits + hi]
    m = make(n + hn, inits + hi, 13, ir=3, extra_inputs=extra)
    rep = gonnx.widen(m, 1.5)
    assert rep.check.passed and widths(rep)["c1"] == (6, 9)


def test_names_with_slashes_colons_and_tied_weights():
    n = [conv("/blk:0/conv", "x", "w/shared:0", None, "a/0:1"),
         helper.make_node("Relu", ["a/0:1"], ["r:1"]),
         conv("/blk:1/conv", "r:1", "w2", "b/zero", "c"),
         conv("/blk:2/conv", "c", "w3", "b/zero", "d")]   # a bias shared by two convs (exporter dedup)
    hn, hi = head("d", 4, 13)
    inits = [init("w/shared:0", W(4, 3, 1, 1)), init("w2", W(4, 4, 1, 1)), init("w3", W(4, 4, 1, 1)),
             init("b/zero", np.zeros(4, np.float32))]
    rep = gonnx.widen(make(n + hn, inits + hi, 13), 1.5)
    assert rep.check.passed
    assert all(w[1] == 6 for k, w in widths(rep).items() if k != "head")


def test_tied_weight_matrices_stay_consistent_or_frozen():
    n = [conv("c1", "x", "w1", None, "a"), helper.make_node("Relu", ["a"], ["r"]),
         conv("c2", "r", "wt", None, "b"), helper.make_node("Relu", ["b"], ["rb"]),
         conv("c3", "rb", "wt", None, "c")]  # one weight used by two convs: a real tie
    hn, hi = head("c", 4, 13)
    inits = [init("w1", W(4, 3, 1, 1)), init("wt", W(4, 4, 1, 1))]
    rep = gonnx.widen(make(n + hn, inits + hi, 13), 1.5)
    wide = rep.model
    assert rep.check.passed
    users = [nd for nd in wide.graph.node if nd.op_type == "Conv" and nd.name in ("c2", "c3")]
    assert users[0].input[1] == users[1].input[1]  # still one tensor, never half-widened
    assert widths(rep)["c1"] == (4, 4) and "tied" in " ".join(s for sp in rep.spaces for s in sp.frozen_reasons)


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_prelu_se_gate(opset):
    ax = {"axes": [2, 3]} if opset < 13 else {}
    sq_in = ["gp"] + ([] if opset < 13 else ["axes"])
    us_in = ["s"] + ([] if opset < 13 else ["axes"])
    n = [conv("c1", "x", "w1", None, "a"),
         helper.make_node("PRelu", ["a", "slope"], ["p"]),
         helper.make_node("GlobalAveragePool", ["p"], ["gp"]),
         helper.make_node("Squeeze", sq_in, ["sq"], **ax),
         helper.make_node("Gemm", ["sq", "fw", "fb"], ["g"], transB=1, name="fc"),
         helper.make_node("Sigmoid", ["g"], ["s"]),
         helper.make_node("Unsqueeze", us_in, ["us"], **ax),
         helper.make_node("Mul", ["p", "us"], ["z"])]
    hn, hi = head("z", 6, opset)
    inits = [init("w1", W(6, 3, 3, 3)), init("slope", W(6, 1, 1)), init("fw", W(6, 6)), init("fb", W(6))]
    if opset >= 13:
        inits.append(init("axes", np.array([2, 3], np.int64)))
    rep = gonnx.widen(make(n + hn, inits + hi, opset), 1.5)
    assert rep.check.passed and widths(rep)["c1"] == (6, 9)


def test_unknown_op_on_channel_path_freezes_and_layernorm_mixes():
    n = [conv("c1", "x", "w1", None, "a"),
         helper.make_node("CumSum", ["a", "axis"], ["cs"]),
         conv("c2", "cs", "w2", None, "b"),
         helper.make_node("Relu", ["b"], ["rb"]),
         conv("c3", "rb", "w3", None, "z")]
    hn, hi = head("z", 4, 17)
    inits = [init("w1", W(4, 3, 1, 1)), init("axis", np.array(1, np.int64)), init("w2", W(5, 4, 1, 1)),
             init("w3", W(4, 5, 1, 1))]
    m = make(n + hn, inits + hi, 17)
    rep = gonnx.analyze(m)
    c1 = next(s for s in rep.spaces if s.name == "c1")
    assert c1.frozen_reasons and "CumSum" in c1.frozen_reasons[0]
    rep = gonnx.widen(m, 1.5)
    assert rep.check.passed and widths(rep)["c1"] == (4, 4) and widths(rep)["c2"] == (5, 8)


def test_bad_opset_domain_is_refused():
    n = [helper.make_node("Foo", ["x"], ["y"], domain="my.custom")]
    g = helper.make_graph(n, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("my.custom", 1)])
    import graphgrow

    with pytest.raises(graphgrow.GraphGrowError):
        gonnx.widen(m, 1.5)


def test_check_rewritten_checks_structure_without_the_weights():
    from graphgrow.errors import UnsupportedModelError
    from graphgrow.onnx.engine import check_rewritten

    n = [conv("c1", "x", "w1", "b1", "a"), helper.make_node("Relu", ["a"], ["r"])]
    hn, hi = head("r", 6, 17)
    m = make(n + hn, [init("w1", W(6, 3, 3, 3)), init("b1", W(6))] + hi, 17)
    check_rewritten(m)  # a valid model passes
    broken = onnx.ModelProto()
    broken.CopyFrom(m)
    broken.graph.node[1].input[0] = "nowhere"  # a node reading a value nobody produces
    with pytest.raises(UnsupportedModelError, match="rewritten model fails the ONNX checker"):
        check_rewritten(broken)
    # the large weights are left out: a weight whose bytes do not match its shape is not what it checks
    # (written tensors are complete by construction: _fill_tensor takes dims and bytes from one array)
    bad_bytes = onnx.ModelProto()
    bad_bytes.CopyFrom(m)
    bad_bytes.graph.initializer[0].raw_data = b"\0" * 8
    check_rewritten(bad_bytes)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(bad_bytes)
    # an unknown attribute on a node is caught
    odd = onnx.ModelProto()
    odd.CopyFrom(m)
    odd.graph.node[1].attribute.append(helper.make_attribute("bogus", 3))
    with pytest.raises(UnsupportedModelError):
        check_rewritten(odd)


def test_verification_reads_the_reference_file_when_given(tmp_path):
    from graphgrow.errors import VerificationError
    from graphgrow.onnx.engine import widen_model_serialized

    def model(seed):
        rng = np.random.default_rng(seed)
        n = [conv("c1", "x", "w1", "b1", "a"), helper.make_node("Relu", ["a"], ["r"])]
        hn, hi = head("r", 6, 17)
        inits = [init("w1", rng.standard_normal((6, 3, 3, 3)).astype(np.float32)),
                 init("b1", rng.standard_normal(6).astype(np.float32))]
        return make(n + hn, inits + hi, 17)

    m, other = model(1), model(2)
    onnx.save(m, tmp_path / "m.onnx")
    onnx.save(other, tmp_path / "other.onnx")
    _, rep, _ = widen_model_serialized(m, 1.5, reference=str(tmp_path / "m.onnx"))
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    # the file, not the in-memory model, is what the widened model is compared with
    with pytest.raises(VerificationError):
        widen_model_serialized(m, 1.5, reference=str(tmp_path / "other.onnx"))


@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_transposes_and_token_streams(batch):
    """tf2onnx-style NHWC graphs (Transpose around every conv, a per-channel scale on the last axis) and
    a token stream (N, T, C) swapped to (T, N, C) and back: order-keeping transposes (batch 1) and
    reordering ones (batch 2) both widen exactly."""
    n = [helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
         conv("c1", "xc", "w1", "b1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Transpose", ["r"], ["rl"], perm=[0, 2, 3, 1]),
         helper.make_node("Mul", ["rl", "scale"], ["sl"]),  # per-channel scale, channels last
         helper.make_node("Reshape", ["sl", "tok_shape"], ["tok"]),  # (N, T, C)
         helper.make_node("Transpose", ["tok"], ["tn"], perm=[1, 0, 2]),  # (T, N, C)
         helper.make_node("MatMul", ["tn", "wl"], ["lin"], name="lin"),
         helper.make_node("Relu", ["lin"], ["lr"]),
         helper.make_node("Transpose", ["lr"], ["nt"], perm=[1, 0, 2]),  # back to (N, T, C)
         helper.make_node("ReduceMean", ["nt"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("Gemm", ["pooled", "hw", "hb"], ["y"], transB=1, name="head")]
    inits = [init("w1", W(6, 3, 3, 3)), init("b1", W(6)), init("scale", W(6)),
             init("tok_shape", np.array([batch, 64, 6], np.int64)), init("wl", W(6, 5)),
             init("hw", W(4, 5)), init("hb", W(4))]
    m = make(n, inits, 13, inputs=(("x", [batch, 8, 8, 3]),), out=("y", [batch, 4]))
    rep = gonnx.widen(m, 1.5)
    wide = rep.model
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    assert widths(rep)["c1"] == (6, 9) and widths(rep)["lin"] == (5, 8)
    onnx.checker.check_model(wide)


def test_reference_run_overlaps_and_leaves_no_thread_behind(monkeypatch):
    import threading

    import graphgrow.onnx.engine as engine
    from graphgrow.errors import UnsupportedModelError

    n = [conv("c1", "x", "w1", "b1", "a"), helper.make_node("Relu", ["a"], ["r"])]
    hn, hi = head("r", 6, 17)
    m = make(n + hn, [init("w1", W(6, 3, 3, 3)), init("b1", W(6))] + hi, 17)
    _, rep, _ = engine.widen_model_serialized(m, 1.5)
    assert rep.check.passed and len(rep.check.outputs[0].name) and rep.check.worst.max_rel < 1e-5

    def broken_rebuild(*a, **k):
        raise UnsupportedModelError("rebuild refused")

    monkeypatch.setattr(engine, "rebuild", broken_rebuild)
    with pytest.raises(UnsupportedModelError, match="rebuild refused"):
        engine.widen_model_serialized(m, 1.5)
    assert not [t for t in threading.enumerate() if t.name == "graphgrow-reference"]


def test_transpose_with_the_default_perm():
    """Transpose without a perm attribute reverses the axes: (1, F) -> (F, 1) -> (1, F) around a linear layer."""
    n = [helper.make_node("Flatten", ["x"], ["f"]),
         helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Transpose", ["r"], ["rt"]),  # (1, 7) -> (7, 1)
         helper.make_node("Mul", ["rt", "scale"], ["s"]),  # a per-feature scale, features on axis 0 here
         helper.make_node("Transpose", ["s"], ["sb"]),
         helper.make_node("Gemm", ["sb", "hw", "hb"], ["y"], transB=1, name="head")]
    inits = [init("w1", W(7, 3 * 8 * 8)), init("b1", W(7)), init("scale", W(7, 1)), init("hw", W(4, 7)),
             init("hb", W(4))]
    m = make(n, inits, 13)
    rep = gonnx.widen(m, 1.5)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5 and widths(rep)["fc1"] == (7, 10)
