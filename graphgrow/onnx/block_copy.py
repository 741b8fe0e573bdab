"""Block expansion on ONNX graphs: ``graphgrow deepen model.onnx --after 'layers.1' --block copy``.

A block is the set of nodes the exporter put under one module scope (TorchScript names ``/layers.1/attn/MatMul``;
the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata). Its one value read outside the block is its output;
that output is read as a sum, through the block's Adds, of one value from outside (the residual stream) and of
branches computed inside. The copy is the same nodes on copied initializers, reading the block's output, with
the initializers that end each branch (the MatMul/Gemm weight, an added bias) zero, so it adds 0 and the model
computes the same function; the copy writes the block's old output name, so consumers and graph outputs are
untouched. Anything else (a norm after the add, a branch ending elsewhere) is refused with the reason.
"""

from __future__ import annotations

import ast

import numpy as np
import onnx
from onnx import numpy_helper

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, random_feeds
from ..core.deepen import DeepenReport, Insertion, select_names
from ..errors import UnsupportedModelError, require_equivalent
from .deepening import unique_name
from .engine import check_rewritten, count_params, input_specs, prepare, verify

_PASS = {"Reshape", "Transpose", "Identity", "Cast", "Dropout", "Squeeze", "Unsqueeze", "Flatten"}
_SCALES = {"Mul", "Div"}
_LINEAR = {"MatMul": 1, "Gemm": 1}
_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization"}


def node_scope(node: onnx.NodeProto) -> str:
    """The module path a node was exported from (``layers.1.attn``), or ""."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":  # the dynamo exporter: a list of scope names
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                scopes = []
            return _joined(scopes)
    parts = node.name.strip("/").split("/")
    return _joined(parts[:-1]) if len(parts) > 1 else ""


def _joined(segments) -> str:
    """Scope segments as one module path: a segment that already holds the path so far (``blocks``,
    ``blocks.0``: a container's child named in full) replaces it."""
    path = ""
    for seg in segments:
        if not seg:
            continue
        path = seg if path and (seg == path or seg.startswith(path + ".")) else f"{path}.{seg}" if path else seg
    return path


def _members(graph, path: str) -> list:
    return [i for i, n in enumerate(graph.node) if (node_scope(n) + ".").startswith(path + ".")]


def _block_paths(graph, after) -> list:
    """The module scopes ``after`` chooses (:func:`graphgrow.core.deepen.select_names`), outermost only."""
    scopes = {node_scope(n) for n in graph.node}
    prefixes = sorted({".".join(s.split(".")[:k]) for s in scopes for k in range(1, len(s.split(".")) + 1)})
    paths = [p for p, _ in select_names({p: [p] for p in prefixes}, after, "module scope of the graph")]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def _plan(graph, path: str) -> tuple:
    """(member node indices, output value, the residual stream's input value, initializers to zero in the copy)."""
    idx = _members(graph, path)
    nodes = [graph.node[i] for i in idx]
    inits = {t.name for t in graph.initializer}
    produced = {o: n for n in nodes for o in n.output}
    users_outside = {v for n in graph.node if n not in nodes for v in n.input} | {o.name for o in graph.output}
    exits = [v for v in produced if v in users_outside]
    if len(exits) != 1:
        raise UnsupportedModelError(f"'{path}' has {len(exits)} values read outside it; a block to copy has one")
    exit_value = exits[0]
    deps: dict = {}  # value -> initializers of the block it depends on

    def dep(v):
        if v not in deps:
            n = produced.get(v)
            deps[v] = ({v} if v in inits and any(v in m.input for m in nodes) else set()) if n is None else \
                set().union(*(dep(i) for i in n.input if i))
        return deps[v]

    def terms(v):
        n = produced.get(v)
        while n is not None and n.op_type in _PASS - {"Cast"} and n.op_type in ("Reshape", "Identity"):
            v, n = n.input[0], produced.get(n.input[0])
        if n is not None and n.op_type == "Add":
            return [t for i in n.input[:2] for t in terms(i)]
        return [v]

    last = produced[exit_value]
    if last.op_type in _NORMS or last.op_type in ("ReduceMean", "Sqrt", "Reciprocal", "Div") and dep(exit_value):
        raise UnsupportedModelError(f"'{path}' normalizes after its residual add (a post-norm block): a copy with "
                                    "zeroed projections would not be the identity")
    leaves = terms(exit_value)
    stream = [v for v in leaves if not dep(v) and v not in produced]
    branches = [v for v in leaves if v not in stream]
    if len(leaves) < 2 or len(stream) != 1:
        raise UnsupportedModelError(f"'{path}' does not end in a residual add of its input and its branches")
    zero: set = set()

    def follow(v):
        n = produced.get(v)
        if n is None:
            if v in inits:
                zero.add(v)
                return
            raise UnsupportedModelError(f"a branch of '{path}' ends at '{v}', read from outside the block")
        if n.op_type in _LINEAR and len(n.input) > 1 and n.input[1] in inits:
            zero.add(n.input[1])
            if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
                zero.add(n.input[2])
            return
        if n.op_type in _PASS:
            return follow(n.input[0])
        if n.op_type == "Add":
            for i in n.input[:2]:
                follow(i)
            return
        if n.op_type in _SCALES:
            return follow(max(n.input[:2], key=lambda i: len(dep(i))))
        raise UnsupportedModelError(f"a branch of '{path}' ends in {n.op_type} ('{n.name}'), not a linear map of "
                                    "the block's weights: its copy cannot be made to add 0")

    for b in branches:
        follow(b)
    return idx, exit_value, stream[0], zero


def copy_blocks(model: onnx.ModelProto, *, after, shapes=None, check: bool = True, atol=DEFAULT_ATOL,
                rtol=DEFAULT_RTOL, batches: int = 3, providers=None, seed: int = 0, progress=None) -> tuple:
    """(deeper ModelProto, DeepenReport); ``model`` is not changed."""
    say = progress or (lambda s: None)
    src = prepare(model)
    out = onnx.ModelProto()
    out.CopyFrom(src)
    g = out.graph
    report = DeepenReport(params_before=count_params(src))
    for path in _block_paths(src.graph, after):
        idx, exit_value, stream, zero = _plan(g, path)
        taken = {n.name for n in g.node} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output} \
            | {i.name for i in g.input}
        inits = {t.name: t for t in g.initializer}
        pre = unique_name(taken, f"{exit_value}_pre_copy")
        rename = {exit_value: pre}
        members = [g.node[i] for i in idx]
        for n in members:  # the block now writes its output under a new name, which the copy reads
            n.output[:] = [rename.get(o, o) for o in n.output]
            n.input[:] = [rename.get(i, i) for i in n.input]
        copy_names = {}
        new_inits = []
        for n in members:
            for i in n.input:
                if i in inits and i not in copy_names:
                    copy_names[i] = unique_name(taken, f"{i}_copy")
                    arr = numpy_helper.to_array(inits[i])
                    new_inits.append(numpy_helper.from_array(np.zeros_like(arr) if i in zero else arr,
                                                             copy_names[i]))
            for o in n.output:
                if o and o not in copy_names:
                    copy_names[o] = exit_value if o == pre else unique_name(taken, f"{o}_copy")
        stream_in = {i for n in members for i in n.input} - set(copy_names) - {o for n in members for o in n.output}
        copies = []
        for n in members:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = unique_name(taken, f"{n.name}_copy")
            c.input[:] = [copy_names.get(i, i) if i not in stream_in or i == "" else i for i in n.input]
            c.output[:] = [copy_names.get(o, o) for o in n.output]
            copies.append(c)
        # the copy's stream input is the block's output: the one outside value the residual sum starts from
        for c in copies:
            c.input[:] = [pre if i == stream else i for i in c.input]
        nodes = list(g.node)
        at = max(idx) + 1
        del g.node[:]
        g.node.extend(nodes[:at] + copies + nodes[at:])
        g.initializer.extend(new_inits)
        report.insertions.append(Insertion(after=path, name=f"{path}_copy", block="copy", form="block", channels=0,
                                           kernels=[], activation=False, nonneg_reason=""))
        report.notes.append(f"{path} copied after itself, zeroed in the copy: {', '.join(sorted(zero))}")
    del g.value_info[:]
    report.params_after = count_params(out)
    check_rewritten(out, "deepened")
    if check:
        say("verifying in onnxruntime ...")
        specs = input_specs(src, shapes or {})
        rep = verify(src, out, specs, batches=batches, seed=seed, atol=atol, rtol=rtol, providers=providers,
                     feeds=random_feeds(specs, seed))
        report.check = rep
        require_equivalent(rep, "deepened", report)
    return out, report

