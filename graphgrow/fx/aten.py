"""ATen graphs (torch.export) lifted to the torch-level ops the fx analysis reads.

``torch.export`` captures models that symbolic tracing cannot (Hugging Face transformers: data-dependent
Python, pytree outputs, mask builders) as graphs of ATen operator overloads whose parameters are
``get_attr`` nodes named by their state_dict keys.  Each ATen op of :data:`LIFTED` has a torch-level twin
with the same semantics (``aten.linear`` is ``F.linear``, ``aten.view`` is ``Tensor.reshape``, ...);
:func:`lift_exported` rewrites the graph to those twins so the channel analysis has one op vocabulary,
drops the export's runtime assertions and pytree plumbing, and keeps every other ATen op as it is: one
the tables do not list is an op the analysis does not understand (its channels freeze), never a guess.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .aten_folds import fold_complex_rotary, fold_filled_empties

aten = torch.ops.aten
_INT64_MAX = 2 ** 63 - 1


def _slice(x, dim=0, start=None, end=None, step=1):
    # the export writes a full slice as [0:INT64_MAX]: the widening must see slice(None) (it keeps the whole axis)
    whole = (start in (None, 0)) and (end is None or end >= _INT64_MAX // 2) and step == 1
    return operator.getitem, (x, (slice(None),) * dim + (slice(None) if whole else slice(start, end, step),)), {}


def _select(x, dim, index):
    return operator.getitem, (x, (slice(None),) * dim + (index,)), {}


def _method(name):
    return lambda x, *args, **kwargs: (name, (x,) + args, kwargs)


def _function(fn, n_args=None):
    def lift(*args, **kwargs):
        return fn, args if n_args is None else args[:n_args], kwargs
    return lift


def _binary(op, tensor_op):
    def lift(a, b, alpha=1, **kwargs):
        if alpha != 1 or kwargs:
            return tensor_op, (a, b), dict(kwargs, **({"alpha": alpha} if alpha != 1 else {}))
        return op, (a, b), {}
    return lift


def _to(x, *args, **kwargs):
    dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    readers = [u for u in x.users if u.target not in _DROPPED] if isinstance(x, fx.Node) else []
    val = x.meta.get("val") if isinstance(x, fx.Node) and x.op == "get_attr" and len(readers) == 1 else None
    if dtype is not None and getattr(val, "dtype", None) == dtype \
            and all(u.target in _LINEAR for u in readers[0].users):
        return _identity, (x,), {}  # a weight cast to its own dtype for a linear map (a router's weight.float())
    return ("to", (x, dtype), {}) if dtype is not None else (_identity, (x,), {})


def _type_as(x, other):
    return "to", (x, other.meta["val"].dtype), {}


def _unflatten(x, dim, sizes):
    # a reshape with every other dim as captured (the literals view writes too): one rewrite rule for both
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return torch.unflatten, (x, dim, sizes), {}  # (a move still, its literals left as they are)
    shape = list(val.shape)
    d = dim % len(shape)
    return "reshape", (x, shape[:d] + list(sizes) + shape[d + 1:]), {}


def _identity(x):
    return x


def _dropout(x, p, train):
    return F.dropout, (x, p), {"training": train}


def _layer_norm(x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return F.layer_norm, (x, shape, weight, bias, eps), {}


def _rms_norm(x, shape, weight=None, eps=None):
    return F.rms_norm, (x, shape, weight, eps), {}


def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return F.embedding, (indices, weight), {}


def _gelu(x, approximate="none"):
    return F.gelu, (x,), {"approximate": approximate}


def _softmax(x, dim, half_to_float_or_dtype=None):
    return F.softmax, (x, dim), {}


def _conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.meta["val"].ndim]
    return fn, (x, weight, bias, stride, padding, dilation, groups), {}


def _batch_norm(x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    return F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps), {}


def _group_norm(x, groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return F.group_norm, (x, groups, weight, bias, eps), {}


def _pad(x, pad, mode="constant", value=None):
    return F.pad, (x, pad, mode, value), {}


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention, (q, k, v), kwargs


def _upsample_bilinear(x, output_size=None, align_corners=False, scale_factors=None):
    # (BEiT's relative position table is interpolated to the window it is read at, even at its own size)
    return F.interpolate, (x,), {"size": output_size, "scale_factor": scale_factors, "mode": "bilinear",
                                 "align_corners": align_corners}


def _roll(x, shifts, dims=()):
    return torch.roll, (x, shifts, dims), {}


def _addmm(bias, x, weight, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return aten.addmm.default, (bias, x, weight), {"beta": beta, "alpha": alpha}
    return torch.addmm, (bias, x, weight), {}


def _overloads(packet, *names):
    return [getattr(packet, n) for n in names if hasattr(packet, n)]


_LINEAR = set(_overloads(aten.linear, "default"))


def _table() -> dict:
    t: dict = {}

    def put(packets, lift):
        for p in packets:
            t[p] = lift

    put(_overloads(aten.linear, "default"), _function(F.linear))
    put(_overloads(aten.addmm, "default"), _addmm)
    put(_overloads(aten.embedding, "default"), _embedding)
    put(_overloads(aten.layer_norm, "default"), _layer_norm)
    put(_overloads(aten.rms_norm, "default"), _rms_norm)
    put(_overloads(aten.scaled_dot_product_attention, "default"), _sdpa)
    put(_overloads(aten.conv1d, "default") + _overloads(aten.conv2d, "default") + _overloads(aten.conv3d, "default"),
        _conv)
    # vision models' eval-mode batch norm, window padding (Swin) and pooled heads
    put(_overloads(aten.batch_norm, "default"), _batch_norm)
    put(_overloads(aten.pad, "default"), _pad)
    put(_overloads(aten.group_norm, "default"), _group_norm)
    put(_overloads(aten.upsample_bilinear2d, "vec"), _upsample_bilinear)
    put(_overloads(aten.roll, "default"), _roll)  # (Swin's shifted windows: a move along positions)
    put(_overloads(aten.glu, "default"), _function(F.glu))  # (Speech2Text's conv subsampler)
    for name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "max_pool1d", "max_pool2d",
                 "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d"):
        put(_overloads(getattr(aten, name), "default"), _function(getattr(F, name)))
    put(_overloads(aten.add, "Tensor", "Scalar"), _binary(operator.add, torch.add))
    put(_overloads(aten.sub, "Tensor", "Scalar"), _binary(operator.sub, torch.sub))
    put(_overloads(aten.mul, "Tensor", "Scalar"), _binary(operator.mul, torch.mul))
    put(_overloads(aten.div, "Tensor", "Scalar"), _binary(operator.truediv, torch.div))
    put(_overloads(aten.pow, "Tensor_Scalar", "Tensor_Tensor"), _function(operator.pow))
    put(_overloads(aten.mean, "dim"), _function(torch.mean))
    # (values, indices) of a max / min along one axis (GPT-OSS subtracts the scores' row maximum)
    put(_overloads(aten.max, "dim"), _function(torch.max))
    put(_overloads(aten.min, "dim"), _function(torch.min))
    put(_overloads(aten.sum, "dim_IntList"), _function(torch.sum))
    put(_overloads(aten.matmul, "default") + _overloads(aten.bmm, "default") + _overloads(aten.mm, "default"),
        _function(torch.matmul))
    for name, fn in (("rsqrt", torch.rsqrt), ("sqrt", torch.sqrt), ("tanh", torch.tanh), ("neg", torch.neg),
                     ("exp", torch.exp), ("sin", torch.sin), ("cos", torch.cos), ("erf", torch.erf),
                     ("sigmoid", torch.sigmoid), ("relu", F.relu), ("silu", F.silu), ("abs", torch.abs),
                     ("reciprocal", torch.reciprocal), ("square", torch.square)):
        put(_overloads(getattr(aten, name), "default"), _function(fn))
    for name, fn in (("expm1", torch.expm1), ("log1p", torch.log1p), ("softplus", F.softplus)):
        put(_overloads(getattr(aten, name), "default"), _function(fn))  # (Apertus' xIELU)
    # comparisons and two-operand min / max act element by element (xIELU's where(x > 0, ..., ...))
    for name, fn in (("gt", operator.gt), ("lt", operator.lt), ("ge", operator.ge), ("le", operator.le)):
        put(_overloads(getattr(aten, name), "Scalar", "Tensor"), _function(fn))
    put(_overloads(aten.minimum, "default") + _overloads(aten.min, "other"), _function(torch.minimum))
    put(_overloads(aten.maximum, "default") + _overloads(aten.max, "other"), _function(torch.maximum))
    put(_overloads(aten.gelu, "default"), _gelu)
    put(_overloads(aten.clamp, "default"), _function(torch.clamp))  # (scalar bounds: GPT-OSS's clamped experts)
    put(_overloads(aten._softmax, "default") + _overloads(aten.softmax, "int"), _softmax)
    put(_overloads(aten.dropout, "default"), _dropout)
    put(_overloads(aten.view, "default") + _overloads(aten.reshape, "default") + _overloads(aten._unsafe_view, "default"),
        _method("reshape"))
    put(_overloads(aten.repeat, "default"), _method("repeat"))  # (JetMoE tiles its key/value heads per expert)
    put(_overloads(aten.expand, "default") + _overloads(aten.broadcast_to, "default"), _method("expand"))
    put(_overloads(aten.transpose, "int"), _function(torch.transpose))
    put(_overloads(aten.permute, "default"), _function(torch.permute))
    put(_overloads(aten.t, "default") + _overloads(aten.numpy_T, "default"), _function(torch.t))
    put(_overloads(aten.unsqueeze, "default"), _function(torch.unsqueeze))
    put(_overloads(aten.squeeze, "dim", "dims", "default"), _function(torch.squeeze))
    put(_overloads(aten.flatten, "using_ints"), _function(torch.flatten))
    put(_overloads(aten.unflatten, "int"), _unflatten)  # (Falcon's [q | k | v] per head on transformers 5.25)
    put(_overloads(aten.cat, "default"), _function(torch.cat))
    put(_overloads(aten.stack, "default"), _function(torch.stack))
    put(_overloads(aten.baddbmm, "default"), _function(torch.baddbmm))
    put(_overloads(aten.split, "Tensor") + _overloads(aten.split_with_sizes, "default"), _function(torch.split))
    put(_overloads(aten.chunk, "default"), _function(torch.chunk))
    put(_overloads(aten.unbind, "int"), _function(torch.unbind))
    put(_overloads(aten.slice, "Tensor"), _slice)
    put(_overloads(aten.select, "int"), _select)
    put(_overloads(aten.where, "self"), _function(torch.where))
    put(_overloads(aten.masked_fill, "Scalar"), _function(torch.masked_fill))
    put(_overloads(aten.maximum, "default") + _overloads(aten.max, "other"), _function(torch.maximum))
    put(_overloads(aten.minimum, "default") + _overloads(aten.min, "other"), _function(torch.minimum))
    put(_overloads(aten.to, "dtype", "dtype_layout", "device") + _overloads(aten._to_copy, "default"), _to)
    put(_overloads(aten.type_as, "default"), _type_as)
    put(_overloads(aten.clone, "default") + _overloads(aten.contiguous, "default") + _overloads(aten.alias, "default")
        + _overloads(aten.detach, "default") + _overloads(aten.lift_fresh_copy, "default"),
        lambda x, *a, **k: (_identity, (x,), {}))
    return t


LIFTED = _table()
# runtime checks of the export (shapes, dtypes, symbolic ranges): no values, nothing to analyse
_DROPPED = set(_overloads(aten._assert_tensor_metadata, "default") + _overloads(aten._assert_scalar, "default")
               + _overloads(aten.sym_constrain_range_for_size, "default"))


_IN_PLACE = {op: fn for packet, fn in (("add_", operator.add), ("mul_", operator.mul))
             for op in _overloads(getattr(aten, packet), "Tensor")}


def _last_use(node: fx.Node) -> bool:
    """``node`` (an in-place op) is the last reader of the tensor it mutates, and nothing aliases it."""
    target = node.args[0]
    if not isinstance(target, fx.Node) or len(node.kwargs) or node.args[2:]:
        return False
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return all(order[u] <= order[node] for u in target.users)


def lift_exported(gm: fx.GraphModule, strip_prefix: str = "") -> fx.GraphModule:
    """A GraphModule of torch-level ops computing what ``gm`` (``ExportedProgram.module()``) computes.

    Placeholders are plain positional inputs; ``get_attr`` targets lose ``strip_prefix`` (the wrapper a
    capture added), so they are the model's own state_dict keys; a single output is returned bare."""
    fold_filled_empties(gm)
    fold_complex_rotary(gm)
    graph = fx.Graph()
    env: dict = {}
    attrs: dict = {}

    def local(a):
        return fx.node.map_arg(a, lambda n: env[n])

    def identity_of(n):
        return env[n]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            new = graph.placeholder(node.name)
        elif node.op == "get_attr":
            target = node.target[len(strip_prefix):] if node.target.startswith(strip_prefix) else node.target
            attrs[target] = operator.attrgetter(node.target)(gm)
            new = graph.get_attr(target)
        elif node.op == "call_module":  # the export's input guards (_guards_fn): no values
            if node.users:
                raise ValueError(f"exported graph calls module {node.target!r}")
            continue
        elif node.op == "output":
            outs = local(node.args[0])
            graph.output(outs[0] if isinstance(outs, (tuple, list)) and len(outs) == 1 else outs)
            continue
        elif node.op == "call_function" and node.target in _DROPPED:
            continue
        elif node.op == "call_function" and node.target in _IN_PLACE and _last_use(node):
            # x += y where x is not read afterwards (Falcon's parallel residual): the value is x + y
            new = graph.create_node("call_function", _IN_PLACE[node.target], local(tuple(node.args[:2])), {},
                                    node.name)
        elif node.op == "call_function" and node.target in LIFTED:
            target, args, kwargs = LIFTED[node.target](*node.args, **node.kwargs)
            if target is _identity:
                env[node] = identity_of(args[0])
                continue
            op = "call_method" if isinstance(target, str) else "call_function"
            new = graph.create_node(op, target, local(tuple(args)), local(dict(kwargs)), node.name)
        else:
            new = graph.create_node(node.op, node.target, local(node.args), local(node.kwargs), node.name)
        new.meta = dict(node.meta)
        env[node] = new
    graph.eliminate_dead_code()
    return fx.GraphModule(attrs, graph, "Exported")
