"""Label propagation over a torch.fx graph: the fx adapter of :mod:`graphgrow.core.relations`.

:class:`FxLabelRun` walks the graph once with :class:`~graphgrow.core.label_tensor.LabelTensor` values in
place of activations, maps every node to a relation of the core through the tables of
:mod:`graphgrow.fx.ops`, reads module parameters for it and records the new ones
(:class:`ModuleUpdate`).  Data-movement ops are executed on the labels by torch itself (on a stand-in
of the input's shape where the compact label form survives the move), so their index maps are learned,
not guessed.  Anything unknown is opaque: its input channels freeze.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..core import arithmetic as ar
from ..core.growth import Conflict
from ..core.label_tensor import LabelTensor, same_labels
from ..core.labels import MAX_POSITIONS, LabelOverflow
from ..core.relations import NotUnderstood, RelationRun
from ..errors import GraphGrowError
from . import ops
from .dispatch import EXPERT_PRODUCTS, FxDispatchOps, expert_slice, is_dispatch
from .functional import FxFunctionalOps
from .moves import MoveReplay, as_labels, label_leaves
from .ops import describe, qualified_name
from .shapes import TensorMeta
from .stream_scale import scale_streams
from .transformer import (ALIBI_REASON, FUNCTIONAL_PRODUCERS, MATMUL_FUNCS, RMS_NORM_MODULES, SDPA_FUNCS,
                          WIDTH_SCALE, WIDTH_TABLE, FxTransformerOps, mean_terms, param_array, scores_scale_follows)


@dataclass
class ModuleUpdate:
    tensors: dict = field(default_factory=dict)  # name -> np.ndarray
    attrs: dict = field(default_factory=dict)


_param = param_array


def one_device(args, kwargs) -> tuple:
    """A graph captured on the meta device (a checkpoint directory's weightless model) names the meta device in its
    literals (``zeros(..., device=meta)``): a tensor made from literals alone is made on the CPU, holding the values
    it holds in memory (JetMoE's index_add into zeros); an op that also reads a meta tensor stays on the meta device."""
    tensors = []
    tree_map(lambda v: tensors.append(v) if isinstance(v, torch.Tensor) else None, (args, kwargs))
    if any(t.is_meta for t in tensors):
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) and not v.is_meta else v  # noqa: E731
        return tree_map(to_meta, args), tree_map(to_meta, kwargs)
    cpu = lambda v: torch.device("cpu") if isinstance(v, torch.device) and v.type == "meta" else v  # noqa: E731
    return tree_map(cpu, args), tree_map(cpu, kwargs)


class FxLabelRun(FxTransformerOps, FxFunctionalOps, FxDispatchOps, MoveReplay, RelationRun):
    scales_gainless_streams = True  # fill + rescale under norms without gain: fx/stream_scale.py

    def __init__(self, gm: fx.GraphModule, meta: dict, *, plan=None, analysis: "FxLabelRun | None" = None,
                 options=None):
        super().__init__(plan=plan, analysis=analysis, options=options)
        self.gm = gm
        self.meta = meta  # node -> recorded real value / TensorMeta from the original run
        self.updates: dict = {}  # module name -> ModuleUpdate
        self.arg_updates: dict = {}  # node -> (args, kwargs)
        if analysis is not None:
            self.modules, self.salts, self.shared, self.attr_uses = (analysis.modules, analysis.salts, analysis.shared,
                                                                     analysis.attr_uses)
            self.param_names, self.old_parts = analysis.param_names, analysis.old_parts
            self.tied_heads = analysis.tied_heads
            self.table_scales: dict = {}  # embedding table -> the factor its stored new value carries
            self.alibi_nodes = analysis.alibi_nodes
            self.inner_alibi = analysis.inner_alibi
            return
        self.table_scales = {}
        self.modules = dict(gm.named_modules())
        self.param_names = {n for n, _ in gm.named_parameters()}
        self.old_parts: dict = {}  # composite ops' internal labels in the original configuration
        self.alibi_nodes: set = set()  # adds of a per-head constant bias to attention scores (MPT's ALiBi)
        self.inner_alibi: set = set()  # those whose heads keep their number and grow head_dim
        self.salts = {n: i + 1 for i, n in enumerate(gm.graph.nodes)}
        self.attr_uses: dict = {}
        calls: dict = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self.attr_uses[n.target] = self.attr_uses.get(n.target, 0) + len(n.users)
            elif n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.shared = {k for k, v in calls.items() if v > 1 and any(True for _ in self.modules[k].parameters())}
        # tied weights: one Parameter held by several modules must stay one tensor
        owners: dict = {}
        for name, mod in self.modules.items():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(name)
        self.tied_heads = {}  # output head (Linear) -> the embedding whose weight it shares
        for names in owners.values():
            if len(names) > 1:
                self.shared |= names
        for names in owners.values():
            pair = sorted(names, key=lambda n: not isinstance(self.modules[n], nn.Embedding))
            if len(pair) == 2 and isinstance(self.modules[pair[0]], nn.Embedding) \
                    and type(self.modules[pair[1]]) is nn.Linear and calls.get(pair[0]) == calls.get(pair[1]) == 1 \
                    and sum(1 for ns in owners.values() if ns & set(pair)) == 1 + (self.modules[pair[1]].bias is not None):
                self.tied_heads[pair[1]] = pair[0]
                self.shared -= set(pair)

    # ------------------------------------------------------------ hooks of the core run
    def site(self, node) -> str:
        return describe(node, self.modules)

    def node_key(self, node):
        return node

    def salt(self, node) -> int:
        return self.salts[node]

    def input_pairs(self, node) -> list:
        out = []
        for a in node.all_input_nodes:
            news = label_leaves(self.env.get(a))
            olds = label_leaves(self.old.get(a)) if not self.analysis else [None] * len(news)
            if len(olds) != len(news):
                olds = [None] * len(news)
            out.extend(zip(olds, news))
        return out

    def fixed_outputs(self, node):
        counter = [0]

        def conv(x):
            if isinstance(x, (torch.Tensor, TensorMeta)):
                counter[0] += 1
                return self._fixed(node, tuple(x.shape), counter[0] - 1)
            return x

        return tree_map(conv, self.meta.get(node))

    def old_outputs(self, node):
        return self.old[node]

    # ------------------------------------------------------------ helpers
    def _fixed(self, node, shape, k=0):
        key = (node, k)
        if key not in self.fixed_space:
            self.fixed_space[key] = self.table.new_space(f"{node.name}#{k}", 1, "fixed")
        return LabelTensor.element(shape, self.fixed_space[key].base, self.salts[node] * 8 + k)

    def _old(self, arg):
        """The original labels of an argument (the current ones in the analysis run)."""
        if not isinstance(arg, fx.Node):
            return None
        v = (self.env if self.analysis else self.old).get(arg)
        return v if isinstance(v, LabelTensor) else None

    def _shape(self, node):
        m = self.meta.get(node)
        return tuple(m.shape) if m is not None and hasattr(m, "shape") else None

    def _update(self, name) -> ModuleUpdate:
        return self.updates.setdefault(name, ModuleUpdate())

    # ------------------------------------------------------------ driver
    def run(self, inputs):
        it = iter(inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                x = next(it, node.args[0] if node.args else None)
                self.env[node] = self._fixed(node, tuple(x.shape)) if isinstance(x, torch.Tensor) else x
            elif node.op == "get_attr":
                real = operator.attrgetter(node.target)(self.gm)
                if isinstance(real, torch.Tensor) and (real.dtype == torch.bool or not real.is_floating_point()):
                    # index tables and masks act on data as they are
                    self.env[node] = real.detach() if real.is_meta else real.detach().cpu()
                elif isinstance(real, torch.Tensor):
                    labels = self._param_labels(node, real)
                    if labels is None and real.numel() >= MAX_POSITIONS:
                        # a weight too large for element labels (an LLM's embedding table): it is read as a weight
                        # (functional producers take the parameter itself), never as labels
                        labels = torch.empty(real.shape, device="meta")
                    self.env[node] = labels if labels is not None else self._fixed(node, tuple(real.shape))
                else:
                    self.env[node] = real
            elif node.op == "output":
                self._output(node)
            else:
                self.env[node] = self._call_guarded(node)
        if not self.analysis:
            scale_streams(self)
        return self

    def _call_guarded(self, node):
        """An op that fails on labels is an op the analysis does not understand: fail closed."""
        if not self.analysis and node in self.opaque_nodes:
            return self.opaque(node, "not understood")
        try:
            return self._call(node)
        except NotUnderstood as exc:
            return self.opaque(node, str(exc))
        except (Conflict, GraphGrowError, LabelOverflow):
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc).strip()
            msg = f"could not be analysed ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
            if self.analysis:
                return self.opaque(node, msg)
            raise self.conflict(node, msg) from None

    def _output(self, node):
        news = label_leaves(self._args(node)[0][0])
        if self.analysis:
            for x in news:
                self.model_output(None, x)
            return
        olds = label_leaves(fx.node.map_arg(node.args, lambda n: self.old[n])[0])
        for o, n in zip(olds, news):
            if not same_labels(o, n):
                raise self.conflict(node, "a model output changed")

    def _args(self, node):
        return fx.node.map_arg(node.args, lambda n: self.env[n]), fx.node.map_arg(node.kwargs, lambda n: self.env[n])

    def _call(self, node):
        args, kwargs = self._args(node)
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, nn.MultiheadAttention) and node.target not in self.shared:
                return self._mha(node, mod, args, kwargs)
            return self._module(node, mod, args, kwargs)
        target = node.target
        first = args[0] if args else None
        if not label_leaves((args, kwargs)):  # pure python / shape arithmetic
            args, kwargs = one_device(args, kwargs)
            if node.op == "call_method":
                return getattr(first, target)(*args[1:], **kwargs)
            return target(*args, **kwargs)
        only_first = isinstance(first, LabelTensor) and not label_leaves((args[1:], kwargs))
        if node.op == "call_method":
            if target in ops.SHAPE_METHODS:
                return getattr(torch.empty(first.shape, device="meta"), target)(*args[1:], **kwargs)
            if target in ops.IDENTITY_METHODS:
                return first
            if target in ops.ELEMENTWISE_METHODS:
                return self.elementwise(node, first)
            if target in ops.BINARY_METHODS:
                return self._binary(node, args, kwargs)
            if target in ops.MOVE_METHODS:
                return self._move(node, target, args, kwargs)
            if target in ops.REDUCE_METHODS:
                return self._reduce(node, first, args, kwargs)
            if target == "masked_fill":
                return self._masked_fill(node, first, args, kwargs)
            if target in ("softmax", "log_softmax"):
                return self._softmax(node, first, args[1:], kwargs)
            if target in ("matmul", "bmm", "__matmul__") and isinstance(args[1] if len(args) > 1 else None, LabelTensor):
                return self._matmul(node, first, args[1])
            if self._constants_only(args, kwargs):
                return self.fixed_outputs(node)
            raise NotUnderstood("this method is not understood by the channel analysis")
        if target is getattr and isinstance(first, LabelTensor):
            attr = args[1]
            if attr == "shape":
                return torch.Size(first.shape)
            if attr == "dtype":
                return self.meta[node.args[0]].dtype
            if attr == "device":
                return torch.device("cpu")
            if attr == "ndim":
                return first.ndim
            raise NotUnderstood(f"attribute '{attr}' is not understood")
        if is_dispatch(target):
            return self._dispatch(node, target, args, kwargs)
        if target is operator.getitem:
            return self._getitem(node, first, args[1]) if isinstance(first, LabelTensor) else first[args[1]]
        if target in ops.IDENTITY_FUNCS:
            return first
        if only_first and (target in ops.ELEMENTWISE_FUNCS or qualified_name(target) in ops.ELEMENTWISE_BY_NAME):
            return self.elementwise(node, first)
        if target in (torch.max, torch.min) and len(args) >= 2 and type(args[1]) is int:
            return self._extreme_along(node, first, args, kwargs)
        if target in ops.BINARY_FUNCS:
            if target in (torch.max, torch.min) and (len(args) < 2 or not isinstance(args[1], (LabelTensor, int, float))):
                return self._reduce(node, first, args, kwargs)
            out = self._binary(node, args, kwargs)
            self._layer_scale_fill(node)
            return out
        if target in ops.MOVE_FUNCS:
            return self._move(node, target, args, kwargs)
        if target in ops.REDUCE_FUNCS:
            return self._reduce(node, first, args, kwargs)
        if target is F.pad and isinstance(first, LabelTensor):
            return self._pad(node, first, args, kwargs)
        if target is F.glu and isinstance(first, LabelTensor):
            return self._glu(node, first, args, kwargs)
        if target in ops.POOL_FUNCS:
            return self.pool(node, first, self._old(node.args[0]), self._shape(node))
        if target in ops.SOFTMAX_FUNCS:
            return self._softmax(node, first, args[1:], kwargs)
        if target in EXPERT_PRODUCTS and len(node.args) > 1 \
                and expert_slice(self.gm, self.param_names, node.args[1])[0]:
            return self._expert_linear(node, args, kwargs)
        if target in FUNCTIONAL_PRODUCERS and self._weight_param(node, target) is not None:
            return self._functional_producer(node, target, args, kwargs)
        if target in (F.conv1d, F.conv2d, F.conv3d) and self.weight_normed(node) is not None:
            return self._weight_normed_conv(node, args, kwargs)
        if target in SDPA_FUNCS:
            return self._sdpa(node, args, kwargs)
        if target in MATMUL_FUNCS and len(args) == 2 and all(isinstance(a, LabelTensor) for a in args):
            if self._constants_only(args, kwargs):
                return self.fixed_outputs(node)
            return self._matmul(node, args[0], args[1])
        if target is torch.baddbmm and len(args) >= 3 and any(isinstance(a, LabelTensor) for a in args[1:3]):
            if self._constants_only(args, kwargs):
                return self.fixed_outputs(node)
            return self._baddbmm(node, args)
        if target in (F.batch_norm, F.instance_norm) and isinstance(first, LabelTensor):
            return self._functional_norm(node, first)
        if target in (F.layer_norm, F.group_norm, getattr(F, "rms_norm", None)) and isinstance(first, LabelTensor):
            return self._norm_function(node, target, first, args, kwargs)
        if target in ops.NORM_FUNCS and isinstance(first, LabelTensor):
            return self.mix(node, first, f"{qualified_name(target).split('.')[-1]} normalizes across channels")
        if target is torch.masked_fill and isinstance(first, LabelTensor):
            return self._masked_fill(node, first, args, kwargs)
        if target is torch.where and len(args) == 3:
            return self._binary(node, (args[1], args[2]), {}, cond=args[0])
        if self._constants_only(args, kwargs):
            return self.fixed_outputs(node)
        raise NotUnderstood("this function is not understood by the channel analysis")

    # ------------------------------------------------------------ functions and methods
    def _constants_only(self, args, kwargs) -> bool:
        """Every tensor read is without channel structure (inputs, tables computed from them): so is the result,
        whatever the op computes (masks, rotary angles, position ids)."""
        leaves = label_leaves((args, kwargs))
        return all(not x.vary and self._is_fixed(x) for x in leaves)

    def _is_scalar_like(self, a: LabelTensor, other: LabelTensor) -> bool:
        """A constant/parameter operand that does not align with the other's channels."""
        if len(a.chans) != 1:
            return False
        sp = self.table.spaces_of(a.chans)[0]
        if sp.kind != "fixed" or len(sp.producers):
            return False
        shape = (1,) * (other.ndim - a.ndim) + a.shape
        return len(shape) == other.ndim and all(shape[ax] == 1 for ax in other.vary)

    def _is_fixed(self, a: LabelTensor) -> bool:
        sp = self.table.spaces_of(a.chans)
        return len(sp) == 1 and sp[0].kind == "fixed" and not sp[0].producers

    def _binary(self, node, args, kwargs, cond=None):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if self.analysis and node.meta.get(WIDTH_TABLE) is not None and cond is None:
            other = (a, b)[1 - node.meta[WIDTH_TABLE]]
            if isinstance(other, LabelTensor):
                self.constraints.freeze(other.chans, f"{self.site(node)}: a sinusoidal position table the family "
                                                     "computes from the width (a fixed formula) meets it here")
        if node.meta.get(WIDTH_SCALE) is not None and cond is None:
            return self._width_scale(node, args)
        if cond is None:
            uniform = self._uniform_operand(node, a, b)
            if uniform is not None:
                return uniform
        # a tensor computed in the graph from no input (rotary tables from arange): a constant
        a, b = ((self._fixed(node, tuple(t.shape), 7 + i) if isinstance(t, torch.Tensor) else t)
                for i, t in enumerate((a, b)))
        if isinstance(cond, LabelTensor):
            return self._where(node, cond, a, b)
        if not isinstance(a, LabelTensor) or not isinstance(b, LabelTensor):
            other = b if isinstance(a, LabelTensor) else a
            if not isinstance(other, (int, float, bool)):
                raise NotUnderstood(f"operand of type {type(other).__name__} is not understood")
            return self.elementwise(node, a if isinstance(a, LabelTensor) else b)
        if not a.vary and not b.vary and self._is_fixed(a) and self._is_fixed(b):
            # constants combined (rotary angles: positions x inverse frequencies): a constant of the result's shape
            return self._fixed(node, tuple(self._shape(node) or np.broadcast_shapes(a.shape, b.shape)))
        for p, q in ((a, b), (b, a)):
            if self._is_scalar_like(p, q):
                return self.elementwise(node, q)
        sources = node.args[1:3] if cond is not None else node.args[:2]
        gated = self._gate_operand(node, a, b, sources)
        if gated is not None:
            return gated
        for (p, ps), (q, qs) in (((a, sources[0]), (b, sources[1])), ((b, sources[1]), (a, sources[0]))):
            rq = q if self.analysis else self._old(qs)
            constant = p.elem is not None or (not p.vary and self._is_fixed(p))  # (a concatenation loses .elem)
            if not constant or not isinstance(rq, LabelTensor) or not rq.vary:
                continue
            try:
                if tuple(np.broadcast_shapes(rq.shape, p.shape)) != rq.shape:
                    continue
            except ValueError:
                continue
            if isinstance(ps, fx.Node) and ps.op == "get_attr" and ps.target in self.param_names \
                    and self.attr_uses.get(ps.target, 0) == 1:
                return self._param_operand(node, q, ps, qs)  # a position embedding
            if len(rq.vary) >= 2 and self._is_fixed(p):
                return self.fixed_operand(node, q, self._old(qs), p.shape)  # rotary cos / sin
            if len(rq.vary) == 1 and self._is_fixed(p) and p.ndim >= rq.ndim - rq.vary[0] \
                    and p.shape[rq.vary[0] - rq.ndim] > 1 and self._alibi(node, rq):
                return self._per_head_bias(node, q, self._old(qs), qs)
        try:
            out_shape = tuple(np.broadcast_shapes(a.shape, b.shape))
        except ValueError:
            raise NotUnderstood("operands do not broadcast") from None
        if out_shape not in (a.shape, b.shape):
            raise NotUnderstood("neither operand has the result's shape")
        sources = node.args[1:3] if cond is not None else node.args[:2]
        olds = [self._old(s) for s in sources]
        if not self.analysis and not all(isinstance(o, LabelTensor) for o in olds):
            raise self.conflict(node, "operands are not both tensors in the original")
        return self.unify(node, [(olds[0], a), (olds[1], b)], 0 if a.shape == out_shape else 1)

    def _where(self, node, cond: LabelTensor, a, b):
        """``torch.where(cond, a, b)`` where the condition is computed from the same channels element by element
        (Apertus' xIELU: ``where(x > 0, f(x), g(x))``): each element picks between its own channel's two values,
        so the condition and both branches are one elementwise op of their operands (tied channel by channel).
        A condition without channels (a mask) is not read this way: its values may differ along the channels."""
        if not cond.vary or self._is_fixed(cond):
            raise NotUnderstood("torch.where with a tensor condition")
        srcs = [(cond, node.args[0])] + [(t, s) for t, s in ((a, node.args[1]), (b, node.args[2]))
                                         if isinstance(t, LabelTensor)]
        if any(not isinstance(t, (LabelTensor, int, float, bool)) for t in (a, b)) \
                or any(t is not cond and (not t.vary or self._is_fixed(t)) for t, _ in srcs):
            raise NotUnderstood("torch.where with a tensor condition and a branch without channels")
        try:
            out_shape = tuple(np.broadcast_shapes(*(t.shape for t, _ in srcs)))
        except ValueError:
            raise NotUnderstood("operands of torch.where do not broadcast") from None
        full = next((k for k, (t, _) in enumerate(srcs) if tuple(t.shape) == out_shape), None)
        if full is None:
            raise NotUnderstood("no operand of torch.where has the result's shape")
        olds = [self._old(s) for _, s in srcs]
        if not self.analysis and not all(isinstance(o, LabelTensor) for o in olds):
            raise self.conflict(node, "operands are not all tensors in the original")
        return self.unify(node, [(o, t) for o, (t, _) in zip(olds, srcs)], full)

    def _uniform_operand(self, node, a, b):
        """``x + zeros(shape)`` (T5's cross-attention position bias: zeros of a literal head count): a constant
        holding one value everywhere acts like a scalar, whatever axes it spans.  Its literal shape follows the
        other operand's axes that grew (the family's code derives it from the config)."""
        for const, x, ci in ((b, a, 1), (a, b, 0)):
            if not (isinstance(const, torch.Tensor) and isinstance(x, LabelTensor)) or const.is_meta \
                    or const.numel() == 0 or not bool((const == const.reshape(-1)[0]).all()):
                continue
            src = node.args[ci]
            ref = self._old(node.args[1 - ci]) if not self.analysis else x
            if not isinstance(ref, LabelTensor) or len(const.shape) > ref.ndim:
                return None
            try:
                if tuple(np.broadcast_shapes(ref.shape, tuple(const.shape))) != ref.shape:
                    return None
            except ValueError:
                return None
            if not self.analysis and tuple(x.shape) != ref.shape and isinstance(src, fx.Node) and src.args:
                packed = isinstance(src.args[0], (list, tuple))  # zeros([1, 4, q, k]) or zeros(1, 4, q, k)
                literal = list(src.args[0]) if packed else list(src.args)
                if len(literal) == len(const.shape) and all(isinstance(d, int) for d in literal):
                    lead = x.ndim - len(const.shape)
                    shape = [x.shape[lead + i] if d == ref.shape[lead + i] and d != 1 else d
                             for i, d in enumerate(literal)]
                    new_args = (shape,) + tuple(src.args[1:]) if packed else tuple(shape)
                    self.arg_updates[src] = (new_args, src.kwargs)
            return self.elementwise(node, x)
        return None

    def _masked_fill(self, node, x: LabelTensor, args, kwargs):
        """``x.masked_fill(mask, value)`` with a number and a mask without channels (attention masks): every
        copy of a channel is filled where the original is, so x's channels are carried."""
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        if not isinstance(value, (int, float, bool)) or isinstance(mask, LabelTensor) and mask.vary:
            raise NotUnderstood("a masked fill by a tensor, or by a mask with channel structure")
        ref = x if self.analysis else self._old(node.args[0])
        try:
            if tuple(np.broadcast_shapes(ref.shape, tuple(mask.shape))) != tuple(ref.shape):
                raise NotUnderstood("its mask is larger than the tensor it fills")
        except ValueError:
            raise NotUnderstood("its mask does not broadcast") from None
        return self.elementwise(node, x)

    def _alibi(self, node, scores: LabelTensor) -> bool:
        """Whether ``node`` adds a constant with one value per head to attention scores (decided on the
        analysis run, remembered for the apply run)."""
        if self.analysis and any("(scores)" in sp.name for sp in self.table.spaces_of(scores.chans)):
            self.alibi_nodes.add(node)
        return node in self.alibi_nodes

    def _per_head_bias(self, node, x: LabelTensor, old_x, x_node=None):
        """MPT's ALiBi bias (one slope per head) added to the scores: computed for the model's head count, so
        the heads keep their number and grow head_dim (core/attention.keep_heads) where the scores' scale is
        understood; else they stay."""
        if self.analysis and node not in self.inner_alibi:
            follows = scores_scale_follows(x_node)
            if follows is not None and self.keep_heads(node, x, ALIBI_REASON, follows):
                self.inner_alibi.add(node)
        if node in self.inner_alibi:
            if not self.analysis and not same_labels(old_x, x):
                raise self.conflict(node, "ALiBi's per-head bias meets changed scores")
            return self.elementwise(node, x)
        if self.analysis:
            heads = [getattr(self, "scores_heads", {}).get(sp.id, []) for sp in self.table.spaces_of(x.chans)]
            self.constraints.freeze(np.concatenate([x.chans] + [np.asarray(h, np.int64) for h in heads]),
                                    f"{self.site(node)}: ALiBi: a per-head bias computed for the model's head count "
                                    "is added to the attention scores, so the heads keep their number")
        elif not same_labels(old_x, x):
            raise self.conflict(node, "ALiBi's per-head bias meets a changed head count")
        return self.elementwise(node, x)

    def _pad(self, node, x: LabelTensor, args, kwargs):
        """F.pad with constant padding: per channel on the one channel axis it leaves unpadded (NCHW or
        channels-last, as in Swin's window padding)."""
        pads = args[1] if len(args) > 1 else kwargs.get("pad")
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        ref = x if self.analysis else self._old(node.args[0])
        if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads) or len(ref.vary) > 1:
            raise NotUnderstood("padding amounts are computed, or channels lie on several axes")
        padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pads) if p}
        axis = ref.vary[0] if ref.vary else 1
        if axis in padded or mode != "constant" and axis == x.ndim - 1:
            raise NotUnderstood("it pads the channel axis")
        return self.pool(node, x, ref, self._shape(node), axis=axis)

    def _glu(self, node, x: LabelTensor, args, kwargs):
        """``F.glu(x, dim)``: ``a * sigmoid(b)`` of x's two halves along ``dim``, an elementwise product of two
        equal pieces (a chunk in two, then a gate): the halves widen alike, channel i with channel half + i."""
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        halves = [as_labels(t) for t in torch.from_numpy(x.a).chunk(2, dim)]
        if len(halves) != 2 or halves[0].shape != halves[1].shape:
            raise NotUnderstood("its gated axis does not split into two equal halves")
        self.equal_piece_ties(halves)
        old = self._old(node.args[0])
        olds = [as_labels(t) for t in torch.from_numpy(old.a).chunk(2, dim)] if not self.analysis else halves
        return self.unify(node, [(olds[0], halves[0]), (olds[1], halves[1])], 0)

    def _reduce(self, node, x: LabelTensor, args, kwargs):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None:
            return self.mix(node, x, "reduces over all axes")
        dims = [d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)]
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        mean = node.target in (torch.mean, "mean")
        return self.reduce(node, x, self._old(node.args[0]), dims, bool(keep), mean=mean,
                           mean_kind=mean_terms(node) if mean else None)

    def _extreme_along(self, node, x: LabelTensor, args, kwargs):
        """``torch.max(x, dim, keepdim)``: (values, indices) along one axis. Along a position axis the values are
        per channel (GPT-OSS's row maximum of the scores); the indices are positions, read by nobody here."""
        if not isinstance(x, LabelTensor):
            raise NotUnderstood("its input is not a tensor of the graph")
        if any(u.target is operator.getitem and u.args[1] != 0 for u in node.users) \
                or any(u.target is not operator.getitem for u in node.users):
            raise NotUnderstood("the positions of its extremes are read")
        dim = args[1] % x.ndim
        keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
        old_x = self._old(node.args[0])
        if self.mixes(x, old_x, {dim}):
            return self.mix(node, x, "a maximum over the channel axis")
        values = self.reduce(node, x, old_x, [dim], keep)
        return values, self._fixed(node, tuple(values.shape), 1)

    def _softmax(self, node, x: LabelTensor, args, kwargs):
        dim = args[0] if args else kwargs.get("dim")
        if dim is None:
            return self.mix(node, x, "softmax over an implicit axis")
        if self.mixes(x, self._old(node.args[0]), {dim % x.ndim}):
            return self.mix(node, x, self.softmax_reason(node))
        return self.elementwise(node, x)

    def _functional_norm(self, node, x: LabelTensor):
        """F.batch_norm / F.instance_norm reading module attributes (timm's BatchNormAct2d, ...):
        per-channel parameters, gathered into the modules that own them."""
        targets = []
        for i, name in enumerate(["running_mean", "running_var", "weight", "bias"], start=1):
            a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
            if a is None:
                continue
            if not (isinstance(a, fx.Node) and a.op == "get_attr") or self.attr_uses.get(a.target, 0) > 1:
                raise NotUnderstood("its parameters are not attributes used only here")
            targets.append(a.target)
        if label_leaves((node.args[5:], node.kwargs)):
            raise NotUnderstood("unexpected tensor arguments")
        params = {t: _param(operator.attrgetter(t)(self.gm)) for t in targets} if not self.analysis else {}
        out, new, match = self.carry(node, node.name, x, self._old(node.args[0]), params)
        for target, arr in new.items():
            owner, _, attr = target.rpartition(".")
            upd = self._update(owner)
            upd.tensors[attr] = arr
            upd.attrs["num_features"] = match.n_new  # set where the owning module has it
        return out

    # ------------------------------------------------------------ modules
    def _module(self, node, mod, args, kwargs):
        x = args[0] if args else None
        if isinstance(mod, nn.Embedding) and isinstance(x, torch.Tensor) and len(args) == 1 and not kwargs \
                and node.target not in self.shared:
            # indices held by the model (T5-style relative position buckets in a buffer): a constant
            x = self._fixed(node, tuple(x.shape), 5)
            return self._embedding(node, mod, x, x) if mod.max_norm is None else self.opaque(node, "max_norm")
        if not isinstance(x, LabelTensor) or len(label_leaves(args)) != 1 or kwargs:
            raise NotUnderstood("called with several tensors or keyword arguments")
        if node.target in self.shared:
            raise NotUnderstood("the module is called more than once or shares its weights (tied weights)")
        old_x = self._old(node.args[0])
        if isinstance(mod, ops.IDENTITY_MODULES):
            return x
        if isinstance(mod, ops.ELEMENTWISE_MODULES) or isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return self.elementwise(node, x)
        if isinstance(mod, nn.PReLU):
            return self._carry_module(node, mod, x, old_x, ["weight"], ["num_parameters"])
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._softmax(node, x, (mod.dim,), {})
        if isinstance(mod, ops.BN_MODULES):
            return self._carry_module(node, mod, x, old_x, ["weight", "bias", "running_mean", "running_var"],
                                      ["num_features"])
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm) + RMS_NORM_MODULES):
            return self._norm_module(node, mod, x, old_x)
        if isinstance(mod, nn.Embedding) and mod.max_norm is None:
            return self._embedding(node, mod, x, old_x)
        if isinstance(mod, ops.MIX_MODULES):
            return self.mix(node, x, f"{type(mod).__name__} normalizes across channels")
        if isinstance(mod, ops.POOL_MODULES):
            return self.pool(node, x, old_x, self._shape(node))
        if isinstance(mod, ops.MOVE_MODULES):
            return self._move(node, mod, (x,), {})
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.groups == 1:
                return self._produce(node, mod, x, old_x, in_axis=1, out_axis=1, w_in=1, w_out=0)
            if mod.groups == mod.in_channels == mod.out_channels:
                return self._depthwise(node, mod, x, old_x)
            return self._grouped(node, mod, x, old_x)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and mod.groups == 1:
            return self._produce(node, mod, x, old_x, in_axis=1, out_axis=1, w_in=0, w_out=1)
        if isinstance(mod, nn.Linear) and node.target in self.tied_heads:
            return self._tied_head(node, mod, x, old_x)
        if isinstance(mod, nn.Linear):
            return self._produce(node, mod, x, old_x, in_axis=-1, out_axis=-1, w_in=1, w_out=0)
        raise NotUnderstood("this module type is not understood by the channel analysis")

    def _carry_module(self, node, mod, x, old_x, names, size_attrs):
        params = {} if self.analysis else {n: _param(t) for n in names
                                           if isinstance(t := getattr(mod, n, None), torch.Tensor)}
        out, new, match = self.carry(node, node.target, x, old_x, params)
        if match is not None:
            upd = self._update(node.target)
            upd.tensors.update(new)
            upd.attrs.update({a: match.n_new for a in size_attrs})
        return out

    def _produce(self, node, mod, x, old_x, *, in_axis, out_axis, w_in, w_out):
        out, w, mapping = self.produce(node, node.target, x, old_x, _param(mod.weight), in_axis=in_axis,
                                       out_axis=out_axis, w_in=w_in, w_out=w_out, shape=self._shape(node))
        if w is not None:
            upd = self._update(node.target)
            upd.tensors["weight"] = w
            if getattr(mod, "bias", None) is not None:
                upd.tensors["bias"] = ar.gather_fill(_param(mod.bias), 0, mapping, self.fill_kind_of(node))
            n_in, n_out = x.shape[in_axis], len(mapping)
            if isinstance(mod, nn.Linear):
                upd.attrs.update(in_features=n_in, out_features=n_out)
            else:
                upd.attrs.update(in_channels=n_in, out_channels=n_out)
        return out

    def _depthwise(self, node, mod, x, old_x):
        params = {} if self.analysis else {"weight": _param(mod.weight),
                                           "bias": _param(mod.bias) if mod.bias is not None else None}
        out, new, match = self.depthwise(node, node.target, x, old_x, params, self._shape(node))
        if match is not None:
            upd = self._update(node.target)
            upd.tensors.update(new)
            upd.attrs.update(in_channels=match.n_new, out_channels=match.n_new, groups=match.n_new)
        return out

    def _grouped(self, node, mod, x, old_x):
        out, w, mapping = self.grouped(node, node.target, x, old_x, _param(mod.weight), mod.groups,
                                       self._shape(node))
        if w is not None:
            upd = self._update(node.target)
            upd.tensors["weight"] = w
            if mod.bias is not None:
                upd.tensors["bias"] = ar.gather(_param(mod.bias), 0, mapping)
            upd.attrs.update(in_channels=x.shape[1], out_channels=len(mapping))
        return out
