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
from ..core.branches import (ADD, LINEAR, NORM, OTHER, PARAM, PASS, PRODUCT, SUM, VIEW, Reading,
                             branch_plan)
from ..core.deepen import DeepenReport, Insertion, select_names
from ..errors import UnsupportedModelError, require_equivalent
from .deepening import unique_name
from .engine import check_rewritten, count_params, input_specs, prepare, verify

_VIEW = {"Reshape", "Identity", "Cast", "Dropout"}  # the value itself, reshaped or cast
_PASS = {"Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather"}  # zero in, zero out (the first input)
_LINEAR = {"MatMul", "Gemm"}
_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization"}
_RMS = {"RMSNormalization", "SimplifiedLayerNormalization"}  # RMSNorm(0) = 0


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


class OnnxBlock:
    """One block of an ONNX graph read for :func:`graphgrow.core.branches.branch_plan`: its nodes are value names."""

    def __init__(self, graph, path: str, members: list):
        nodes = [graph.node[i] for i in members]
        self.name = f"'{path}'"
        self.inits = {t.name for t in graph.initializer}
        self.produced = {o: n for n in nodes for o in n.output}
        self.read_inside = {i for n in nodes for i in n.input}
        users_outside = {v for n in graph.node if n not in nodes for v in n.input} | {o.name for o in graph.output}
        exits = [v for v in self.produced if v in users_outside]
        if len(exits) != 1:
            raise UnsupportedModelError(f"'{path}' has {len(exits)} values read outside it; a block to copy has one")
        self.exit = exits[0]
        self._deps: dict = {}
        for n in nodes:  # (the graph is in order) the block's initializers each value depends on
            d = set().union(*(self._own(i) for i in n.input if i))
            for o in n.output:
                self._deps[o] = d

    def _own(self, v) -> set:
        return self._deps.get(v, {v} if v in self.inits else set())

    def output(self):
        return self.exit

    def inside(self, v) -> bool:
        return v in self.produced

    def depends(self, v) -> int:
        return len(self._own(v))

    def describe(self, v) -> str:
        n = self.produced.get(v)
        return f"{n.op_type} ('{n.name}')" if n is not None else f"'{v}', read from outside the block"

    def read(self, v) -> Reading:
        n = self.produced.get(v)
        if n is None:
            return Reading(PARAM, params=(v,)) if v in self.inits else Reading(OTHER)
        op, ins = n.op_type, list(n.input)
        if op in _VIEW:
            return Reading(VIEW, (ins[0],))
        if op in _PASS:
            return Reading(PASS, (ins[0],))
        if op in _LINEAR and len(ins) > 1 and ins[1] in self.inits:
            bias = (ins[2],) if op == "Gemm" and len(ins) > 2 and ins[2] else ()
            return Reading(LINEAR, (ins[0],), params=(ins[1],) + bias)
        if op == "Add":
            return Reading(ADD, tuple(ins[:2]))
        if op == "Sub":
            return Reading(SUM, tuple(ins[:2]))
        if op == "Mul":
            return Reading(PRODUCT, tuple(ins[:2]))
        if op == "Div":  # only the numerator may be zeroed; a Div ending a block normalizes it
            return Reading(PRODUCT, (ins[0],), normalizes=True)
        if op in _NORMS:
            return Reading(PASS if op in _RMS else NORM, (ins[0],), normalizes=True)
        return Reading(OTHER, normalizes=op in ("ReduceMean", "Sqrt", "Reciprocal"))


def _plan(graph, path: str) -> tuple:
    """(member node indices, output value, the residual stream's input value, initializers to zero in the copy)."""
    idx = _members(graph, path)
    block = OnnxBlock(graph, path, idx)
    plan = branch_plan(block)
    if block.inside(plan.stream):
        raise UnsupportedModelError(f"'{path}' does not end in a residual add of its input and its branches")
    return idx, block.exit, plan.stream, plan.zero


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

