"""One ONNX node run by onnx's reference implementation (constant subgraphs and moves of label arrays)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

_EVALUATORS: dict = {}


def evaluate(opset: int, model, node, inputs, idx: int) -> list:
    """Run one node with onnx's reference implementation (constants or label arrays).

    The node is wrapped in a one-node model importing the graph's opset, so the
    operator version (Split, Squeeze, Slice, ... changed over time) is the model's.
    Its inputs and outputs are renamed positionally, so that nodes alike in op, attributes
    and opset share one evaluator (nodes with subgraph attributes, which may read outer
    names, keep their own).
    """
    if any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute):
        key = ("node", id(model), idx, node.op_type, tuple(node.output), attr_key(node), opset)
        run_node, names = node, list(node.input)
    else:
        key = ("op", opset, node.domain, node.op_type, tuple(at.SerializeToString() for at in node.attribute),
               tuple(bool(n) for n in node.input), tuple(bool(n) for n in node.output))
        names = [f"i{k}" if n else "" for k, n in enumerate(node.input)]
        run_node = None
    ev = _EVALUATORS.get(key)
    if ev is None:
        if run_node is None:
            run_node = helper.make_node(node.op_type, names, [f"o{k}" if n else "" for k, n in enumerate(node.output)],
                                        domain=node.domain)
            run_node.attribute.extend(node.attribute)
        g = helper.make_graph([run_node], "one",
                              [helper.make_value_info(n, onnx.TypeProto()) for n in dict.fromkeys(n for n in names if n)],
                              [helper.make_value_info(n, onnx.TypeProto()) for n in run_node.output if n])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        ev = ReferenceEvaluator(m)
        if len(_EVALUATORS) > 4096:
            _EVALUATORS.clear()
        _EVALUATORS[key] = ev
    feeds = {n: v for n, v in zip(names, inputs) if n}
    with np.errstate(all="ignore"):  # (T5's bucket arithmetic takes log(0) where a Where discards it)
        outs = ev.run(None, feeds)
    return outs + [None] * (len(node.output) - len(outs))


def attr_key(node):
    """Attributes that can change between runs (split sizes); large tensor attributes are left out."""
    return tuple((a.name, tuple(a.ints)) for a in node.attribute if a.ints)
