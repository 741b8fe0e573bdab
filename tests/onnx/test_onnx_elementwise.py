"""The elementwise, logical and positional ops of exported attention (torch-free graphs built with onnx.helper):
``Where(IsNaN(p), 0, p)`` after the softmax, masks from comparisons / Not / And / Or / CumSum / Trilu on a model
input, a position table gathered by constant positions.  Heads and the stream widen; the result is exact."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphgrow.onnx as gonnx

HEADS, HEAD_DIM, LENGTH, STREAM = 2, 4, 6, 8


def _init(rng, name, shape, scale=0.5):
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def attention_graph(mask_input: bool = False, positions: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> stream projection -> one attention layer (softmax guarded by IsNaN/Where) -> residual add ->
    output projection.  ``mask_input``: a second input ``m`` turned into a key mask by comparisons and logic;
    ``positions``: a position table gathered by constant positions and added to the stream."""
    rng = np.random.default_rng(seed)
    d = HEADS * HEAD_DIM
    inits = [_init(rng, "Win", (STREAM, d)), _init(rng, "Wq", (d, d)), _init(rng, "Wk", (d, d)),
             _init(rng, "Wv", (d, d)), _init(rng, "Wo", (d, d)), _init(rng, "Wout", (d, 3)),
             numpy_helper.from_array(np.array([1, LENGTH, HEADS, HEAD_DIM], np.int64), "s4"),
             numpy_helper.from_array(np.array([1, LENGTH, d], np.int64), "s3"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1, np.int64), "one_axis"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12")]
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["h0"])]
    stream = "h0"
    if positions:
        inits += [_init(rng, "pos_table", (16, d)), numpy_helper.from_array(np.arange(LENGTH, dtype=np.int64)[None],
                                                                            "pos_ids")]
        nodes += [helper.make_node("Gather", ["pos_table", "pos_ids"], ["pos"]),
                  helper.make_node("Add", ["h0", "pos"], ["h"])]
        stream = "h"
    for n in "qkv":
        nodes += [helper.make_node("MatMul", [stream, "W" + n], [n + "0"]),
                  helper.make_node("Reshape", [n + "0", "s4"], [n + "1"]),
                  helper.make_node("Transpose", [n + "1"], [n], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"]),
              helper.make_node("Trilu", ["s0"], ["s1"], upper=0)]  # (a causal zeroing along positions)
    scores = "s1"
    if mask_input:
        # key mask from the input m (1, LENGTH): m > 0.5, not (m == 0) and its running count positive
        nodes += [helper.make_node("Greater", ["m", "half"], ["g"]),
                  helper.make_node("Equal", ["m", "zero"], ["e"]),
                  helper.make_node("Not", ["e"], ["ne"]),
                  helper.make_node("CumSum", ["m", "one_axis"], ["cs"]),
                  helper.make_node("Greater", ["cs", "zero"], ["cp"]),
                  helper.make_node("And", ["g", "ne"], ["a0"]),
                  helper.make_node("Or", ["a0", "cp"], ["keep"]),
                  helper.make_node("Unsqueeze", ["keep", "ax12"], ["keep4"]),
                  helper.make_node("Where", ["keep4", "s1", "neg"], ["s2"])]
        scores = "s2"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1),
              helper.make_node("IsNaN", ["p"], ["bad"]),
              helper.make_node("IsInf", ["p"], ["inf"]),
              helper.make_node("Or", ["bad", "inf"], ["bad2"]),
              helper.make_node("Where", ["bad2", "zero", "p"], ["p2"]),
              helper.make_node("MatMul", ["p2", "v"], ["a"]),
              helper.make_node("Transpose", ["a"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "s3"], ["a2"]),
              helper.make_node("MatMul", ["a2", "Wo"], ["o"]),
              helper.make_node("Add", [stream, "o"], ["r"]),
              helper.make_node("Neg", ["r"], ["rn"]),
              helper.make_node("Abs", ["rn"], ["ra"]),
              helper.make_node("Sign", ["r"], ["rs"]),
              helper.make_node("Mul", ["ra", "rs"], ["r2"]),  # |-r| * sign(r) = r
              helper.make_node("MatMul", ["r2", "Wout"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LENGTH, STREAM])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, LENGTH]))
    g = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                      [1, LENGTH, 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _space(rep, suffix):
    return next(s for s in rep.spaces if s.name.endswith(suffix))


@pytest.mark.parametrize("mask_input", [False, True], ids=["no-mask", "input-mask"])
def test_isnan_where_attention_widens_heads_and_stream(mask_input):
    rep = gonnx.widen(attention_graph(mask_input=mask_input), 2)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5, rep.check.summary()
    for n in "qkv":
        s = _space(rep, f":{n}0")
        assert s.head_dim == HEAD_DIM and s.new_width == 2 * HEADS * HEAD_DIM, (s.name, s.frozen_reasons)
    for name in (":h0", ":o"):  # the stream
        s = _space(rep, name)
        assert (s.old_width, s.new_width) == (8, 16), (s.name, s.frozen_reasons)
    shapes = {t.name: list(t.dims) for t in rep.model.graph.initializer}
    assert shapes["Win"] == [STREAM, 16] and shapes["Wq"] == [16, 16] and shapes["Wout"] == [16, 3]
    assert (rep.params_before, rep.params_after) == (STREAM * 8 + 4 * 8 * 8 + 8 * 3, STREAM * 16 + 4 * 16 * 16 + 16 * 3)


def test_position_table_gathered_by_constant_positions_widens_in_place():
    """The table keeps all its rows (not a folded copy of the rows the positions pick) and nothing is left dead."""
    rep = gonnx.widen(attention_graph(positions=True), 2)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    shapes = {t.name: list(t.dims) for t in rep.model.graph.initializer}
    assert shapes["pos_table"] == [16, 16] and "pos_ids" in shapes
    assert not any("__graphgrow" in n for n in shapes), shapes
    table = _space(rep, ":pos")
    assert (table.old_width, table.new_width) == (8, 16)


def _constant_add_model(shared_by: int):
    """A per-head constant (a folded mask/bias, equal over heads or not) added to the scores of ``shared_by``
    layers of one attention each."""
    rng = np.random.default_rng(1)
    d = HEADS * HEAD_DIM
    inits = [_init(rng, "Win", (STREAM, d)), numpy_helper.from_array(np.array([1, LENGTH, HEADS, HEAD_DIM],
                                                                              np.int64), "s4"),
             numpy_helper.from_array(np.array([1, LENGTH, d], np.int64), "s3"),
             ]
    # a folded mask equal over heads (a Constant, no parameter): written back with one head slice, which
    # broadcasts to any head count
    mask = np.broadcast_to(np.triu(np.full((LENGTH, LENGTH), -1e4, np.float32), 1), (1, HEADS, LENGTH, LENGTH))
    nodes = [helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask.copy())),
             helper.make_node("MatMul", ["x", "Win"], ["h"])]
    x = "h"
    for i in range(shared_by):
        inits += [_init(rng, f"W{n}{i}", (d, d)) for n in "qkvo"]
        for n in "qkv":
            nodes += [helper.make_node("MatMul", [x, f"W{n}{i}"], [f"{n}0_{i}"]),
                      helper.make_node("Reshape", [f"{n}0_{i}", "s4"], [f"{n}1_{i}"]),
                      helper.make_node("Transpose", [f"{n}1_{i}"], [f"{n}_{i}"], perm=[0, 2, 1, 3])]
        nodes += [helper.make_node("Transpose", [f"k_{i}"], [f"kt_{i}"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [f"q_{i}", f"kt_{i}"], [f"s_{i}"]),
                  helper.make_node("Add", [f"s_{i}", "mask"], [f"sm_{i}"]),
                  helper.make_node("Softmax", [f"sm_{i}"], [f"p_{i}"], axis=-1),
                  helper.make_node("MatMul", [f"p_{i}", f"v_{i}"], [f"a_{i}"]),
                  helper.make_node("Transpose", [f"a_{i}"], [f"a1_{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"a1_{i}", "s3"], [f"a2_{i}"]),
                  helper.make_node("MatMul", [f"a2_{i}", f"Wo{i}"], [f"o_{i}"]),
                  helper.make_node("Add", [x, f"o_{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    g = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LENGTH, STREAM])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, LENGTH, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_mask_equal_over_heads_stays_one_shared_slice():
    rep = gonnx.widen(_constant_add_model(2), 2)
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    heads = [s for s in rep.spaces if s.head_dim == HEAD_DIM]
    assert heads and all(s.new_width == 2 * s.old_width for s in heads), [(s.name, s.frozen_reasons) for s in heads]
    inits = {t.name: list(t.dims) for t in rep.model.graph.initializer}
    # one tensor for both layers (each gathered it alike), the Constant it replaced gone
    assert inits["mask__graphgrow"] == [1, 1, LENGTH, LENGTH] and "Constant" not in {
        n.op_type for n in rep.model.graph.node}, inits


def _stream_op_model(op: str):
    """x -> linear (the stream) -> ``op`` along the channel axis -> linear."""
    rng = np.random.default_rng(2)
    inits = [_init(rng, "W1", (STREAM, 8)), _init(rng, "W2", (8, 3)),
             numpy_helper.from_array(np.array(2, np.int64), "axis")]
    mid = (helper.make_node("CumSum", ["h", "axis"], ["c"]) if op == "CumSum"
           else helper.make_node("Trilu", ["h"], ["c"], upper=1))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"]), mid,
                           helper.make_node("MatMul", ["c", "W2"], ["y"])], "stream",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LENGTH, STREAM])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, LENGTH, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["CumSum", "Trilu"])
def test_positional_op_along_channels_freezes_them(op):
    """A running sum or a triangle over the channel axis reads channels by index: they keep their width."""
    rep = gonnx.widen(_stream_op_model(op), 2)
    assert rep.check.passed
    s = _space(rep, ":h")
    assert s.new_width == s.old_width == 8 and any(f"{op} along a channel axis" in r for r in s.frozen_reasons)


def test_cli_widens_and_checks_an_isnan_where_graph(tmp_path):
    import subprocess
    import sys

    src, out = tmp_path / "attn.onnx", tmp_path / "attn.wide.onnx"
    onnx.save(attention_graph(mask_input=True), str(src))
    r = subprocess.run([sys.executable, "-m", "graphgrow", "widen", str(src), "--factor", "2", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [d.dim_value for d in onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim] == [1, LENGTH, 3]
    r = subprocess.run([sys.executable, "-m", "graphgrow", "check", str(src), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
