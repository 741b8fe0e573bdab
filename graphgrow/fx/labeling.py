"""Label propagation over a torch.fx graph (the fx adapter of the core analysis).

:class:`LabelRun` walks the graph once with int64 label tensors in place of
activations (see :mod:`graphgrow.core.labels`).

* In *analysis* mode (no plan) it creates a :class:`ChannelSpace` per
  producer, records ties (operands of add/mul, groups of grouped convs,
  chunks, view blocks) and freezes the channels that reach outputs, mixing
  ops or ops it does not understand.
* In *apply* mode (with a :class:`WidenPlan`) it propagates the widened
  configuration, matches every reading site against the analysis run and
  computes the new weights with :mod:`graphgrow.core.arithmetic`.  Any
  site that does not reproduce the original content raises
  :class:`Conflict`; the caller freezes the channels involved and retries.

Ops are classified into the relations of GROWTH.md §2; data-movement ops
are executed on the labels, so their index maps are learned, not guessed.
Anything unknown is *opaque*: its input channels freeze.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from ..core import arithmetic as ar
from ..core.labels import LabelOverflow, channel_labels, channel_of, channel_sequence, element_labels, resalt, varying_axes
from ..core.plan import WidenPlan
from ..core.provenance import Mismatch, RowMatch, match_rows
from ..core.growth import Conflict
from ..core.sites import GrowOptions as RunOptions
from ..core import sites
from ..errors import GraphGrowError


class TensorMeta:
    """Shape and dtype of a tensor of the original run (a pytree leaf, unlike a namedtuple)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = dtype


class L:
    """A label tensor standing in for an activation (kept distinct from real tensors)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def np(self) -> np.ndarray:
        return self.t.numpy()

    @property
    def shape(self):
        return tuple(self.t.shape)


# ---------------------------------------------------------------- op tables
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_MIX_MODULES = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)

_ELEMENTWISE_FUNCS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus,
    F.softsign, F.logsigmoid, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    operator.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.sin, torch.cos, torch.nn.functional.hardshrink,
    torch.reciprocal, torch.sign, torch.floor, torch.ceil, torch.round,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "erf", "square", "reciprocal", "hardswish",
    "sign", "floor", "ceil", "round",
}
_IDENTITY_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                   torch.clone}
_IDENTITY_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
                     "cpu", "cuda", "requires_grad_"}
_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                 torch.minimum, torch.max, torch.min, operator.pow, torch.pow, torch.true_divide,
                 torch.subtract, torch.multiply}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
                   "true_divide"}
_MOVE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               torch.cat, torch.concat, torch.concatenate, torch.stack, torch.chunk, torch.split, torch.movedim,
               torch.swapaxes, torch.t, torch.unflatten, torch.channel_shuffle, F.pixel_shuffle,
               F.pixel_unshuffle, torch.narrow, torch.unbind}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
                 "movedim", "swapaxes", "t", "unflatten", "expand", "expand_as", "view_as", "reshape_as",
                 "narrow", "unbind", "repeat"}
_SPLITTING_MOVES = {"view", "reshape", "unflatten", torch.reshape, torch.unflatten}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_POOL_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
               F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
               F.interpolate, F.upsample, torch.nn.functional.pad}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
# functions of other libraries known to act the same on every channel, by qualified name
# (torchvision's stochastic depth drops whole samples, never single channels)
_ELEMENTWISE_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth"}
_NORM_FUNCS = {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize, F.rms_norm} if hasattr(F, "rms_norm") \
    else {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}


def _fname(target) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' at node '{node.name}'"
    return f"function '{_fname(node.target)}' at node '{node.name}'"


@dataclass
class ModuleUpdate:
    tensors: dict = field(default_factory=dict)  # name -> np.ndarray
    attrs: dict = field(default_factory=dict)


class LabelRun(sites.LabelRunState):
    def __init__(self, gm: fx.GraphModule, meta: dict, *, plan: WidenPlan | None = None,
                 analysis: "LabelRun | None" = None, options: RunOptions | None = None):
        super().__init__(plan=plan, analysis=analysis, options=options)
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.meta = meta  # node -> recorded real value / TensorMetadata from the original run
        self.updates: dict = {}  # module name -> ModuleUpdate
        self._attr_uses: dict = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self._attr_uses[n.target] = self._attr_uses.get(n.target, 0) + len(n.users)
        self.arg_updates: dict = {}  # node -> (args, kwargs)
        self.salts = {n: i + 1 for i, n in enumerate(gm.graph.nodes)}
        calls: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.shared = {k for k, v in calls.items() if v > 1 and any(True for _ in self.modules[k].parameters())}
        # tied weights: one Parameter held by several modules must stay one tensor
        owners: dict = {}
        for name, mod in self.modules.items():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(name)
        for names in owners.values():
            if len(names) > 1:
                self.shared |= names

    # ------------------------------------------------------------ helpers
    def _old_np(self, arg):
        v = self.old[arg] if isinstance(arg, fx.Node) else None
        return v.np if isinstance(v, L) else None

    def _fixed(self, node, shape, k=0):
        key = (node, k)
        if key not in self.fixed_space:
            self.fixed_space[key] = self.table.new_space(f"{node.name}#{k}", 1, "fixed")
        sp = self.fixed_space[key]
        return L(torch.from_numpy(element_labels(shape, sp.base, self.salts[node] * 8 + k)))

    def _label_inputs(self, node):
        vals = []
        for a in node.all_input_nodes:
            v = self.env.get(a)
            for x in tree_flatten(v)[0]:
                if isinstance(x, L):
                    vals.append((a, x))
        return vals

    def _conflict(self, node, reason, extra_nodes=()):
        chans = []
        for a in list(node.all_input_nodes) + list(extra_nodes):
            for x in tree_flatten(self.old.get(a))[0]:
                if isinstance(x, L):
                    chans.append(np.unique(channel_of(x.np)))
        chans = np.unique(np.concatenate(chans)) if chans else np.zeros(0, np.int64)
        return Conflict(node, chans, f"{describe(node, self.modules)}: {reason}")

    def _match(self, node, arg, new: L, axis: int, what="input") -> RowMatch | None:
        """Match new rows to old; None when the input is unchanged."""
        old = self.old[arg]
        if isinstance(old, (list, tuple)):
            raise self._conflict(node, "unexpected tuple input")
        if old.shape == new.shape and torch.equal(old.t, new.t):
            return None
        try:
            return match_rows(old.np, new.np, axis, what)
        except Mismatch as exc:
            raise self._conflict(node, str(exc)) from None

    def _freeze_inputs(self, node, reason):
        for _, x in self._label_inputs(node):
            self.constraints.freeze(np.unique(channel_of(x.np)), reason)

    def _require_unchanged(self, node):
        for a, x in self._label_inputs(node):
            o = self.old.get(a)
            olds = [v for v in tree_flatten(o)[0] if isinstance(v, L)]
            news = [v for v in tree_flatten(self.env.get(a))[0] if isinstance(v, L)]
            if len(olds) != len(news) or any(p.shape != q.shape or not torch.equal(p.t, q.t) for p, q in zip(olds, news)):
                raise self._conflict(node, "its input changed but the op must keep it as it is")

    def _opaque(self, node, reason):
        if self.analysis:
            self.opaque_nodes.add(node)
            self._freeze_inputs(node, f"{describe(node, self.modules)}: {reason}")
            return self._labels_from_meta(node)
        self._require_unchanged(node)
        return self.old[node]

    def _labels_from_meta(self, node):
        m = self.meta.get(node)
        counter = [0]

        def conv(x):
            if isinstance(x, (torch.Tensor, TensorMeta)):
                k = counter[0]
                counter[0] += 1
                return self._fixed(node, tuple(x.shape), k)
            return x

        return tree_map(conv, m)

    def _meta_shape(self, node):
        m = self.meta.get(node)
        return tuple(m.shape) if m is not None and hasattr(m, "shape") else None

    def _new_shape(self, node, axis, size):
        shape = list(self._meta_shape(node))
        shape[axis] = size
        return tuple(shape)

    # ------------------------------------------------------------ driver
    def run(self, inputs):
        it = iter(inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                try:
                    x = next(it)
                except StopIteration:
                    x = node.args[0] if node.args else None
                self.env[node] = self._fixed(node, tuple(x.shape)) if isinstance(x, torch.Tensor) else x
            elif node.op == "get_attr":
                real = operator.attrgetter(node.target)(self.gm)
                if isinstance(real, torch.Tensor) and (real.dtype == torch.bool or not real.is_floating_point()):
                    # index tables and masks act on data as they are: keep their real values
                    self.env[node] = real.detach().cpu()
                elif isinstance(real, torch.Tensor):
                    self.env[node] = self._fixed(node, tuple(real.shape))
                else:
                    self.env[node] = real
            elif node.op == "output":
                self._output(node)
            else:
                self.env[node] = self._call_guarded(node)
        return self

    def _call_guarded(self, node):
        """An op that fails on labels is an op the analysis does not understand: fail closed."""
        if not self.analysis and node in self.opaque_nodes:
            return self._opaque(node, "not understood")
        try:
            return self._call(node)
        except (Conflict, GraphGrowError, LabelOverflow):
            raise
        except Exception as exc:  # noqa: BLE001
            msg = f"could not be analysed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
            if self.analysis:
                return self._opaque(node, msg)
            raise self._conflict(node, msg) from None

    def _output(self, node):
        outs = [x for x in tree_flatten(self._args(node)[0][0])[0] if isinstance(x, L)]
        if self.analysis:
            for x in outs:
                self.constraints.freeze(np.unique(channel_of(x.np)), "reaches a model output")
        else:
            olds = [x for x in tree_flatten(self._old_args(node)[0])[0] if isinstance(x, L)]
            for o, n in zip(olds, outs):
                if o.shape != n.shape or not torch.equal(o.t, n.t):
                    raise self._conflict(node, "a model output changed")

    def _args(self, node):
        return fx.node.map_arg(node.args, lambda n: self.env[n]), fx.node.map_arg(node.kwargs, lambda n: self.env[n])

    def _old_args(self, node):
        return fx.node.map_arg(node.args, lambda n: self.old[n]), None

    def _call(self, node):
        args, kwargs = self._args(node)
        if node.op == "call_module":
            return self._module(node, self.modules[node.target], args, kwargs)
        target = node.target
        first = args[0] if args else None
        if not any(isinstance(x, L) for x in tree_flatten((args, kwargs))[0]):
            # pure python / shape arithmetic
            if node.op == "call_method":
                return getattr(first, target)(*args[1:], **kwargs)
            return target(*args, **kwargs)
        if node.op == "call_method":
            if target in _SHAPE_METHODS:
                return getattr(first.t, target)(*args[1:], **kwargs)
            if target in _IDENTITY_METHODS:
                return first
            if target in _ELEMENTWISE_METHODS:
                return self._elementwise(node, first)
            if target in _BINARY_METHODS:
                return self._binary(node, args, kwargs)
            if target in _MOVE_METHODS:
                return self._move(node, target, args, kwargs)
            if target in _REDUCE_METHODS:
                return self._reduce(node, first, args, kwargs)
            if target in ("softmax", "log_softmax"):
                return self._softmax(node, first, args, kwargs)
            return self._opaque(node, "this method is not understood by the channel analysis")
        if target is getattr and isinstance(first, L):
            if args[1] in ("shape",):
                return first.t.shape
            if args[1] == "dtype":
                return self.meta[node.args[0]].dtype
            if args[1] in ("device",):
                return first.t.device
            if args[1] in ("ndim",):
                return first.t.ndim
            return self._opaque(node, f"attribute '{args[1]}' is not understood")
        if target is operator.getitem:
            if isinstance(first, L):
                return self._getitem(node, first, args[1])
            return first[args[1]]
        if target in _IDENTITY_FUNCS:
            return first
        if _fname(target) in _ELEMENTWISE_BY_NAME and isinstance(first, L):
            if not any(isinstance(x, L) for x in tree_flatten((args[1:], kwargs))[0]):
                return self._elementwise(node, first)
        if target in _ELEMENTWISE_FUNCS:
            if isinstance(first, L) and not any(isinstance(x, L) for x in tree_flatten((args[1:], kwargs))[0]):
                return self._elementwise(node, first)
        if target in _BINARY_FUNCS:
            if target in (torch.max, torch.min) and (len(args) < 2 or not isinstance(args[1], (L, int, float))):
                return self._reduce(node, first, args, kwargs)
            return self._binary(node, args, kwargs)
        if target in _MOVE_FUNCS:
            return self._move(node, target, args, kwargs)
        if target in _REDUCE_FUNCS:
            return self._reduce(node, first, args, kwargs)
        if target in _POOL_FUNCS:
            return self._pool(node, first)
        if target in _SOFTMAX_FUNCS:
            return self._softmax(node, first, args[1:], kwargs)
        if target in (F.batch_norm, F.instance_norm) and isinstance(first, L):
            return self._functional_norm(node, first)
        if target in _NORM_FUNCS and isinstance(first, L):
            return self._norm_function(node, target, first, args, kwargs)
        if target is torch.where and len(args) == 3:
            return self._binary(node, (args[1], args[2]), {}, cond=args[0])
        return self._opaque(node, "this function is not understood by the channel analysis")

    # ------------------------------------------------------------ relations
    def _elementwise(self, node, x: L):
        return L(torch.from_numpy(resalt(x.np, self.salts[node])))

    def _is_scalar_like(self, a: L, other: L) -> bool:
        """A constant/parameter operand that does not align with the other's channels."""
        chans = np.unique(channel_of(a.np))
        if len(chans) != 1 or self.table.spaces_of(chans)[0].kind != "fixed":
            return False
        if len(self.table.spaces_of(chans)[0].producers):
            return False
        va = varying_axes(other.np)
        shape = (1,) * (other.t.ndim - a.t.ndim) + a.shape
        return all(shape[ax] == 1 for ax in va) if len(shape) == other.t.ndim else False

    def _binary(self, node, args, kwargs, cond=None):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if cond is not None and isinstance(cond, L):
            return self._opaque(node, "torch.where with a tensor condition")
        if not isinstance(a, L) or not isinstance(b, L):
            other = b if isinstance(a, L) else a
            if not isinstance(other, (int, float, bool)):
                return self._opaque(node, f"operand of type {type(other).__name__} is not understood")
            return self._elementwise(node, a if isinstance(a, L) else b)
        for p, q in ((a, b), (b, a)):
            if self._is_scalar_like(p, q):
                return self._elementwise(node, q)
        try:
            out_shape = torch.broadcast_shapes(a.t.shape, b.t.shape)
        except RuntimeError:
            return self._opaque(node, "operands do not broadcast")
        full = a if tuple(a.t.shape) == tuple(out_shape) else b if tuple(b.t.shape) == tuple(out_shape) else None
        if full is None:
            return self._opaque(node, "neither operand has the result's shape")
        if self.analysis:
            ca, cb = np.broadcast_arrays(channel_of(a.np), channel_of(b.np))
            self.constraints.tie(ca, cb)
        else:
            self._check_aligned(node, args, a, b, full is a)
        return self._elementwise(node, full)

    def _check_aligned(self, node, args, a: L, b: L, a_full: bool):
        """Both operands must read the same original channel at every new position."""
        olds = [self.old[n] if isinstance(n, fx.Node) else None for n in node.args[:2]]
        if node.target is torch.where:
            olds = [self.old[n] for n in node.args[1:3]]
        if not all(isinstance(o, L) for o in olds):
            raise self._conflict(node, "operands are not both tensors in the original")
        try:
            sites.check_aligned(olds[0].np, olds[1].np, a.np, b.np, (olds[0] if a_full else olds[1]).np)
        except Mismatch as exc:
            raise self._conflict(node, f"its operands no longer align channel by channel ({exc})") from None

    def _reduce(self, node, x: L, args, kwargs):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None:
            return self._mix(node, x, "reduces over all axes")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % x.t.ndim for d in dims]
        va = varying_axes(self.old[node.args[0]].np) if not self.analysis else varying_axes(x.np)
        if set(dims) & set(va):
            return self._mix(node, x, "reduces over the channel axis")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        t = x.t
        for d in sorted(dims, reverse=True):
            t = t.narrow(d, 0, 1)
            if not keep:
                t = t.squeeze(d)
        return self._elementwise(node, L(t.contiguous()))

    def _mix(self, node, x: L, why):
        if self.analysis:
            self.constraints.freeze(np.unique(channel_of(x.np)), f"{describe(node, self.modules)}: {why} (mixes channels)")
            return self._labels_from_meta(node)
        self._require_unchanged(node)
        return self.old[node]

    def _softmax(self, node, x, args, kwargs):
        dim = args[0] if args else kwargs.get("dim")
        if dim is None:
            return self._mix(node, x, "softmax over an implicit axis")
        va = varying_axes(x.np)
        if dim % x.t.ndim in va:
            return self._mix(node, x, "softmax over the channel axis")
        return self._elementwise(node, x)

    def _functional_norm(self, node, x: L):
        """F.batch_norm / F.instance_norm reading module attributes (timm's BatchNormAct2d, ...):
        per-channel parameters, gathered into the modules that own them."""
        sig = ["input", "running_mean", "running_var", "weight", "bias"]
        params = []
        for i, name in enumerate(sig[1:], start=1):
            a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
            if a is None:
                continue
            if not (isinstance(a, fx.Node) and a.op == "get_attr") or self._attr_uses.get(a.target, 0) > 1:
                return self._opaque(node, "its parameters are not attributes used only here")
            params.append(a.target)
        if any(isinstance(v, L) for v in tree_flatten((node.args[5:], node.kwargs))[0]):
            return self._opaque(node, "unexpected tensor arguments")
        self._note_roles(x, "carrier", node.name)
        if not self.analysis:
            match = self._match(node, node.args[0], x, 1)
            if match is not None:
                if not match.unique_old:
                    raise self._conflict(node, "per-channel parameters on duplicated channels")
                for target in params:
                    owner, _, attr = target.rpartition(".")
                    t = operator.attrgetter(target)(self.gm)
                    upd = self.updates.setdefault(owner, ModuleUpdate())
                    upd.tensors[attr] = ar.gather(self._np(t), 0, match.source())
                    upd.attrs["num_features"] = match.n_new  # set where the owning module has it
        return self._elementwise(node, x)

    def _norm_function(self, node, target, x: L, args, kwargs):
        """Functional norms: exact only if they do not normalize across channels."""
        params = [v for v in tree_flatten((args[1:], kwargs))[0] if isinstance(v, L)]
        if target is F.layer_norm and not params:
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            nd = len(shape) if isinstance(shape, (list, tuple)) else 1
            va = varying_axes((self.old[node.args[0]] if not self.analysis else x).np)
            if not any(ax >= x.t.ndim - nd for ax in va):
                return self._elementwise(node, x)
        return self._mix(node, x, f"{_fname(target).split('.')[-1]} normalizes across channels or has weights")

    @staticmethod
    def _channel_ids(x: L, axis: int = 1):
        return sites.channel_ids(x.np, axis)

    def _pool(self, node, x: L):
        """Per-channel op that may change spatial shape (pooling, interpolation, padding)."""
        seq = self._channel_ids(x)
        shape = self._meta_shape(node)
        if seq is None or shape is None or len(shape) != x.t.ndim or shape[1] != (
            self.old[node.args[0]].shape[1] if not self.analysis else x.shape[1]
        ):
            return self._opaque(node, "its input channels are not on axis 1, or one channel id holds different contents")
        out_shape = (shape[0], x.shape[1]) + tuple(shape[2:])
        return L(torch.from_numpy(channel_labels(out_shape, 1, seq, self.salts[node])))

    # ------------------------------------------------------------ data movement
    def _move(self, node, target, args, kwargs):
        fn = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)) if isinstance(target, str) else target
        if not self.analysis:
            args, kwargs = self._rewrite_move_args(node, target, args, kwargs)
        try:
            out = fn(*tree_map(lambda v: v.t if isinstance(v, L) else v, args),
                     **tree_map(lambda v: v.t if isinstance(v, L) else v, kwargs))
        except Exception as exc:  # noqa: BLE001 - a failing move in the new configuration is a conflict
            if self.analysis:
                return self._opaque(node, f"could not be replayed on channel labels ({exc})")
            raise self._conflict(node, f"cannot be replayed on the widened tensors ({str(exc).splitlines()[0]})") from None
        out = tree_map(lambda v: L(v.contiguous()) if isinstance(v, torch.Tensor) else v, out)
        if self.analysis:
            self._move_ties(node, target, args, out)
        return out

    def _move_ties(self, node, target, args, out):
        outs = [v for v in tree_flatten(out)[0] if isinstance(v, L)]
        if target in _SPLITTING_MOVES and len(outs) == 1 and isinstance(args[0], L):
            for a, b in sites.split_axis_ties(args[0].np, outs[0].np):
                self.constraints.tie(a, b)
        elif target in ("chunk", "split", torch.chunk, torch.split, "unbind", torch.unbind) and len(outs) > 1:
            shapes = {o.shape for o in outs}
            if len(shapes) == 1:
                for o in outs[1:]:
                    self.constraints.tie(channel_of(outs[0].np), channel_of(o.np))

    def _rewrite_move_args(self, node, target, args, kwargs):
        """Rewrite channel constants written as literals (view sizes, split sizes)."""
        src_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src_node is None or not isinstance(self.old.get(src_node), L) or not isinstance(args[0], L):
            return args, kwargs
        old_in, new_in = self.old[src_node], args[0]
        if old_in.shape == new_in.shape and torch.equal(old_in.t, new_in.t):
            return args, kwargs
        changed = False
        new_args = list(args)
        if target in ("view", "reshape", torch.reshape):
            old_out = self.old[node]
            va = varying_axes(old_out.np)
            raw = list(node.args[1:]) if target != torch.reshape else list(node.args[1])
            if len(raw) == 1 and isinstance(raw[0], (list, tuple)):
                raw = list(raw[0])
            vals = list(args[1:]) if target != torch.reshape else list(args[1])
            if len(vals) == 1 and isinstance(vals[0], (list, tuple)):
                vals = list(vals[0])
            try:
                dims = sites.rescale_shape([None if isinstance(r, fx.Node) else r for r in raw], va,
                                           old_in.t.numel(), new_in.t.numel())
            except Mismatch as exc:
                raise self._conflict(node, str(exc)) from None
            if dims is not None:
                vals = [v if d is None else d for v, d in zip(vals, dims)]
                changed = True
                if target == torch.reshape:
                    new_args = [args[0], tuple(vals)]
                else:
                    new_args = [args[0]] + vals
        elif target in ("split", torch.split):
            size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
                bounds = np.cumsum([0] + list(size))
                src = self._axis_source(node, old_in, new_in, dim)
                nb = [self._remap_bound(node, src, int(b)) for b in bounds]
                new_sizes = [int(nb[i + 1] - nb[i]) for i in range(len(size))]
                if new_sizes != list(size):
                    new_args[1] = new_sizes
                    changed = True
            elif isinstance(size, int):
                old_len, new_len = old_in.shape[dim], new_in.shape[dim]
                if old_len != new_len:
                    pieces = -(-old_len // size)
                    if old_len % size or new_len % pieces:
                        raise self._conflict(node, "its split size cannot follow the new width")
                    new_args[1] = new_len // pieces
                    changed = True
        if changed:
            self.arg_updates[node] = (tuple(self._to_graph_args(node, new_args)), node.kwargs)
        return tuple(new_args), kwargs

    def _to_graph_args(self, node, new_vals):
        out = []
        for orig, v in zip(node.args, new_vals):
            out.append(orig if isinstance(orig, fx.Node) else v)
        return out

    def _axis_source(self, node, old_in: L, new_in: L, dim) -> np.ndarray:
        try:
            return match_rows(old_in.np, new_in.np, dim, "sliced input").source()
        except Mismatch as exc:
            raise self._conflict(node, str(exc)) from None

    def _remap_bound(self, node, src: np.ndarray, b: int) -> int:
        try:
            return sites.remap_bound(src, b)
        except Mismatch as exc:
            raise self._conflict(node, str(exc)) from None

    def _getitem(self, node, x: L, idx):
        if not self.analysis:
            idx = self._rewrite_index(node, x, idx)
        try:
            out = x.t[tree_map(lambda v: v.t if isinstance(v, L) else v, idx)]
        except Exception as exc:  # noqa: BLE001
            if self.analysis:
                return self._opaque(node, f"indexing could not be replayed ({exc})")
            raise self._conflict(node, "indexing cannot be replayed on the widened tensor") from None
        return L(out.contiguous()) if isinstance(out, torch.Tensor) else out

    def _rewrite_index(self, node, x: L, idx):
        old_in = self.old[node.args[0]]
        if old_in.shape == x.shape and torch.equal(old_in.t, x.t):
            return idx
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, (L, torch.Tensor, list)) for i in items):
            raise self._conflict(node, "advanced indexing on a widened tensor")
        # tensor axis addressed by each index item
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        axis, out = 0, []
        changed = False
        for i in items:
            if i is Ellipsis:
                axis += x.t.ndim - n_real
                out.append(i)
                continue
            if i is None:
                out.append(i)
                continue
            if old_in.shape[axis] != x.shape[axis] and not (isinstance(i, slice) and i == slice(None)):
                src = self._axis_source(node, old_in, x, axis)
                if isinstance(i, int):
                    hits = np.nonzero(src == (i % old_in.shape[axis]))[0]
                    if len(hits) == 0:
                        raise self._conflict(node, "an indexed channel is missing")
                    i = int(hits[0])
                elif isinstance(i, slice) and i.step in (None, 1):
                    start, stop, _ = i.indices(old_in.shape[axis])
                    i = slice(self._remap_bound(node, src, start), self._remap_bound(node, src, stop))
                else:
                    raise self._conflict(node, "strided slicing of a widened axis")
                changed = True
            out.append(i)
            axis += 1
        if changed:
            new_idx = tuple(out) if isinstance(idx, tuple) else out[0]
            self.arg_updates[node] = ((node.args[0], new_idx), node.kwargs)
            return new_idx
        return idx

    # ------------------------------------------------------------ modules
    def _module(self, node, mod, args, kwargs):
        x = args[0] if args else None
        if not isinstance(x, L) or len([a for a in args if isinstance(a, L)]) != 1 or kwargs:
            return self._opaque(node, "called with several tensors or keyword arguments")
        if node.target in self.shared:
            return self._opaque(node, "the module is called more than once or shares its weights (tied weights)")
        if isinstance(mod, _IDENTITY_MODULES):
            return x
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return self._elementwise(node, x)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                return self._elementwise(node, x)
            return self._carry_params(node, mod, x, ["weight"], {"num_parameters": None})
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._softmax(node, x, (mod.dim,), {})
        if isinstance(mod, _BN_MODULES):
            return self._carry_params(node, mod, x, ["weight", "bias", "running_mean", "running_var"],
                                      {"num_features": None})
        if isinstance(mod, nn.LayerNorm):
            nd = len(mod.normalized_shape)
            va = varying_axes((self.old[node.args[0]] if not self.analysis else x).np)
            if any(ax >= x.t.ndim - nd for ax in va):
                return self._mix(node, x, "LayerNorm normalizes over the channel axis")
            return self._elementwise(node, x)
        if isinstance(mod, _MIX_MODULES):
            return self._mix(node, x, f"{type(mod).__name__} normalizes across channels")
        if isinstance(mod, _POOL_MODULES):
            return self._pool(node, x)
        if isinstance(mod, _MOVE_MODULES):
            return self._move(node, lambda t: mod(t), (x,), {})
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.groups == 1:
                return self._produce(node, mod, x, in_axis=1, out_axis=1, w_in=1, w_out=0)
            if mod.groups == mod.in_channels == mod.out_channels:
                return self._depthwise(node, mod, x)
            return self._grouped(node, mod, x)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and mod.groups == 1:
            return self._produce(node, mod, x, in_axis=1, out_axis=1, w_in=0, w_out=1)
        if isinstance(mod, nn.Linear):
            return self._produce(node, mod, x, in_axis=-1, out_axis=-1, w_in=1, w_out=0)
        return self._opaque(node, "this module type is not understood by the channel analysis")

    def _update(self, node) -> ModuleUpdate:
        return self.updates.setdefault(node.target, ModuleUpdate())

    def _out_space(self, node, mod, size):
        if self.analysis:
            sp = self.table.new_space(node.target, size, "produced")
            sp.add_role("producer", node.target)
            self.node_space[node] = sp
        return self.node_space[node]

    def _note_roles(self, x: L, role, name):
        if self.analysis:
            for sp in self.table.spaces_of(np.unique(channel_of(x.np))):
                sp.add_role(role, name)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.numpy()

    def _produce(self, node, mod, x: L, *, in_axis, out_axis, w_in, w_out):
        weight = mod.weight
        n_out = weight.shape[w_out]
        self._note_roles(x, "consumer", node.target)
        space = self._out_space(node, mod, n_out)
        shape = self._meta_shape(node)
        if self.analysis:
            return L(torch.from_numpy(channel_labels(shape, out_axis, space.chan_ids, self.salts[node])))
        match = self._match(node, node.args[0], x, in_axis)
        mapping = self.plan.mapping(space)
        new_out = len(mapping)
        if match is not None or new_out != n_out:
            upd = self._update(node)
            w = sites.produce_weights(self._np(weight), w_in, w_out, match, mapping, self.options, self.rng)
            upd.tensors["weight"] = w
            if getattr(mod, "bias", None) is not None:
                upd.tensors["bias"] = ar.gather(self._np(mod.bias), 0, mapping)
            n_in = x.shape[in_axis]
            if isinstance(mod, nn.Linear):
                upd.attrs.update(in_features=n_in, out_features=new_out)
            else:
                upd.attrs.update(in_channels=n_in, out_channels=new_out)
        out_shape = self._new_shape(node, out_axis, new_out)
        return L(torch.from_numpy(channel_labels(out_shape, out_axis, self.plan.new_chan_ids(space), self.salts[node])))

    def _carry_params(self, node, mod, x: L, names, attrs):
        self._note_roles(x, "carrier", node.target)
        if self.analysis:
            return self._elementwise(node, x)
        match = self._match(node, node.args[0], x, 1)
        if match is not None:
            if not match.unique_old:
                raise self._conflict(node, "per-channel parameters on duplicated channels")
            src = match.source()
            upd = self._update(node)
            for name in names:
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == match.n_old:
                    upd.tensors[name] = ar.gather(self._np(t), 0, src)
            for a in attrs:
                upd.attrs[a] = match.n_new
        return self._elementwise(node, x)

    def _depthwise(self, node, mod, x: L):
        self._note_roles(x, "carrier", node.target)
        seq = self._channel_ids(x)
        shape = self._meta_shape(node)
        if seq is None:
            return self._opaque(node, "channels of a depthwise conv input are not on axis 1")
        if not self.analysis:
            match = self._match(node, node.args[0], x, 1)
            if match is not None:
                if not match.unique_old:
                    raise self._conflict(node, "depthwise filters on duplicated channels")
                src = match.source()
                upd = self._update(node)
                upd.tensors["weight"] = ar.gather(self._np(mod.weight), 0, src)
                if mod.bias is not None:
                    upd.tensors["bias"] = ar.gather(self._np(mod.bias), 0, src)
                upd.attrs.update(in_channels=match.n_new, out_channels=match.n_new, groups=match.n_new)
        out_shape = (shape[0], len(seq)) + tuple(shape[2:])
        return L(torch.from_numpy(channel_labels(out_shape, 1, seq, self.salts[node])))

    def _grouped(self, node, mod, x: L):
        G = mod.groups
        self._note_roles(x, "consumer", node.target)
        seq = channel_sequence(x.np, 1)
        if seq is None:
            return self._opaque(node, "channels of a grouped conv input are not on axis 1")
        space = self._out_space(node, mod, mod.out_channels)
        shape = self._meta_shape(node)
        if self.analysis:
            self.constraints.tie_blocks(seq, G)
            self.constraints.tie_blocks(space.chan_ids, G)
            return L(torch.from_numpy(channel_labels(shape, 1, space.chan_ids, self.salts[node])))
        mapping = self.plan.mapping(space)
        old_x = self.old[node.args[0]]
        n_in_old, n_in_new = old_x.shape[1], x.shape[1]
        new_out = len(mapping)
        changed = n_in_new != n_in_old or new_out != mod.out_channels or not torch.equal(old_x.t, x.t)
        if changed:
            try:
                w = sites.grouped_weights(self._np(mod.weight), G, old_x.np, x.np, 1, mod.out_channels, mapping,
                                          self.options, self.rng)
            except Mismatch as exc:
                raise self._conflict(node, str(exc)) from None
            upd = self._update(node)
            upd.tensors["weight"] = w
            if mod.bias is not None:
                upd.tensors["bias"] = ar.gather(self._np(mod.bias), 0, mapping)
            upd.attrs.update(in_channels=n_in_new, out_channels=new_out)
        out_shape = self._new_shape(node, 1, new_out)
        return L(torch.from_numpy(channel_labels(out_shape, 1, self.plan.new_chan_ids(space), self.salts[node])))
