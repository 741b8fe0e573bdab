"""Mixture-of-experts dispatch on fx graphs (a mixin of :class:`~graphgrow.fx.labeling.FxLabelRun`).

The ATen graph of an exported sparse MoE block (transformers' grouped experts) reads: the router's
``softmax``/``sigmoid`` and ``topk`` over its experts, a ``sort`` of the chosen expert ids, a token gather
``aten.index(hidden, [perm // top_k])``, one grouped matrix product per projection over the stacked expert
weights ``[E, in, out]`` (``transformers::grouped_mm_fallback`` or ``aten::_grouped_mm``), per-expert biases
gathered by expert id (``aten.index(bias, [ids])``), and the inverse gather back to token order.  Each is
mapped to a relation of the core (:mod:`graphgrow.core.dispatch`, ``produce``, ``bare_parameter``);
``aten.index`` with constant indices (Falcon's ``qkv[:, :, :, [-2]]``) is a move replayed on the labels.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core import sites
from ..core.label_tensor import LabelTensor, label_channel_ids
from ..core.relations import NotUnderstood
from .moves import label_leaves
from .transformer import param_array

aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor}
TOPK_OPS = {aten.topk.default, torch.topk}
# grouped matrix products over stacked expert weights, by operator name (transformers' op exists only once
# transformers is imported, and the fx frontend never imports it)
GROUPED_MM_NAMES = {"transformers::grouped_mm_fallback", "aten::_grouped_mm"}
# ops a router's scores pass through between the softmax and the top-k
_SCORE_PASS = {"to", "float", "type_as", torch.sigmoid, operator.add, operator.truediv, operator.mul, "reshape",
               "view"}
ROUTER_REASON = "a router's expert count (the experts its top-k chooses among)"


def op_name(target) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


INDEX_ADD_OPS = {aten.index_add.default}
_VIEWS = (torch.reshape, "reshape", "view")
# experts applied one at a time to W[e]: F.linear reads W [E, out, in], x @ W[e] reads it [E, in, out]
EXPERT_PRODUCTS = {F.linear: (2, 1), torch.matmul: (1, 2)}
GATHER_OPS = {aten.gather.default, torch.gather}


def is_dispatch(target) -> bool:
    return target in INDEX_OPS or target in TOPK_OPS or target in INDEX_ADD_OPS or target in GATHER_OPS \
        or op_name(target) in GROUPED_MM_NAMES


def stacked_param(gm, param_names, base) -> tuple:
    """``(parameter node, the [E, a, b] shape its experts are read in)`` when ``base`` is a stacked 3-d parameter,
    or a view of a parameter stored ``[E * a, b]`` that splits its first axis (DBRX's ``w1.view(-1, ffn, d)``),
    the view its only reader; else ``(None, None)``."""
    if isinstance(base, fx.Node) and base.op == "get_attr" and base.target in param_names:
        shape = tuple(operator.attrgetter(base.target)(gm).shape)
        return (base, shape) if len(shape) == 3 else (None, None)
    if not (isinstance(base, fx.Node) and base.target in _VIEWS and isinstance(base.args[0], fx.Node)
            and base.args[0].op == "get_attr" and base.args[0].target in param_names and len(base.args[0].users) == 1):
        return None, None
    stored = tuple(operator.attrgetter(base.args[0].target)(gm).shape)
    literal = base.args[1] if len(base.args) == 2 and isinstance(base.args[1], (list, tuple)) else base.args[1:]
    if len(stored) != 2 or not all(type(d) is int for d in literal):
        return None, None
    try:
        shape = tuple(torch.empty(stored, device="meta").reshape(*literal).shape)
    except RuntimeError:
        return None, None
    return (base.args[0], shape) if len(shape) == 3 and shape[2] == stored[1] else (None, None)


def expert_slice(gm, param_names, w) -> tuple:
    """``(parameter node, expert)`` when ``w`` is ``W[e]`` of a stacked ``[E, out, in]`` parameter or of a view of
    one (:func:`stacked_param`) (JetMoE's experts apply ``F.linear(tokens_e, W[e])`` one expert at a time, DBRX's
    ``x @ w2.view(-1, ffn, d)[e]``), else ``(None, None)``."""
    if not (isinstance(w, fx.Node) and w.target is operator.getitem and len(w.users) == 1):
        return None, None
    p_node, _ = stacked_param(gm, param_names, w.args[0])
    idx = w.args[1]
    idx = idx[0] if isinstance(idx, tuple) and len(idx) == 1 else idx
    if p_node is None or type(idx) is not int:
        return None, None
    return p_node, idx


def feeds_topk(node: fx.Node, depth: int = 4) -> bool:
    """Whether ``node``'s values reach a top-k through casts and elementwise steps (a router's scores)."""
    for u in node.users:
        if u.target in TOPK_OPS or depth and u.target in _SCORE_PASS and feeds_topk(u, depth - 1):
            return True
    return False


class FxDispatchOps:
    """MoE dispatch ops of the fx label run."""

    def _dispatch(self, node, target, args, kwargs):
        if target in INDEX_OPS:
            return self._index(node, args[0], list(args[1]))
        if target in TOPK_OPS:
            return self._topk(node, args, kwargs)
        if target in INDEX_ADD_OPS:
            return self._index_add(node, args, kwargs)
        if target in GATHER_OPS:
            return self._gather(node, args, kwargs)
        return self._grouped_mm(node, args, kwargs)

    # ------------------------------------------------------------ torch.gather along positions
    def _gather(self, node, args, kwargs):
        """``torch.gather(x, dim, index)``: along a position axis, by an index computed without channels that is an
        ``expand`` of a tensor of size 1 on x's channel axes (every head reads the same positions), the channels
        pass through (DeBERTa's relative-position scores, gathered over (batch x heads, queries, distances))."""
        names = ("input", "dim", "index")
        given = dict(zip(names, args), **kwargs)
        x, dim, index = (given.get(k) for k in names)
        if not isinstance(x, LabelTensor) or type(dim) is not int or set(given) - set(names) \
                or not isinstance(index, (LabelTensor, torch.Tensor)):
            raise NotUnderstood("a gather of a value that is not a tensor of the graph, or with sparse_grad")
        if isinstance(index, LabelTensor) and index.vary:
            raise NotUnderstood("its indices carry channels")
        ref = x if self.analysis else self._old(node.args[0])
        i_node = dict(zip(names, node.args), **node.kwargs)["index"]
        if ref.vary and not self._broadcast_over(i_node, ref.vary, ref.ndim) \
                and not self._same_along(index, ref.vary):
            raise NotUnderstood("its indices may differ between channels (not an expand over the channel axes)")
        return self.gather_along(node, x, ref, dim, tuple(self._shape(i_node)))

    @staticmethod
    def _same_along(index, axes) -> bool:
        """Whether a constant index tensor (values known: computed from positions) is the same along ``axes``."""
        if not isinstance(index, torch.Tensor) or index.is_meta:
            return False
        return all(bool((index == index.narrow(a, 0, 1)).all()) for a in axes)

    def _broadcast_over(self, n, axes, ndim: int) -> bool:
        """Whether ``n`` (through casts) is an ``expand`` of a tensor whose size is 1 (or absent) on ``axes``."""
        for _ in range(4):
            if isinstance(n, fx.Node) and n.op == "call_method" and n.target in ("to", "long", "int", "contiguous"):
                n = n.args[0]
        if not (isinstance(n, fx.Node) and n.target == "expand" and isinstance(n.args[0], fx.Node)):
            return False
        src = tuple(self._shape(n.args[0]))
        lead = ndim - len(src)
        return all(a < lead or src[a - lead] == 1 for a in axes)

    # ------------------------------------------------------------ index_add back to token order
    def _index_add(self, node, args, kwargs):
        """``zeros.index_add(dim, ids, src)``: each row of ``src`` added into the position its id names (JetMoE's
        experts' outputs summed back per token). Along a position axis it acts on every channel alike: the result
        holds src's channels; the zeros' literal width follows them."""
        base, dim, ids, src = (list(args) + [None] * 4)[:4]
        if kwargs or len(args) != 4 or not isinstance(src, LabelTensor) or type(dim) is not int:
            raise NotUnderstood("an index_add with a scale or without a tensor to add")
        if isinstance(ids, LabelTensor) and ids.vary:
            raise NotUnderstood("its indices carry channels")
        if not (isinstance(base, torch.Tensor) and not base.is_meta and not base.any()):
            raise NotUnderstood("it adds into a tensor that is not zeros made in the graph")
        ref = src if self.analysis else self._old(node.args[3])
        dim %= src.ndim
        if len(ref.vary) != 1 or dim in ref.vary:
            raise NotUnderstood("it adds along a channel axis")
        c = ref.vary[0]
        seq = label_channel_ids(src, c)
        if seq is None:
            raise NotUnderstood("its rows' labels are not one channel sequence")
        shape = list(base.shape)
        if not self.analysis and shape[c] != src.shape[c]:
            z = node.args[0]
            if not (isinstance(z, fx.Node) and z.target is aten.zeros.default and list(z.args[0]) == shape):
                raise self.conflict(node, "the zeros it adds into cannot follow the new width")
            shape[c] = src.shape[c]
            self.arg_updates[z] = ((shape,) + tuple(z.args[1:]), z.kwargs)
        return LabelTensor.channels(tuple(shape), c, seq, self.salt(node))

    # ------------------------------------------------------------ experts applied one at a time
    def _expert_linear(self, node, args, kwargs):
        """``F.linear(tokens_e, W[e])`` (or ``tokens_e @ W[e]``) for every expert ``e`` of a stacked weight
        ``[E, out, in]`` (``[E, in, out]``), or of a view of one stored ``[E * out, in]`` (DBRX): one producer whose
        weight is the stacked parameter (every slice gathered alike). Every expert writes the first expert's
        output space (their rows meet in one concatenation or sum: one plan, one copy order); the first expert
        that reads tokens stores the new weight and the others check theirs equal to it."""
        p_node, _ = expert_slice(self.gm, self.param_names, node.args[1])
        base = node.args[1].args[0]
        _, stacked = stacked_param(self.gm, self.param_names, base)
        readers = [next(iter(u.users)) for u in base.users if expert_slice(self.gm, self.param_names, u)[0]]
        experts = {expert_slice(self.gm, self.param_names, u)[1] for u in base.users}
        real = operator.attrgetter(p_node.target)(self.gm)
        if len(readers) != len(base.users) or len(experts) != stacked[0] \
                or any(r.target is not node.target or len(r.args) > 2 and r.args[2] is not None or r.kwargs
                       for r in readers):
            raise NotUnderstood("a stacked expert weight read other than one F.linear (or matmul) per expert")
        w_in, w_out = EXPERT_PRODUCTS[node.target]
        x = args[0]
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its input is not a tensor of the graph")
        old_x = self._old(node.args[0]) if isinstance(self._old(node.args[0]), LabelTensor) else x
        weight = param_array(real)
        weight = weight.reshape(stacked) if tuple(weight.shape) != stacked else weight
        first, shape = readers[0], self._shape(node)
        if node is first:  # the experts' one output space
            out, w, _ = self.produce(node, p_node.target, x, old_x, weight, in_axis=-1, out_axis=-1, w_in=w_in,
                                     w_out=w_out, shape=shape)
            if not self.analysis and w is not None and int(np.prod(x.shape)):
                self._store_experts(node, p_node.target, w, real.ndim)
            return out
        if first not in self.node_space:
            raise NotUnderstood("an earlier expert of its weight was not analysed")
        space = self.node_space[first]
        if self.analysis:
            self.note_roles(x, "consumer", p_node.target)
            return LabelTensor.channels(shape, -1, space.chan_ids, self.salt(node))
        mapping = self.plan.mapping(space)
        if int(np.prod(x.shape)):  # (an expert no token chose here shows nothing of its input's channels)
            match = self.match(node, old_x, x, -1, fills_ok=True)
            if match is not None or len(mapping) != weight.shape[w_out]:
                self._store_experts(node, p_node.target, sites.produce_weights(
                    weight, w_in, w_out, match, mapping, self.options, self.rng, self.plan.fill_kind.get(space.id)),
                    real.ndim)
        out_shape = list(shape)
        out_shape[-1] = len(mapping)
        return LabelTensor.channels(out_shape, -1, self.plan.new_chan_ids(space), self.salt(node))

    def _store_experts(self, node, target: str, w, ndim: int = 3) -> None:
        """The stacked weight's new value: stored by the first expert that reads tokens, equal for the others
        (a parameter stored ``[E * a, b]`` takes its experts' blocks back in that layout)."""
        if ndim == 2:
            self._grown_view(node.args[1].args[0], w.shape)
            w = w.reshape((w.shape[0] * w.shape[1], w.shape[2]))
        stored = self.__dict__.setdefault("_experts_stored", set())
        if target in stored:
            self._same_as_stored(node, {target: w})
            return
        stored.add(target)
        owner, _, attr = target.rpartition(".")
        self._update(owner).tensors[attr] = w

    def _grown_view(self, view, shape) -> None:
        """The view ``W.view(E, a, b)`` of a stored ``[E * a, b]`` parameter rewritten to the grown ``[E, a', b']``
        (a graph the widening returns runs it; a transformers model views at its config's sizes)."""
        literal = list(view.args[1] if len(view.args) == 2 and isinstance(view.args[1], (list, tuple))
                       else view.args[1:])
        literal[1:] = [int(shape[1]), int(shape[2])]
        self.arg_updates[view] = ((view.args[0], literal), view.kwargs)

    # ------------------------------------------------------------ aten.index
    def _index(self, node, x, indices):
        src = node.args[0]
        if not isinstance(x, LabelTensor):
            if isinstance(x, torch.Tensor) and not label_leaves(indices):
                return x[tuple(indices)]
            raise NotUnderstood("it indexes a value that is not a tensor of the graph")
        if any(isinstance(i, LabelTensor) and i.vary for i in indices):
            raise NotUnderstood("its indices carry channels")
        computed = [k for k, i in enumerate(indices) if isinstance(i, LabelTensor)]
        if not computed:  # constant indices (Falcon's key/value slots): a move replayed on the labels
            if any(isinstance(i, torch.Tensor) and i.is_meta for i in indices):
                # (a model captured on the meta device, as a checkpoint directory is planned, holds no values)
                raise NotUnderstood("its constant indices were computed on the meta device: their values are unknown")
            return self._getitem(node, x, tuple(slice(None) if i is None else i for i in indices))
        if isinstance(src, fx.Node) and src.op == "get_attr" and src.target in self.param_names:
            return self._expert_bias(node, src, x, indices)
        if x.elem is not None and self._is_fixed(x):
            return self.fixed_outputs(node)
        given = [k for k, i in enumerate(indices) if i is not None]
        if given != list(range(given[0], given[-1] + 1)):
            raise NotUnderstood("its index tensors are not on adjacent axes")
        shape = torch.broadcast_shapes(*[tuple(i.shape) for i in indices if i is not None])
        return self.gather_positions(node, x, self._old(src), given[0], len(given), tuple(shape))

    def _expert_bias(self, node, p_node, x, indices):
        """``bias[expert_ids]``: per-expert biases ``[E, out]`` gathered for every routed token. Their columns
        are one channel space (the output units of every expert) joining the grouped product it is added to."""
        real = operator.attrgetter(p_node.target)(self.gm)
        if real.ndim != 2 or len(indices) != 1 or self.attr_uses.get(p_node.target, 0) != 1:
            raise NotUnderstood("a stacked parameter indexed other than by one expert id per token")
        shape = tuple(self._shape(node))
        labels, _, new = self.bare_parameter(node, p_node.target, param_array(real), 1, shape, len(shape) - 1)
        if new is not None:
            owner, _, attr = p_node.target.rpartition(".")
            self._update(owner).tensors[attr] = new
        return labels

    # ------------------------------------------------------------ interleaved channels
    @staticmethod
    def _strided(idx):
        """``(axis, step)`` of ``x[..., start::step]`` over a whole axis (``start < step``, every other item a full
        slice): interleaved channels (GPT-OSS's gate/up pairs at even/odd columns), else None."""
        items = list(idx) if isinstance(idx, tuple) else [idx]
        found = None
        for axis, i in enumerate(items):
            if isinstance(i, slice) and i == slice(None):
                continue
            step = i.step if isinstance(i, slice) else None
            if not isinstance(step, int) or step < 2 or found is not None or not 0 <= (i.start or 0) < step \
                    or not (i.stop is None or isinstance(i.stop, int) and i.stop >= 2 ** 62):
                return None
            found = (axis, step)
        return found

    def _getitem(self, node, x, idx):
        strided = self._strided(idx)
        if strided is not None and self.analysis and strided[0] in x.vary:
            # channels interleaved with period ``step`` widen as units of ``step`` consecutive channels: every
            # unit is copied whole, so the strided slice keeps reading the same member of every unit
            for v in [x] + self._added_operands(node.args[0], x):  # (a bias added before: its own space, tied)
                seq = label_channel_ids(v, strided[0])
                if seq is None or not self._whole_space(seq):
                    continue  # a part of a space (the head_dim of stacked rotary): it keeps its length
                why = "its length is not a multiple of the step" if len(seq) % strided[1] else \
                    self.constraints.units(seq.reshape(-1, strided[1]))
                if why:
                    raise NotUnderstood(f"a strided slice of interleaved channels: {why}")
        return super()._getitem(node, x, idx)

    def _whole_space(self, seq) -> bool:
        """``seq`` holds every channel of one channel space, in order."""
        spaces = self.table.spaces_of(np.unique(seq))
        return len(spaces) == 1 and np.array_equal(seq, spaces[0].chan_ids)

    def _added_operands(self, n, x) -> list:
        """The other operands of the add that computed ``x`` (same shape): they pair channel by channel with it."""
        if not (isinstance(n, fx.Node) and n.target in (operator.add, torch.add, "add")):
            return []
        vals = [self.env.get(a) for a in n.all_input_nodes]
        return [v for v in vals if isinstance(v, LabelTensor) and v is not x and v.shape == x.shape and v.vary]

    def _rewrite_index(self, node, x, idx):
        strided = self._strided(idx)
        old_in = self.old[node.args[0]]
        if strided is None or old_in.shape[strided[0]] == x.shape[strided[0]]:
            return super()._rewrite_index(node, x, idx)
        axis, step = strided
        src = self.axis_source(node, old_in, x, axis)
        rows = src.reshape(-1, step) if len(src) % step == 0 else None
        if rows is None or (rows[:, 0] % step).any() or not (rows - rows[:, :1] == np.arange(step)).all():
            raise self.conflict(node, "a strided slice of channels no longer reads whole units")
        return idx

    # ------------------------------------------------------------ gates
    def _gate_operand(self, node, a, b, sources):
        """The labels of ``a * b`` where one operand is a gate of one produced channel broadcast over the other's
        channel axes (a shared expert's sigmoid gate), else None."""
        if node.target not in (operator.mul, torch.mul, "mul") or not all(isinstance(v, LabelTensor) for v in (a, b)):
            return None
        for p, q, ps, qs in ((a, b, sources[0], sources[1]), (b, a, sources[1], sources[0])):
            rp, rq = (p, q) if self.analysis else (self._old(ps), self._old(qs))
            if not isinstance(rp, LabelTensor) or not isinstance(rq, LabelTensor) or len(rp.chans) != 1 \
                    or not rq.vary or self._is_fixed(rp) or rp.ndim > rq.ndim:
                continue
            shape = (1,) * (rq.ndim - rp.ndim) + tuple(rp.shape)
            if all(shape[ax] == 1 for ax in rq.vary):
                return self.broadcast_gate(node, p, rp if not self.analysis else None, q)
        return None

    # ------------------------------------------------------------ router top-k
    def _topk(self, node, args, kwargs):
        x = args[0]
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its input is not a tensor of the graph")
        if self.mixes(x, self._old(node.args[0]), {dim % x.ndim}):
            return self.mix(node, x, f"top-k over {ROUTER_REASON}")
        return self.fixed_outputs(node)

    def softmax_reason(self, node) -> str:
        """Why a softmax over a channel axis freezes it: a router's expert count when a top-k reads it."""
        return f"softmax over {ROUTER_REASON}" if feeds_topk(node) else "softmax over the channel axis"

    # ------------------------------------------------------------ routers
    def _routers(self) -> set:
        """The linear maps whose outputs decide the routing: reached walking up from a top-k, or from the computed
        indices of a token gather, before any other linear map (the router's logits, never the stream)."""
        if getattr(self, "_router_nodes", None) is None:
            found: set = set()
            seeds = [n for n in self.gm.graph.nodes if n.target in TOPK_OPS]
            seeds += [i for n in self.gm.graph.nodes if n.target in INDEX_OPS
                      for i in (n.args[1] if len(n.args) > 1 else []) if isinstance(i, fx.Node)]
            todo, seen = [(n, 24) for n in seeds], set()
            while todo:
                n, depth = todo.pop()
                if n in seen or depth == 0:
                    continue
                seen.add(n)
                if n.target is F.linear:
                    found.add(n)
                    continue
                todo.extend((a, depth - 1) for a in n.all_input_nodes if a.op in ("call_function", "call_method"))
            self._router_nodes = found
        return self._router_nodes

    def _on_router(self, node) -> bool:
        """Whether every channel ``node`` reads is a router's output channel (an expert count)."""
        chans = [x.chans for _, x in self.input_pairs(node) if not self._is_fixed(x)]
        if not chans:
            return False
        routed = [self.env[n].chans for n in self._routers() if isinstance(self.env.get(n), LabelTensor)]
        return bool(routed) and bool(np.isin(np.concatenate(chans), np.concatenate(routed)).all())

    def opaque(self, node, reason: str):
        if self.analysis and "expert count" not in reason and self._on_router(node):
            reason = f"{reason}; it reads {ROUTER_REASON}"
        return super().opaque(node, reason)

    def mix(self, node, x, why: str):
        if self.analysis and "expert count" not in why and self._on_router(node):
            why = f"{why}; it reads {ROUTER_REASON}"
        return super().mix(node, x, why)

    # ------------------------------------------------------------ grouped expert products
    def _stacked_weight(self, w_node):
        """``(parameter node, its input axis, its output axis)`` of the stacked expert weight a grouped product
        reads as ``[E, in, out]``: the parameter itself, or ``W.transpose(-2, -1)`` of one stored ``[E, out, in]``."""
        w_in, w_out = 1, 2
        if isinstance(w_node, fx.Node) and w_node.target in (torch.transpose, "transpose") and len(w_node.users) == 1:
            if sorted(int(a) % 3 for a in w_node.args[1:3]) != [1, 2]:
                return None, 0, 0
            w_node, w_in, w_out = w_node.args[0], 2, 1
        if isinstance(w_node, fx.Node) and w_node.op == "get_attr" and w_node.target in self.param_names \
                and operator.attrgetter(w_node.target)(self.gm).ndim == 3:
            return w_node, w_in, w_out
        return None, 0, 0

    def _grouped_mm(self, node, args, kwargs):
        """``out[s] = x[s] @ W[e(s)]``, the rows of each expert contiguous (offsets): a producer whose weight
        holds one slice per expert; all slices read the input's channels and write one output space."""
        x, x_node = args[0], node.args[0]
        if not isinstance(x, LabelTensor) or x.ndim != 2:
            raise NotUnderstood("its input is not a matrix of routed tokens")
        if label_leaves((args[2:], kwargs)) and not all(self._is_fixed(t) and not t.vary
                                                        for t in label_leaves((args[2:], kwargs))):
            raise NotUnderstood("its offsets carry channels")
        p_node, w_in, w_out = self._stacked_weight(node.args[1])
        if p_node is None:
            raise NotUnderstood("its expert weights are not one stacked parameter")
        if self.attr_uses.get(p_node.target, 0) != 1:
            raise NotUnderstood("its expert weights are also read by other ops")
        weight = param_array(operator.attrgetter(p_node.target)(self.gm))
        old_x = self._old(x_node) if isinstance(self._old(x_node), LabelTensor) else x
        out, w, _ = self.produce(node, p_node.target, x, old_x, weight, in_axis=-1, out_axis=-1, w_in=w_in,
                                 w_out=w_out, shape=self._shape(node))
        if w is not None:
            owner, _, attr = p_node.target.rpartition(".")
            self._update(owner).tensors[attr] = w
        return out
