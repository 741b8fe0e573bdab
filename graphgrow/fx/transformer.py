"""Transformer ops of a torch.fx graph mapped to the core's norm and attention relations (a part of
:class:`~graphgrow.fx.labeling.FxLabelRun`): norm modules and functions, scaled dot-product attention,
matmul between activations, nn.MultiheadAttention, embeddings and bare parameters (class tokens, layer
scales, position embeddings) that join the residual stream, constants computed from the width, tied output
heads. Parameters applied by functions (``F.linear`` over a weight) are :mod:`graphgrow.fx.functional`'s.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..core import arithmetic as ar
from ..core.growth import Conflict
from ..core.label_tensor import LabelTensor
from ..core.recipe import Recipe, same_values
from ..core.relations import NotUnderstood


RMS_NORM_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
# ops through which a bare parameter joins the activations it meets (class tokens, layer scales, biases)
JOINING_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
               torch.cat, torch.concat, "add", "sub", "mul", "div", "expand", "expand_as"}
MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm}
SDPA_FUNCS = {F.scaled_dot_product_attention}
# functions applying a parameter tensor as a linear map (torch.export writes every nn.Linear / Conv / Embedding
# this way): name -> (activation position, weight position, bias position, activation's channel axis,
# weight's input axis, weight's output axis)
FUNCTIONAL_PRODUCERS = {
    F.linear: (0, 1, 2, -1, 1, 0),
    torch.addmm: (1, 2, 0, -1, 0, 1),  # GPT-2's Conv1D: bias + x @ W with W stored (in, out)
    torch.matmul: (0, 1, None, -1, 0, 1),
    F.conv1d: (0, 1, 2, 1, 1, 0),
    F.conv2d: (0, 1, 2, 1, 1, 0),
    F.conv3d: (0, 1, 2, 1, 1, 0),
    F.embedding: (0, 1, None, -1, 0, 1),  # indices in, the table (vocab, width) maps them to vectors
}


def param_array(t: torch.Tensor):
    """A parameter's value for the core arithmetic: a float32/float64 array, or for a weightless (meta)
    parameter a :class:`~graphgrow.core.recipe.Recipe` of it (its state_dict key set by the capture)."""
    if t.is_meta:
        return Recipe(getattr(t, "graphgrow_key", "?"), tuple(t.shape))
    t = t.detach().cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


_np = param_array


_EPS_POS = {F.layer_norm: 4, F.group_norm: 4}  # F.rms_norm(x, shape, weight, eps): 3


def norm_eps(target, args, kwargs):
    """(position, value) of the ``eps`` argument of a norm function called with ``args``/``kwargs``."""
    pos = _EPS_POS.get(target, 3)
    return pos, args[pos] if len(args) > pos else kwargs.get("eps")


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# (a reshape keeps a one-axis parameter's one long axis: GPT-OSS's per-head sinks viewed [1, heads, 1, 1])
_PASS_METHODS = ("to", "float", "double", "type_as", "contiguous", "reshape", "view")


def _skip_casts(n):
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in _PASS_METHODS:
        n = n.args[0]
    return n


def _square_of(n):
    """``a`` when ``n`` computes ``a ** 2`` (pow, square, a * a), else None."""
    n = _skip_casts(n)
    if not isinstance(n, fx.Node):
        return None
    if n.target in ("pow", torch.pow, operator.pow) and len(n.args) > 1 and n.args[1] == 2:
        return n.args[0]
    if n.target in ("square", torch.square):
        return n.args[0]
    if n.target in (operator.mul, torch.mul, "mul") and len(n.args) > 1 and n.args[0] is n.args[1]:
        return n.args[0]
    return None


def mean_terms(node) -> str:
    """What a mean averages, for fill + rescale: "mean_sq" (squares: RMSNorm written out), "mean_centered"
    (squares of x minus its mean: LayerNorm's variance written out) or "mean_x"."""
    a = _square_of(node.args[0])
    if a is None:
        return "mean_x"
    a = _skip_casts(a)
    if isinstance(a, fx.Node) and a.target in (operator.sub, torch.sub, "sub") and len(a.args) > 1:
        m = _skip_casts(a.args[1])
        if isinstance(m, fx.Node) and m.target in (torch.mean, "mean") and _skip_casts(m.args[0]) is _skip_casts(a.args[0]):
            return "mean_centered"
    return "mean_sq"


# node.meta key of a product ``x * c`` whose constant the family computes from the width d of x's channels as
# c = d ** e (Gemma's sqrt(hidden), scale_embedding, T5's d_model ** -0.5 before its tied head): (e, x's position)
WIDTH_SCALE = "graphgrow_width_scale"
# node.meta key of an op where a table the family computes from the width (sinusoidal positions, not stored) meets
# the activations: the position of the table's operand
WIDTH_TABLE = "graphgrow_width_table"
# node.meta key of the scale of attention scores (baddbmm's alpha, ``scores * c``) that the family computes from
# head_dim as c = head_dim ** -0.5: where heads keep their number and head_dim grows, the grown model's scale changes
HEAD_DIM_SCALE = "graphgrow_head_dim_scale"
ALIBI_REASON = ("ALiBi: a per-head bias computed for the model's head count (the slopes) is added to the attention "
                "scores, so the heads keep their number; head_dim grows instead")
_SCALE_OPS = (operator.mul, torch.mul, operator.truediv, torch.div)


def scores_scale_follows(n) -> bool | None:
    """Walking up from attention scores ``n`` to their product ``q @ k^T``: whether the scale on the way follows
    head_dim in the grown model (True: marked HEAD_DIM_SCALE; False: a literal that stays, or none); None when
    something else lies between them."""
    follows = bool(getattr(n, "meta", {}).get(HEAD_DIM_SCALE))
    for _ in range(8):
        n = _skip_casts(n)
        if not isinstance(n, fx.Node):
            return None
        if n.target in MATMUL_FUNCS or n.target is torch.baddbmm:
            return follows or bool(n.meta.get(HEAD_DIM_SCALE))
        if n.target in _SCALE_OPS and len(n.args) == 2 and isinstance(n.args[1], (int, float)):
            follows = follows or bool(n.meta.get(HEAD_DIM_SCALE))
            n = n.args[0]
        elif n.target is F.dropout:
            n = n.args[0]
        else:
            return None
    return None


def _activation_arg(n):
    """The activation operand of a node marked with a width-derived scale."""
    return n.args[n.meta[WIDTH_SCALE][1]]


def _with_offset(value, offset: float):
    """``value + offset``, or ``value`` itself when the offset is 0 (a recipe records no step then)."""
    return value + offset if offset else value


def param_through_offset(n):
    """``(get_attr node, offset)`` when ``n`` is a parameter, possibly cast and plus a number; else (None, 0)."""
    n, offset = _skip_casts(n), 0.0
    if isinstance(n, fx.Node) and n.target in (operator.add, torch.add) and len(n.args) == 2 \
            and isinstance(n.args[1], (int, float)):
        n, offset = _skip_casts(n.args[0]), float(n.args[1])
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return n, offset
    return None, 0.0


def _joining_ops(param):
    """``(ops, offset)``: the ops through which a parameter joins activations, reached through casts and the
    addition of a number (Gemma's RMSNorm gain ``1 + w``: offset 1); ``(None, 0)`` when it is read otherwise."""
    joins, offset, frontier = [], 0.0, [param]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "call_method" and u.target in _PASS_METHODS:
                frontier.append(u)
            elif u.target in (operator.add, torch.add, operator.sub, torch.sub) and len(u.args) == 2 and \
                    u.args[0] is n and isinstance(u.args[1], (int, float)) and len(frontier) == 0 and offset == 0:
                offset = float(u.args[1]) * (1 if u.target in (operator.add, torch.add) else -1)
                frontier.append(u)
            elif u.target in JOINING_OPS:
                joins.append(u)
            else:
                return None, 0.0
    if offset and not all(u.target in (operator.mul, torch.mul) for u in joins):
        return None, 0.0
    return joins, offset


def _rows_read(param, depth: int = 0) -> bool:
    """Every reader of a 2-d parameter selects rows: ``p[a:b]`` or ``p[indices]`` (axis 0 only), or reads whole
    rows as the positions of an activation (through dropout or a leading ``unsqueeze(0)``) by a linear map or a
    norm (DeBERTa's relative position embeddings, projected by every layer's pos_key_proj / pos_query_proj)."""
    for u in param.users:
        idx = u.args[1] if u.target is operator.getitem else None
        if isinstance(idx, tuple) and len(idx) == 1:
            idx = idx[0]
        if isinstance(idx, slice) or isinstance(idx, fx.Node) and idx.op == "get_attr":  # (a buffer of indices)
            continue
        if u.target is torch.ops.aten.index.Tensor and len(u.args) == 2 and len(u.args[1]) == 1:
            continue
        if depth and u.target in (F.linear, F.layer_norm) and u.args[0] is param:
            continue
        passes = u.target is F.dropout or u.target is torch.unsqueeze and tuple(u.args[1:]) == (0,)
        if depth < 4 and passes and u.args[0] is param and _rows_read(u, depth + 1):
            continue
        return False
    return bool(param.users)


class FxTransformerOps:
    """Mixin of :class:`~graphgrow.fx.labeling.FxLabelRun`."""

    # ------------------------------------------------------------ norms
    def _norm_module(self, node, mod, x: LabelTensor, old_x):
        if isinstance(mod, nn.GroupNorm):
            axes, names, pax, groups = list(range(1, x.ndim)), ["weight", "bias"], 0, mod.num_groups
            ref = x if self.analysis else old_x
            if 1 not in ref.vary and ref.vary:
                raise NotUnderstood("GroupNorm's channels are not on axis 1")
        else:
            nd = len(mod.normalized_shape)
            axes, names, groups = list(range(x.ndim - nd, x.ndim)), ["weight", "bias"], 1
            pax = None
        ax = self._norm_axis(x, old_x, axes)
        if pax is None and ax is not None:
            pax = ax - (x.ndim - len(mod.normalized_shape))
        params = {} if self.analysis else {n: _np(t) for n in names
                                           if isinstance(t := getattr(mod, n, None), torch.Tensor)}
        kind = None if isinstance(mod, nn.GroupNorm) else "rms" if isinstance(mod, RMS_NORM_MODULES) else "layer"
        eps = getattr(mod, "eps", None)
        out, new, match, new_eps = self.norm(node, node.target, x, old_x, axes, params, pax or 0, groups,
                                             kind if eps is not None else None, eps)
        if match is not None:
            upd = self._update(node.target)
            upd.tensors.update(new)
            if new_eps is not None:
                upd.attrs["eps"] = new_eps
            if isinstance(mod, nn.GroupNorm):
                upd.attrs["num_channels"] = match.n_new
                if mod.num_groups == match.n_old:  # (one channel per group)
                    upd.attrs["num_groups"] = match.n_new
            else:
                shape = list(mod.normalized_shape)
                shape[pax] = match.n_new
                upd.attrs["normalized_shape"] = tuple(shape)
        return out

    def _param_node(self, target_name):
        return next(n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target_name)

    def _norm_function(self, node, target, x: LabelTensor, args, kwargs):
        """F.layer_norm / F.rms_norm / F.group_norm with parameters read from module attributes."""
        old_x = self._old(node.args[0])
        if target is F.group_norm:
            groups = _arg(args, kwargs, 1, "num_groups")
            axes, pos, pax = list(range(1, x.ndim)), {"weight": 2, "bias": 3}, 0
            shape_pos = None
        else:
            groups = 1
            shape = _arg(args, kwargs, 1, "normalized_shape")
            if not isinstance(shape, (list, tuple, torch.Size, int)):
                raise NotUnderstood("its normalized shape is computed")
            shape = [shape] if isinstance(shape, int) else list(shape)
            axes = list(range(x.ndim - len(shape), x.ndim))
            pos = {"weight": 2, "bias": 3} if target is F.layer_norm else {"weight": 2}
            shape_pos = 1
        if not isinstance(groups, int):
            raise NotUnderstood("its number of groups is computed")
        ax = self._norm_axis(x, old_x, axes)
        if ax is None:
            return self.elementwise(node, x)
        if target is not F.group_norm:
            pax = ax - axes[0]
        owners, offsets = {}, {}
        for name, i in pos.items():
            a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
            if a is None:
                continue
            # a parameter read through a cast or plus a number (Nemotron's LayerNorm1P passes weight + 1): the norm
            # sees weight + offset; the stored parameter is what it sees less the offset
            p, offset = param_through_offset(a) if isinstance(a, fx.Node) else (None, 0.0)
            through = p is not None and p is not a and (len(a.users) != 1 or len(p.users) != 1)
            if p is None or through or self.attr_uses.get(p.target, 0) > 1 and not \
                    all(u.target is target and u.args[i:i + 1] == (p,) for u in p.users):
                raise NotUnderstood("its parameters are not module attributes used only here or by norms alike")
            owners[name], offsets[p.target] = p.target, offset
        params = {} if self.analysis else {t: _with_offset(_np(operator.attrgetter(t)(self.gm)), offsets[t])
                                           for t in owners.values()}
        eps_pos, eps = norm_eps(target, node.args, node.kwargs)
        kind = None if target is F.group_norm or not isinstance(eps, float) else \
            "layer" if target is F.layer_norm else "rms"
        out, new, match, new_eps = self.norm(node, node.name, x, old_x, axes, params, pax, groups, kind, eps)
        if match is None:
            return out
        new = {t: _with_offset(arr, -offsets.get(t, 0.0)) for t, arr in new.items()}
        shared = [t for t in owners.values() if self.attr_uses.get(t, 0) > 1]
        if shared and next(iter(self._param_node(shared[0]).users)) is not node:
            self._same_as_stored(node, new)  # a norm of a shared layer (ALBERT): its first reader stored them
        else:
            for target_name, arr in new.items():
                owner, _, attr = target_name.rpartition(".")
                self._update(owner).tensors[attr] = arr
        graph_args, graph_kwargs = list(node.args), dict(node.kwargs)
        if target is F.group_norm and groups == match.n_old:  # one channel per group: the groups follow them
            if len(graph_args) > 1:
                graph_args[1] = match.n_new
            else:
                graph_kwargs["num_groups"] = match.n_new
        if shape_pos is not None:
            raw = node.args[shape_pos] if len(node.args) > shape_pos else node.kwargs["normalized_shape"]
            new_shape = [raw] if isinstance(raw, int) else list(raw)
            new_shape[pax] = match.n_new
            value = tuple(new_shape) if not isinstance(raw, int) else match.n_new
            if len(graph_args) > shape_pos:
                graph_args[shape_pos] = value
            else:
                graph_kwargs["normalized_shape"] = value
        if new_eps is not None:
            if len(graph_args) > eps_pos:
                graph_args[eps_pos] = new_eps
            else:
                graph_kwargs["eps"] = new_eps
        self.arg_updates[node] = (tuple(graph_args), graph_kwargs)
        return out

    # ------------------------------------------------------------ attention
    def _sdpa(self, node, args, kwargs):
        q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        mask = _arg(args, kwargs, 3, "attn_mask")
        if not all(isinstance(t, LabelTensor) for t in (q, k, v)):
            raise NotUnderstood("query, key and value are not all tensors")
        srcs = [node.args[i] if len(node.args) > i else node.kwargs.get(n)
                for i, n in enumerate(("query", "key", "value"))]
        olds = [self._old(s) for s in srcs]
        bias = old_bias = None
        if isinstance(mask, LabelTensor):
            old_mask = self._old(node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask"))
            if (mask if self.analysis else old_mask).vary:
                bias, old_bias = mask, old_mask  # one slice per head (a relative position bias)
            elif not self.analysis and mask.ndim >= 3 and mask.shape[-3] > 1 and q.shape[-3] != olds[0].shape[-3]:
                raise self.conflict(node, "a per-head attention mask cannot follow new heads")
        out_shape = list(self._shape(node)) if self.analysis else \
            list(olds[0].shape[:-1]) + [olds[2].shape[-1]]
        return self.attention(node, node.name, q, k, v, *olds, out_shape=out_shape, bias=bias, old_bias=old_bias)

    def _baddbmm(self, node, args):
        """``beta * bias + alpha * (b1 @ b2)`` (BLOOM's scores): a constant bias holding one row per batch x head
        is a per-head bias computed for the model's head count (ALiBi's slopes): the heads it meets stay."""
        bias, b1, b2 = args[:3]
        fixed = not isinstance(bias, LabelTensor) or not bias.vary
        per_head = fixed and bias.ndim == 3 and bias.shape[0] > 1 and any(
            isinstance(b, LabelTensor) and b.vary for b in (b1, b2))
        if per_head and not all(isinstance(b, LabelTensor) for b in (b1, b2)):
            return self.opaque(node, "ALiBi's baddbmm of a tensor that is not an activation is not understood")
        if per_head and node not in self.opaque_nodes:
            # the heads keep their number and grow head_dim (core/attention.keep_heads); the additive bias is a
            # constant and alpha a scale: the result has the scores' labels
            scores = self.batched_product(node, node.name, b1, b2, self._old(node.args[1]), self._old(node.args[2]))
            if not self.analysis or self.keep_heads(node, scores, ALIBI_REASON, scores_scale_follows(node)):
                return scores
        if per_head:
            return self.opaque(node, "ALiBi: its additive per-head bias (the slopes) is computed for the model's "
                                     "head count, so the heads keep their number")
        return self.opaque(node, "baddbmm with an additive input that is not a per-head constant is not understood")

    def _matmul(self, node, a: LabelTensor, b: LabelTensor):
        return self.batched_product(node, node.name, a, b, self._old(node.args[0]), self._old(node.args[1]))

    def _mha(self, node, mod: nn.MultiheadAttention, args, kwargs):
        """nn.MultiheadAttention (self-attention, packed in_proj): in_proj produces q, k and v heads; the
        heads attend; out_proj reads them."""
        srcs = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in
                enumerate(("query", "key", "value"))]
        if not (srcs[0] is srcs[1] is srcs[2]) or not mod._qkv_same_embed_dim or mod.in_proj_weight is None \
                or mod.bias_k is not None or mod.add_zero_attn:
            raise NotUnderstood("only self-attention with a packed in_proj and no extra key/value bias is understood")
        for name in ("key_padding_mask", "attn_mask"):
            m = kwargs.get(name)
            if isinstance(m, LabelTensor) and m.vary:
                raise NotUnderstood(f"its {name} has channel structure")
        need_weights = kwargs.get("need_weights", args[4] if len(args) > 4 else True)
        if need_weights and any(u.target is operator.getitem and u.args[1] == 1 for u in node.users):
            raise NotUnderstood("its head-averaged attention weights are read")
        x, old_x = args[0], self._old(srcs[0])
        ref = x if self.analysis else old_x
        if x.ndim != 3 or (ref.vary and ref.vary != [2]):
            raise NotUnderstood("its input's channels are not on the last axis")
        tb = 0 if mod.batch_first else 1  # the batch axis; the other non-channel axis holds positions
        e_old = mod.embed_dim
        hd = e_old // mod.num_heads
        shape = list(x.shape[:2]) + [3 * e_old]
        qkv, w_new, mapping = self.produce(node, f"{node.target}.in_proj", x, old_x, _np(mod.in_proj_weight),
                                           in_axis=-1, out_axis=-1, w_in=1, w_out=0, shape=shape, suffix="in_proj")
        part = qkv.part
        e_new = len(part) // 3
        if len(part) % (3 * hd):
            raise self.conflict(node, "its packed q, k, v no longer split into whole heads")
        batch, seq = x.shape[tb], x.shape[1 - tb]

        def heads(i, e):
            p = part[i * e:(i + 1) * e].reshape(e // hd, hd)
            return LabelTensor.multi((batch, e // hd, seq, hd), (1, 3), p)

        q, k, v = (heads(i, e_new) for i in range(3))
        olds = (None,) * 3
        if not self.analysis:
            old_part = self.old_parts[node]
            olds = tuple(LabelTensor.multi((batch, e_old // hd, seq, hd), (1, 3),
                                           old_part[i * e_old:(i + 1) * e_old].reshape(-1, hd)) for i in range(3))
            if e_new != x.shape[-1]:
                # its head width is read from its input width: keep the heads, not the whole stream
                space = self.node_space[(node, "in_proj")]
                raise Conflict(node, space.chan_ids, f"{self.site(node)}: nn.MultiheadAttention needs its heads "
                                                     f"({e_new} channels) exactly as wide as its input "
                                                     f"({x.shape[-1]})")
        else:
            self.old_parts[node] = part
            in_space = self.node_space[(node, "in_proj")]
            for sp in self.table.spaces_of(x.chans):  # its heads are exactly as wide as its input
                self.constraints.width_links.append((sp.id, in_space.id, 1 / 3))
        att = self.attention(node, f"{node.target}.heads", q, k, v, *olds,
                             out_shape=[batch, mod.num_heads, seq, hd])
        heads_part = att.factors()[1].reshape(-1)
        merged_shape = [x.shape[0], x.shape[1], len(heads_part)]
        merged = LabelTensor.factored(merged_shape, 2, heads_part)
        old_merged = merged
        if not self.analysis:
            old_merged = self.old_parts[(node, "heads")]
        else:
            self.old_parts[(node, "heads")] = merged
        ow = _np(mod.out_proj.weight)
        out, w_out, map_out = self.produce(node, f"{node.target}.out_proj", merged, old_merged, ow, in_axis=-1,
                                           out_axis=-1, w_in=1, w_out=0, shape=list(x.shape[:2]) + [ow.shape[0]],
                                           suffix="out_proj")
        if w_new is not None:
            upd = self._update(node.target)
            upd.tensors["in_proj_weight"] = w_new
            if mod.in_proj_bias is not None:
                upd.tensors["in_proj_bias"] = ar.gather(_np(mod.in_proj_bias), 0, mapping)
            upd.attrs.update(embed_dim=e_new, kdim=e_new, vdim=e_new, num_heads=e_new // hd)
        if w_out is not None:
            upd = self._update(f"{node.target}.out_proj")
            upd.tensors["weight"] = w_out
            if mod.out_proj.bias is not None:
                upd.tensors["bias"] = ar.gather_fill(_np(mod.out_proj.bias), 0, map_out,
                                                     self.fill_kind_of(node, "out_proj"))
            upd.attrs.update(in_features=len(heads_part), out_features=len(map_out))
        second = self.fixed_labels(node, "weights", (batch, seq, seq), self.salt(node)) if need_weights else None
        return (out, second)

    # ------------------------------------------------------------ embeddings and bare parameters
    def _embedding(self, node, mod: nn.Embedding, x: LabelTensor, old_x):
        if x.vary:
            raise NotUnderstood("its indices carry channels")
        out, w, mapping = self.produce(node, node.target, x, old_x, _np(mod.weight), in_axis=-1, out_axis=-1,
                                       w_in=0, w_out=1, shape=self._shape(node))
        if w is not None:
            upd = self._update(node.target)
            upd.tensors["weight"] = w
            upd.attrs["embedding_dim"] = len(mapping)
        return out

    def _param_labels(self, node, real: torch.Tensor):
        """A parameter with one axis longer than 1 (class token, layer scale, a bias) read once: its own
        channel space along that axis, which grows with whatever it is added to, multiplied with or
        concatenated to. Returns None for other parameters."""
        long_axes = [i for i, d in enumerate(real.shape) if d > 1]
        if len(long_axes) == 2 == real.ndim and node.target in self.param_names and _rows_read(node):
            # a table read by rows (BEiT's relative position bias [distances, heads], sliced and gathered by
            # constant indices): like an embedding's, its columns are one channel space
            labels, _, new = self.bare_parameter(node, node.target, _np(real), 1, tuple(real.shape), 1)
            if new is not None:
                owner, _, attr = node.target.rpartition(".")
                self._update(owner).tensors[attr] = new
            return labels
        if len(long_axes) != 1 or self.attr_uses.get(node.target, 0) != 1 or node.target not in self.param_names:
            return None
        joins, offset = _joining_ops(node)
        if joins is None:
            return None  # read by a norm function, a linear map, ...: a parameter of that op, not of the stream
        ax = long_axes[0]
        # a gain (multiplied in): its filled channels get 1 (0 for Gemma's (1 + w), which adds the 1 itself)
        gain = all(u.target in (operator.mul, torch.mul, "mul") for u in joins)
        labels, _, new = self.bare_parameter(node, node.target, _np(real), ax, tuple(real.shape), ax, gain=gain,
                                             gain_fill=1.0 - offset)
        if new is not None:
            owner, _, attr = node.target.rpartition(".")
            self._update(owner).tensors[attr] = new
        return labels

    def _layer_scale_fill(self, node) -> None:
        """``gain * branch`` (BEiT's layer scale λ) where the branch joins a stream filled with its mean: the new
        channel must hold ``mean_c(λ_c x_c)``, so the linear map writing the branch gets ``mean_c(λ_c W_c)`` (and
        ``mean_c(λ_c b_c)``) as its filled rows while the gain's filled entry is 1 (docs/maths.md §5)."""
        if self.analysis or not self.plan.fills or node.target not in (operator.mul, torch.mul):
            return
        g = next((a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "get_attr"
                  and a.target in self.param_names), None)
        sp = self.node_space.get(g) if g is not None else None
        if sp is None or self.plan.fill_kind.get(sp.id) != "mean":
            return
        fill = self.plan.mapping(sp) < 0
        lam = _np(operator.attrgetter(g.target)(self.gm))
        src = next(a for a in node.args[:2] if a is not g)
        while isinstance(src, fx.Node) and src.target in (F.dropout, torch.clone) and len(src.users) == 1:
            src = src.args[0]
        if not fill.any() or lam.ndim != 1 or not isinstance(src, fx.Node) or len(src.users) != 1:
            return
        if src.target is F.linear and isinstance(src.args[1], fx.Node) and src.args[1].op == "get_attr":
            owner = src.args[1].target.rpartition(".")[0]
            biased = len(src.args) > 2 and src.args[2] is not None or src.kwargs.get("bias") is not None
        elif src.op == "call_module" and type(self.modules.get(src.target)) is nn.Linear:
            owner, biased = src.target, self.modules[src.target].bias is not None
        else:
            return
        upd, space = self.updates.get(owner), self.node_space.get(src)
        if upd is None or "weight" not in upd.tensors or space is None:
            return
        mapping = self.plan.mapping(space)
        if not np.array_equal(mapping < 0, fill):
            raise self.conflict(node, "a layer scale's filled channels do not line up with its branch's")
        firsts = [int(np.nonzero(mapping == c)[0][0]) for c in range(len(lam))]
        for attr in ("weight", "bias") if biased else ("weight",):
            arr = upd.tensors[attr]
            rows = arr[firsts].astype(np.float64) * lam.reshape((-1,) + (1,) * (arr.ndim - 1))
            arr = arr.copy()
            arr[fill] = rows.mean(axis=0).astype(arr.dtype)
            upd.tensors[attr] = arr

    def _param_operand(self, node, x: LabelTensor, param_node, x_node):
        """``x`` combined elementwise with a parameter of several long axes read only here (a position
        embedding): its values along x's channel axis are gathered."""
        real = operator.attrgetter(param_node.target)(self.gm)
        combine = "add" if node.target in (operator.add, operator.sub, torch.add, torch.sub, "add", "sub") else \
            "mul" if node.target in (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div") else None
        out, new = self.per_channel_constant(node, param_node.target, x, self._old(x_node), _np(real),
                                             combine=combine)
        if new is not None:
            owner, _, attr = param_node.target.rpartition(".")
            self._update(owner).tensors[attr] = new
        return out

    # ------------------------------------------------------------ constants computed from the width
    def _width_scale(self, node, args):
        """``x * c`` where the family computes ``c = d ** e`` from the width ``d`` of x's channels (marked by the
        Hugging Face capture): the grown model multiplies by ``d' ** e``, so ``(d/d') ** e`` is folded where the
        function allows it exactly: into the embedding table x comes from (its tied head and its other readers
        see the same factor), else into the affine norm that computes x."""
        e, pos = node.meta[WIDTH_SCALE]
        x = args[pos]
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its scaled operand is not a tensor")
        out = self.elementwise(node, x)
        if self.analysis:
            return out
        old_x = self._old(node.args[pos])
        d, d_new = old_x.shape[-1], x.shape[-1]
        if d == d_new:
            return out
        scale = (d / d_new) ** e
        src = _skip_casts(node.args[pos])
        while isinstance(src, fx.Node) and src.target is F.dropout:
            src = _skip_casts(src.args[0])
        if isinstance(src, fx.Node) and src.target is F.embedding and isinstance(src.args[1], fx.Node):
            table = src.args[1].target
            owner, _, attr = table.rpartition(".")
            upd = self.updates.get(owner)
            if upd is None or attr not in upd.tensors:
                raise self.conflict(node, f"the scale {d}**{e} the family computes from the width cannot be "
                                          f"compensated: its table {table!r} did not grow")
            if table in self.table_scales:
                if not np.isclose(self.table_scales[table], scale, rtol=1e-12):
                    raise self.conflict(node, f"the readers of {table!r} scale it by different width factors")
                return out
            upd.tensors[attr] = ar.scale_affine(upd.tensors[attr], scale)
            self.table_scales[table] = scale
            return out
        try:
            self._fold_scale(node, node.args[pos], scale)
        except Conflict:
            raise self.conflict(node, f"the scale {d}**{e} the family computes from the width has no embedding "
                                      "table or affine norm before it to compensate d/d' in") from None
        return out

    # ------------------------------------------------------------ tied output heads
    def _tied_head(self, node, mod: nn.Linear, x: LabelTensor, old_x):
        """An output head sharing its weight with the token embedding: the shared weight is the embedding's
        (columns copied, not divided), so under k-fold replication the head would return k x the logits;
        the 1/k is folded into the affine norm before it (docs/maths.md §5)."""
        emb = self.tied_heads[node.target]
        labels, gathered, k = self.tied_head(node, node.target, x, old_x, _np(mod.weight), list(self._shape(node)))
        if gathered is None:
            return labels
        emb_new = self.updates.get(emb)
        if emb_new is None or not same_values(emb_new.tensors.get("weight"), gathered):
            raise self.conflict(node, f"the output head and the embedding {emb!r} it is tied to would need different "
                                      "columns")
        if k > 1:
            self._fold_scale(node, node.args[0], 1.0 / k)
        self._update(node.target).attrs["in_features"] = x.shape[-1]
        return labels

    def _fold_scale(self, head, start, scale: float) -> None:
        """Multiply the affine parameters of the norm that computes ``start`` (through moves) by ``scale``."""
        n = self._fold_start(start)
        scaled = []
        if isinstance(n, fx.Node) and len(n.users) == 1 and n.op == "call_module" \
                and isinstance(self.modules[n.target], (nn.LayerNorm,) + RMS_NORM_MODULES):
            upd = self.updates.get(n.target)
            scaled = [(upd, a, 0.0) for a in ("weight", "bias") if upd is not None and a in upd.tensors]
        elif isinstance(n, fx.Node) and len(n.users) == 1 and n.target in (F.layer_norm, F.rms_norm):
            for p in n.args[2:4 if n.target is F.layer_norm else 3]:
                if isinstance(p, fx.Node) and p.op == "get_attr":
                    owner, _, attr = p.target.rpartition(".")
                    upd = self.updates.get(owner)
                    if upd is not None and attr in upd.tensors:
                        scaled.append((upd, attr, 0.0))
        else:
            scaled = self._written_out_affine(n) or self._linear_producer(n)
        if not scaled:
            raise self.conflict(head, "its input does not come from an affine norm or a linear map to fold the width "
                                      "factor into")
        for upd, attr, offset in scaled:
            s = scale if np.ndim(scale) == 0 else np.reshape(scale, (-1,) + (1,) * (upd.tensors[attr].ndim - 1))
            upd.tensors[attr] = ar.scale_affine(upd.tensors[attr], s, offset)

    def _linear_producer(self, n) -> list:
        """``F.linear(x, W, b)`` computing ``n`` with W (and b) read only there (OPT-350m's project_out before its
        tied head): a linear map's output scales with its weight and bias, so the factor folds into them."""
        if not (isinstance(n, fx.Node) and len(n.users) == 1 and n.target is F.linear):
            return []
        found = []
        for p in list(n.args[1:3]) + [n.kwargs.get("bias")]:
            if isinstance(p, fx.Node) and p.op == "get_attr":
                owner, _, attr = p.target.rpartition(".")
                upd = self.updates.get(owner)
                if self.attr_uses.get(p.target) != 1 or upd is None or attr not in upd.tensors:
                    return []
                found.append((upd, attr, 0.0))
            elif p is not None and p is not n.kwargs.get("bias"):
                return []
        return found

    def _fold_start(self, n):
        """The node computing ``n`` past moves, casts, dropout and the width-derived scales the family
        recomputes (each compensated by itself)."""
        while isinstance(n, fx.Node) and len(n.users) == 1 and (
                n.target in (operator.getitem, F.dropout) or n.op == "call_method" and n.target in (
                    "view", "reshape", "contiguous", "to")
                or n.meta.get(WIDTH_SCALE) is not None
                or n.op == "call_module" and isinstance(self.modules[n.target], (nn.Identity, nn.Dropout))):
            n = n.args[0] if n.meta.get(WIDTH_SCALE) is None else _activation_arg(n)
        return n

    def _written_out_affine(self, n) -> list:
        """``normalized * gamma (+ beta)`` ending at ``n``, with gamma and beta parameters read only there
        (through casts; a gain ``1 + w`` as Gemma's): ``[(update, attribute, offset)]``, or [] when ``n`` is not
        of that form."""
        found = []
        for _ in range(2):
            if not (isinstance(n, fx.Node) and len(n.users) == 1
                    and n.target in (operator.mul, operator.add, torch.mul, torch.add)):
                return []
            params = [(a, p, off) for a in n.args if isinstance(a, fx.Node)
                      for p, off in [param_through_offset(a)] if p is not None]
            if len(params) != 1 or (params[0][2] and n.target not in (operator.mul, torch.mul)):
                return []
            arg, p, offset = params[0]
            owner, _, attr = p.target.rpartition(".")
            upd = self.updates.get(owner)
            if upd is None or attr not in upd.tensors:
                return []
            found.append((upd, attr, offset))
            if n.target in (operator.mul, torch.mul):
                return found
            n = next(a for a in n.args if isinstance(a, fx.Node) and a is not arg)
        return []
