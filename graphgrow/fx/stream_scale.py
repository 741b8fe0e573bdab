"""Fill + rescale under norms without parameters (OLMo's LayerNorm), on the fx graph after the apply run.

Such a norm has no gain to take ``sqrt(r)`` (``r = d/d'``), and the family's code may fix its ``eps``, so
:func:`graphgrow.core.fill.gainless_ratio` leaves the norm as it is and the stream is scaled instead
(docs/maths.md §5): every linear map or embedding writing the filled stream multiplies its weight and bias by
``c = 1/sqrt(r)``; a norm over ``c`` times the filled stream sees the old variance and returns ``c`` times its old
output, ``eps`` unchanged; every linear map reading the stream or a norm's output divides its weight by ``c``.
Only ops that commute with that scale may touch the stream in between (adds, casts, dropout, moves, the
gainless norms); anything else is a conflict and the stream keeps whole factors.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..core import arithmetic as ar
from ..core.label_tensor import LabelTensor

# ops a stream scaled by c passes through scaled by c (or, for the gainless norms, is recorded against)
_PASSING = {operator.add, torch.add, operator.sub, torch.sub, F.dropout, operator.getitem, torch.reshape,
            torch.flatten, torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute}
_PASSING_METHODS = {"to", "view", "reshape", "contiguous", "float", "type_as", "transpose", "permute"}


def _filled(run, x) -> set:
    if not isinstance(x, LabelTensor) or not len(x.chans):
        return set()
    chans = np.asarray(x.chans)
    return set(chans[chans >= run.plan.fill_start].tolist())


def _params(run, node):
    """(weight target, bias target or None, reads its input) of a linear map or embedding node, else None."""
    if node.op == "call_function" and node.target is F.linear:
        w, b = node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        return w, b, True
    if node.op == "call_function" and node.target is F.embedding:
        return node.args[1], None, False
    if node.op == "call_module" and isinstance(run.modules.get(node.target), (nn.Linear, nn.Embedding)):
        mod = run.modules[node.target]
        return f"{node.target}.weight", (f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None), \
            isinstance(mod, nn.Linear)
    return None


def _scale(run, node, target, factor: float) -> None:
    name = target.target if isinstance(target, fx.Node) else target
    if isinstance(target, fx.Node) and (target.op != "get_attr" or run.attr_uses.get(name) != 1):
        raise run.conflict(node, "a stream scaled for its norms without gain is read or written by a shared or "
                                 "computed weight")
    owner, _, attr = name.rpartition(".")
    upd = run.updates.get(owner)
    if upd is None or attr not in upd.tensors:
        raise run.conflict(node, "a stream scaled for its norms without gain meets a weight that did not grow")
    upd.tensors[attr] = ar.scale_affine(upd.tensors[attr], factor)


def scale_streams(run) -> None:
    """Scale the streams the apply run's gainless norms recorded (``run.stream_scales``), or raise a conflict."""
    if not run.stream_scales:
        return
    first = run.stream_scales[0][0]
    ratios = {round(r, 12) for _, _, r in run.stream_scales}
    if len(ratios) != 1:
        raise run.conflict(first, "norms without gain over streams filled by different ratios")
    c = 1.0 / math.sqrt(run.stream_scales[0][2])
    norms = {n for n, _, _ in run.stream_scales}
    filled = set().union(*(_filled(run, x) for _, x, _ in run.stream_scales))
    for node in run.gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        ins = [run.env.get(a) for a in node.all_input_nodes]
        reads = any(_filled(run, x) & filled for x in ins)
        out = run.env.get(node)
        writes = bool(_filled(run, out) & filled) if isinstance(out, LabelTensor) else False
        if not reads and not writes:
            continue
        p = _params(run, node)
        if p is not None:
            weight, bias, _ = p
            factor = (c if writes else 1.0) / (c if reads else 1.0)
            if factor != 1.0:
                _scale(run, node, weight, factor)
            if writes and bias is not None:
                _scale(run, node, bias, c)
            continue
        if node.target in (operator.add, torch.add, operator.sub, torch.sub) and not all(
                isinstance(a, fx.Node) and a.op != "get_attr" and _filled(run, run.env.get(a)) & filled
                for a in node.args[:2]):
            raise run.conflict(first, f"the stream its fill scales (it has no gain) meets {node.name!r}, which adds "
                                      "something unscaled to it")
        if node in norms or node.target in _PASSING or (node.op == "call_method" and node.target in _PASSING_METHODS):
            continue
        raise run.conflict(first, f"the stream its fill scales (it has no gain) meets {node.name!r}, which does not "
                                  "commute with a scale")
