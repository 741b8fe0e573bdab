"""Exported ATen patterns rewritten to ops of the same values that the channel analysis reads.

Run on the exported graph before :func:`graphgrow.fx.aten.lift_exported`; each fold is exact (the same values
for every input), and a pattern that is not matched exactly stays as it is (its ops stay opaque, their
channels freeze with the op named):

* :func:`fold_filled_empties`: ``t = x.new_empty(shape)`` filled by ``t[..., a:b].copy_(src)`` slices that
  cover its last axis (DeepSeek-V2/V3's multi-head latent attention assembles its keys this way) is
  ``cat([src...], -1)`` (each source broadcast to its slice, as copy_ does).
* :func:`fold_complex_rotary`: ``view_as_real(view_as_complex(x) * c)`` (complex rotary, DeepSeek-V2) is the
  same product in real arithmetic, pair by pair: ``(xr cr - xi ci, xi cr + xr ci)``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
_INT64_MAX = 2 ** 63 - 1


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _last_axis_slice(n: fx.Node, base: fx.Node, width: int):
    """``(start, end)`` of ``base[..., start:end]`` (aten.slice.Tensor on the last axis, step 1), else None."""
    if n.target is not aten.slice.Tensor or n.args[0] is not base or n.kwargs:
        return None
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    ndim = len(_val(base).shape)
    if dim % ndim != ndim - 1 or step != 1:
        return None
    start = start or 0
    end = width if end is None or end >= _INT64_MAX // 2 else end
    return (start, end) if 0 <= start < end <= width else None


def fold_filled_empties(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.new_empty.default or _val(node) is None:
            continue
        out = _val(node)
        width = out.shape[-1]
        pieces, readers = [], []
        for u in node.users:
            span = _last_axis_slice(u, node, width)
            copies = list(u.users) if span is not None else []
            if span is not None and len(copies) == 1 and copies[0].target is aten.copy_.default \
                    and copies[0].args[0] is u and not copies[0].users and len(copies[0].args) == 2:
                pieces.append((span, copies[0]))
            else:
                readers.append(u)
        pieces.sort(key=lambda p: p[0])
        if not pieces or [p[0][0] for p in pieces] != [0] + [p[0][1] for p in pieces[:-1]] \
                or pieces[-1][0][1] != width:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        last = max((c for _, c in pieces), key=order.get)
        if any(order[r] < order[last] for r in readers):
            continue  # read before it is filled
        srcs = [c.args[1] for _, c in pieces]
        if any(_val(s) is None or _val(s).dtype != out.dtype for s in srcs):
            continue
        lead = tuple(out.shape[:-1])
        ref = next((s for s in srcs if s.target is not aten.expand.default and tuple(_val(s).shape[:-1]) == lead),
                   None)
        with graph.inserting_before(last.next):  # (in order, after the last copy)
            parts = []
            for (a, b), s in zip((p[0] for p in pieces), srcs):
                if s.target is aten.expand.default and len(s.users) == 1 and ref is not None:
                    s = _following_expand(graph, s, ref)
                elif tuple(_val(s).shape) != lead + (b - a,):
                    s = graph.call_function(aten.expand.default, (s, list(lead) + [b - a]))
                parts.append(s)
            cat = graph.call_function(aten.cat.default, (parts, -1))
        cat.meta = dict(node.meta)
        for r in readers:
            r.replace_input_with(node, cat)
        for _, c in pieces:
            sl = c.args[0]
            graph.erase_node(c)
            graph.erase_node(sl)
        for s in srcs:
            if not s.users:
                graph.erase_node(s)
        graph.erase_node(node)
    graph.lint()


def _following_expand(graph: fx.Graph, s: fx.Node, ref: fx.Node) -> fx.Node:
    """``x.expand(sizes)`` rewritten so that each axis it broadcasts from 1 takes ``ref``'s size, read from
    ``ref.shape`` in the graph: the literal head count of DeepSeek's rotary key (``k_rot.expand(-1, heads, ...)``)
    then follows the heads the keys' other part grows to."""
    x, sizes = s.args[0], list(s.args[1])
    xs = _val(x).shape
    lead = len(sizes) - len(xs)
    shape = graph.call_function(getattr, (ref, "shape"))
    new = [graph.call_function(operator.getitem, (shape, i))
           if i >= lead and xs[i - lead] == 1 and isinstance(d, int) and d > 1 and i < len(_val(ref).shape) - 1
           else d for i, d in enumerate(sizes)]
    out = graph.call_function(aten.expand.default, (x, new))
    out.meta = dict(s.meta)
    return out


def fold_complex_rotary(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for vc in list(graph.nodes):
        if vc.target is not aten.view_as_complex.default or len(vc.users) != 1:
            continue
        mul = next(iter(vc.users))
        if mul.target is not aten.mul.Tensor or mul.kwargs or len(mul.users) != 1:
            continue
        vr = next(iter(mul.users))
        if vr.target is not aten.view_as_real.default:
            continue
        c = mul.args[1] if mul.args[0] is vc else mul.args[0]
        x = vc.args[0]
        if not isinstance(c, fx.Node) or _val(c) is None or _val(x) is None:
            continue
        with graph.inserting_before(vr):
            cri = graph.call_function(aten.view_as_real.default, (c,))
            # (positive axes: the lift writes a select as an index tuple)
            xd, cd = _val(x).ndim - 1, _val(c).ndim
            xr, xi, cr, ci = (graph.call_function(aten.select.int, (t, d, k)) for t, d, k in
                              ((x, xd, 0), (x, xd, 1), (cri, cd, 0), (cri, cd, 1)))
            re = graph.call_function(aten.sub.Tensor, (graph.call_function(aten.mul.Tensor, (xr, cr)),
                                                       graph.call_function(aten.mul.Tensor, (xi, ci))))
            # the imaginary part starts from xi, so it keeps xi's channels (the pair's second member)
            im = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (xi, cr)),
                                                       graph.call_function(aten.mul.Tensor, (xr, ci))))
            out = graph.call_function(aten.stack.default, ([re, im], -1))
        out.meta = dict(vr.meta)
        vr.replace_all_uses_with(out)
        graph.erase_node(vr)
        graph.erase_node(mul)
        graph.erase_node(vc)
    graph.lint()
