"""The torch.fx side of block copy's residual-branch walk (:mod:`graphgrow.core.branches`): what each node of a
captured (lifted torch.export) graph is for the walk.

:func:`branch_outputs` gives the state_dict keys a copy of a layer zeroes so that it adds 0: for a
transformers layer inside a whole captured model (the layer's nodes are those its ``nn_module_stack`` places
under the layer's path) or for a block captured alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core.branches import (ADD, LINEAR, NORM, OTHER, PARAM, PASS, PRODUCT, SUM, VIEW, ZERO, Reading,
                             branch_plan)
from ..errors import UnsupportedModelError

_aten = torch.ops.aten
# the value itself, reshaped or cast
_VIEW = {"reshape", "view", "to", "contiguous", "float", "type_as", F.dropout, torch.reshape}
# zero in, zero out through the first operand (a gather from a zero tensor, a reduction, a permutation)
_PASS = {"expand", "transpose", "permute", "sum", "flatten", "squeeze", "unsqueeze", operator.getitem,
         torch.transpose, torch.permute, torch.flatten, torch.squeeze, torch.unsqueeze, torch.sum,
         _aten.index.Tensor, torch.select, torch.narrow, torch.roll, _aten.roll.default}
# a view of a parameter: the weight of a linear map is still that parameter (x @ W.T, a stacked expert's W[e])
_PARAM_VIEW = {"t", "to", "contiguous", "transpose", "permute", "unsqueeze", "reshape", "view", operator.getitem,
               torch.t, torch.transpose, torch.permute, torch.unsqueeze, torch.reshape, _aten.index.Tensor,
               torch.select}
_ADDS = {operator.add, torch.add, operator.iadd}
_SUBS = {operator.sub, torch.sub}
_MULS = {operator.mul, torch.mul, operator.imul}
_DIVS = {operator.truediv, torch.div}
# zero whatever the inputs (the buffer an MoE scatters its experts' outputs into)
_ZEROS = {torch.zeros_like, _aten.zeros_like.default, "new_zeros", torch.zeros, _aten.zeros.default,
          _aten.new_zeros.default}
_CATS = {torch.cat, torch.concat, _aten.cat.default}
_INDEX_ADD = {_aten.index_add.default, _aten.index_add_.default, torch.index_add, "index_add", "index_add_"}
# linear maps: op -> (input position, weight position, bias position or None)
_LINEAR = {F.linear: (0, 1, 2), torch.addmm: (1, 2, 0), torch.matmul: (0, 1, None), operator.matmul: (0, 1, None),
           torch.mm: (0, 1, None), torch.bmm: (0, 1, None),
           # (a convolution is linear in its weight and bias: a residual CNN block ending in a conv)
           F.conv1d: (0, 1, 2), F.conv2d: (0, 1, 2), F.conv3d: (0, 1, 2)}
_NORMS = {F.layer_norm, F.group_norm}


def _name(target) -> str:
    return str(getattr(target, "__name__", None) or target)


def _linear_positions(target):
    if target in _LINEAR:
        return _LINEAR[target]
    if "grouped_mm" in _name(target) or "grouped_mm" in str(target):  # experts stacked in one 3-D weight
        return (0, 1, None)
    return None


class FxBlock:
    """One block of a captured graph, read for :func:`graphgrow.core.branches.branch_plan`."""

    def __init__(self, gm: fx.GraphModule, name: str, nodes: list, prefix: str, output: fx.Node):
        self.gm, self.name, self.prefix, self._out = gm, name, prefix, output
        self._inside = set(nodes)
        self._deps: dict = {}
        for n in gm.graph.nodes:  # the block's parameters each node depends on (the graph is in order)
            own = {n.target} if n.op == "get_attr" and n.target.startswith(prefix) else set()
            self._deps[n] = own.union(*(self._deps[a] for a in n.all_input_nodes))

    def output(self):
        return self._out

    def inside(self, node) -> bool:
        return node in self._inside

    def depends(self, node) -> int:
        return len(self._deps.get(node, ())) if isinstance(node, fx.Node) else 0

    def describe(self, node) -> str:
        if not isinstance(node, fx.Node):
            return f"the constant {node!r}"
        return f"node {node.name!r} ({_name(node.target)})"

    def _param(self, node):
        """The block's parameter ``node`` is a view of, or None."""
        while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
            if node.target not in _PARAM_VIEW:
                return None
            node = node.args[0]
        if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.startswith(self.prefix):
            return node.target
        return None

    def read(self, node) -> Reading:  # noqa: C901 - one case per kind of op, as flat as the table it is
        if not isinstance(node, fx.Node):
            return Reading(ZERO) if node == 0 else Reading(OTHER)
        t, args = node.target, node.args
        if node.op == "get_attr":
            return Reading(PARAM, params=(t,)) if t.startswith(self.prefix) else Reading(OTHER)
        if node.op not in ("call_function", "call_method"):
            return Reading(OTHER)
        if t is operator.getitem and isinstance(args[1], int) and args[1] == 0:
            return Reading(VIEW, (args[0],))  # the first item of a tuple (a layer's output, before its cache)
        if t in _VIEW:
            return Reading(VIEW, (args[0],))
        if t is F.rms_norm:  # RMSNorm(0) = 0
            return Reading(PASS, (args[0],), normalizes=True)
        if t in _NORMS:
            return Reading(NORM, (args[0],), normalizes=True)
        if t is torch.rsqrt or t == "mean" or t is torch.mean:
            return Reading(OTHER, normalizes=True)
        if t in _PASS:
            return Reading(PASS, (args[0],))
        pos = _linear_positions(t)
        if pos is not None:
            x_pos, w_pos, b_pos = pos
            w = self._param(args[w_pos]) if len(args) > w_pos else None
            if w is None:
                return Reading(OTHER)
            b = args[b_pos] if b_pos is not None and len(args) > b_pos else node.kwargs.get("bias")
            if b is not None and self._param(b) is None:
                return Reading(OTHER)  # a bias that is not the block's own stays
            return Reading(LINEAR, (args[x_pos],), params=(w,) + ((self._param(b),) if b is not None else ()))
        if t is F.embedding:  # rows of the block's table gathered by ids (GPT-OSS's per-expert down bias)
            w = self._param(args[1]) if len(args) > 1 else None
            return Reading(LINEAR, (args[0],), params=(w,)) if w is not None else Reading(OTHER)
        if t in _ADDS or t in _SUBS:
            nodes = [a for a in args[:2] if isinstance(a, fx.Node)]
            if any(not isinstance(a, fx.Node) and a != 0 for a in args[:2]) or "alpha" in node.kwargs:
                return Reading(OTHER)  # x + c is not zero when x is
            return Reading(ADD if t in _ADDS else SUM, tuple(nodes))
        if t in _CATS:  # zero when every piece is (JetMoE's experts' outputs joined along the tokens)
            pieces = args[0] if isinstance(args[0], (list, tuple)) else ()
            if not pieces or not all(isinstance(a, fx.Node) for a in pieces):
                return Reading(OTHER)
            return Reading(SUM, tuple(pieces))
        if t in _INDEX_ADD:  # base.index_add(dim, index, source): zero when base and source are
            return Reading(SUM, (args[0], args[3]))
        if t in _MULS:
            nodes = tuple(a for a in args[:2] if isinstance(a, fx.Node))
            return Reading(PRODUCT, nodes) if len(nodes) == 2 else Reading(PASS, nodes)
        if t in _DIVS:  # only the numerator may be zeroed
            return Reading(PRODUCT, (args[0],)) if isinstance(args[0], fx.Node) else Reading(OTHER)
        if t in _ZEROS:
            return Reading(ZERO)
        return Reading(OTHER)


def _in_layer(node: fx.Node, full: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == full or p.startswith(full + ".") for p, _ in stack.values())


def branch_outputs(gm: fx.GraphModule, layer, module_prefix: str = "model.") -> set:
    """The state_dict keys to zero so that a copy of ``layer`` adds nothing to the residual stream
    (:func:`graphgrow.core.branches.branch_plan`).  ``gm`` is a lifted capture whose ``nn_module_stack``
    paths start with ``module_prefix``; ``layer=None``: ``gm`` is the captured block alone (keys relative to it)."""
    if layer is None:
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        return branch_plan(FxBlock(gm, "the block", nodes, "", out)).zero
    nodes = [n for n in gm.graph.nodes if _in_layer(n, module_prefix + layer)]
    if not nodes:
        raise UnsupportedModelError(f"no op of the captured graph belongs to {layer!r}")
    inside = set(nodes)
    exits = [n for n in nodes if any(u not in inside for u in n.users)]
    return branch_plan(FxBlock(gm, layer, nodes, layer + ".", exits[-1])).zero
