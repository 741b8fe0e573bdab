"""A small ONNX model built with onnx.helper (no torch), for the ONNX API and CLI tests."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> c1 (6) -> relu1 -> c2 (5, 3x3) -> relu2 -> GlobalAveragePool -> Flatten -> head (4) -> y;
    318 parameters."""
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((6, 3, 1, 1)), "b1": rng.standard_normal(6), "w2": rng.standard_normal((5, 6, 3, 3)),
         "hw": rng.standard_normal((4, 5)), "hb": rng.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["rb"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "hw", "hb"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m
