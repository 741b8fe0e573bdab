"""ONNX's own Attention operator (opset 23) on 4-d heads: heads are copied whole (torch-free)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphgrow.onnx as gonnx


def attention_model(heads=2, kv_heads=2, head_dim=4, length=5, seed=0):
    d, dkv = heads * head_dim, kv_heads * head_dim
    rng = np.random.default_rng(seed)
    arrays = {"Wq": (d, d), "Wk": (d, dkv), "Wv": (d, dkv), "Wo": (d, d)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in arrays.items()]
    inits += [numpy_helper.from_array(np.array([1, length, -1, head_dim], np.int64), "s4"),
              numpy_helper.from_array(np.array([1, length, d], np.int64), "s3")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", "W" + n], [n + "0"]),
                  helper.make_node("Reshape", [n + "0", "s4"], [n + "1"]),
                  helper.make_node("Transpose", [n + "1"], [n], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Attention", ["q", "k", "v"], ["a"], is_causal=1),
              helper.make_node("Transpose", ["a"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "s3"], ["a2"]),
              helper.make_node("MatMul", ["a2", "Wo"], ["y"])]
    g = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, length, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, length, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("kv_heads, factor, q_heads", [(2, 2.0, 4), (2, 1.5, 3), (1, 2.0, 4)])
def test_attention_operator_copies_whole_heads(kv_heads, factor, q_heads):
    try:
        rep = gonnx.widen(attention_model(kv_heads=kv_heads), factor)
    except Exception as exc:  # an onnxruntime without opset 23
        if "opset" in str(exc).lower() and "support" in str(exc).lower():
            pytest.skip(str(exc))
        raise
    assert rep.check.passed and rep.check.worst.max_rel < 1e-5
    q = next(s for s in rep.spaces if s.name.endswith(":q0"))
    k = next(s for s in rep.spaces if s.name.endswith(":k0"))
    assert q.head_dim == 4 and q.new_width == 4 * q_heads
    assert k.new_width // 4 == q_heads * kv_heads // 2  # key/value heads grow with their query groups
