"""Constants a Hugging Face family computes from its width (marked on the captured graph).

The graph holds ``embed * sqrt(hidden)`` (Gemma's normalizer, ``scale_embedding`` in BART, M2M100, BioGPT,
Marian, PLBart...) or ``x * d_model ** -0.5`` before T5's tied head as a plain number, but the grown model
is rebuilt by the family's code, which computes the constant from the new width: ``sqrt(d')``.  Each such
product is marked (``node.meta[WIDTH_SCALE] = (exponent, activation position)``) so the analysis compensates
the change exactly where it can fold it (the embedding table, the norm before the head), or freezes the
stream with the reason.  Only products next to an embedding or a tied output head are candidates, and a value
equal to a number stated in the config (Granite's ``embedding_multiplier``...) is the config's literal, which
the family keeps: it stays as it is.

A table the family computes from its width and does not store (M2M100's, Speech2Text's sinusoidal positions:
non-persistent buffers; MarianMTModel's, a parameter left out of save_pretrained) cannot hold copied channels: where it meets the activations
(``node.meta[WIDTH_TABLE]``), the analysis keeps their width, naming the reason (class (d), "sinusoidal").
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..fx.transformer import HEAD_DIM_SCALE, MATMUL_FUNCS, WIDTH_SCALE, WIDTH_TABLE

_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div)
_PASS = ("to", "float", "type_as", "contiguous")


def _through(n, up: bool):
    """``n`` past casts and dropout, upstream (``up``) or downstream (its single user)."""
    for _ in range(8):
        if not isinstance(n, fx.Node):
            return n
        if up and (n.op == "call_method" and n.target in _PASS or n.target is F.dropout):
            n = n.args[0]
        elif not up and len(n.users) == 1:
            u = next(iter(n.users))
            if not (u.op == "call_method" and u.target in _PASS or u.target is F.dropout):
                return n
            n = u
        else:
            return n
    return n


def _constant(gm, a):
    """The value of a number or of a one-element tensor attribute read through casts, else None."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    a = _through(a, True)
    if isinstance(a, fx.Node) and a.op == "get_attr":
        t = _attr(gm, a.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point() and not t.is_meta:
            return float(t.reshape(()))
    return None


def _attr(gm, target):
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def _table_width(gm, n, downstream: bool):
    """The width of the embedding table an activation comes from (or, downstream, the table a linear head
    reading it applies), else None."""
    n = _through(n, not downstream)
    if downstream:
        if not isinstance(n, fx.Node) or len(n.users) != 1:
            return None
        n = next(iter(n.users))
        if n.target is not F.linear:
            return None
        w = n.args[1]
        if not (isinstance(w, fx.Node) and any(u.target is F.embedding for u in w.users)):
            return None
    elif not (isinstance(n, fx.Node) and n.target is F.embedding):
        return None
    else:
        w = n.args[1]
    t = _attr(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    return int(t.shape[1]) if isinstance(t, torch.Tensor) and t.ndim == 2 else None


def _config_numbers(config) -> set:
    out = set()

    def walk(d):
        for v in d.values():
            if isinstance(v, dict):  # (MPT's attn_config.softmax_scale)
                walk(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1):
                out.add(float(v))

    walk(config.to_dict())
    return out


def _last_dim(n):
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.ndim else None


def mark_head_dim_scales(gm: fx.GraphModule, config) -> int:
    """Mark the scales of attention scores the family computes from head_dim (``1/sqrt(head_dim)`` as
    baddbmm's alpha, or ``(q @ k^T) * c``): where heads keep their number and head_dim grows (ALiBi), the grown
    model computes them from the new head_dim. A value stated in the config stays. Returns how many."""
    literals = _config_numbers(config)
    marked = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.baddbmm and len(node.args) >= 3:
            c, d = node.kwargs.get("alpha", 1.0), _last_dim(node.args[1])
        elif node.target in _MUL + _DIV and len(node.args) == 2 and isinstance(node.args[1], (int, float)) \
                and isinstance(node.args[0], fx.Node) and node.args[0].target in MATMUL_FUNCS:
            q = node.args[0].args[0]
            c, d = node.args[1], _last_dim(q)
            if node.target in _DIV and c:
                c = 1.0 / c
        else:
            continue
        if isinstance(c, (int, float)) and d and c > 0 and math.isclose(c, d ** -0.5, rel_tol=1e-6) \
                and not any(math.isclose(c, v, rel_tol=1e-6) for v in literals):
            node.meta[HEAD_DIM_SCALE] = True
            marked += 1
    return marked


def mark_width_scales(gm: fx.GraphModule, config) -> int:
    """Mark the products by width-derived constants on ``gm``; returns how many were marked."""
    literals = _config_numbers(config)
    marked = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _MUL + _DIV or len(node.args) != 2:
            continue
        for pos in (0, 1):
            if node.target in _DIV and pos == 1:
                continue
            x, c = node.args[pos], _constant(gm, node.args[1 - pos])
            if c is None or c <= 0 or not isinstance(x, fx.Node):
                continue
            d = _table_width(gm, x, False) or _table_width(gm, node, True)
            if not d or any(math.isclose(c, v, rel_tol=1e-6) for v in literals):
                continue
            sign = -1 if node.target in _DIV else 1
            for e in (0.5, -0.5):
                if math.isclose(c, d ** (sign * e), rel_tol=1e-6):
                    node.meta[WIDTH_SCALE] = (e, pos)
                    marked += 1
    return marked


_ARITH = (operator.add, torch.add, operator.sub, torch.sub) + _MUL + _DIV


def unsaved_keys(model) -> set:
    """Parameters the family leaves out of save_pretrained and recomputes at load (MarianMTModel's sinusoidal
    ``embed_positions.weight``: ``_keys_to_ignore_on_save``): stored nowhere, so no copied channel survives."""
    return set(getattr(model, "_keys_to_ignore_on_save", None) or ())


def mark_width_tables(gm: fx.GraphModule, model) -> int:
    """Mark the ops where a float table of two or more axes that is not in the state_dict, or not saved
    (recomputed from the config), meets other activations; returns how many were marked."""
    stored = set(model.state_dict(keep_vars=True)) - unsaved_keys(model)
    # only a table as wide as the stream is computed from the width: rotary tables (GPT-J's sin/cos buffer) are
    # as wide as rotary_dim / head_dim, which head copies keep
    width = getattr(model.config, "hidden_size", None)
    derived = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _attr(gm, node.target)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 2 and node.target not in stored \
                    and t.shape[-1] == width:
                derived.add(node)
            continue
        marked = [a for a in node.all_input_nodes if a in derived]
        if not marked or node.op == "output":
            continue
        if node.target in _ARITH and len(node.all_input_nodes) == 2 and len(marked) == 1:
            node.meta[WIDTH_TABLE] = node.args.index(marked[0])
        else:
            derived.add(node)  # moved, gathered, cast: still the table's values
    return sum(1 for n in gm.graph.nodes if WIDTH_TABLE in n.meta)
