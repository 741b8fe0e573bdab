"""Label propagation over an ONNX graph: the ONNX adapter of :mod:`graphgrow.core.relations`.

:class:`OnnxLabelRun` maps every node to a relation of the core through the tables of
:mod:`graphgrow.onnx.ops`, reads the initializers it needs and records the new ones
(:class:`Updates`).  Data-movement ops (Reshape, Transpose, Concat, Split, Slice, Gather, Squeeze,
Unsqueeze, Flatten, DepthToSpace, ...) and constant subgraphs run through onnx's reference evaluator,
so their semantics (per opset) come from onnx itself.  No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core import arithmetic as ar
from ..core.growth import Conflict
from ..core.label_tensor import LabelTensor, same_labels
from ..core.labels import LabelOverflow
from ..core.relations import NotUnderstood, RelationRun
from ..errors import GraphGrowError
from . import ops
from .elementwise import ElementwiseOps
from .moves import MoveReplay
from .reference import evaluate

@dataclass
class Updates:
    """What the apply pass changes in the model."""

    initializers: dict = field(default_factory=dict)  # (node index, input index) -> new array
    shape_slots: set = field(default_factory=set)  # slots holding shape constants (node-specific copies)
    weight_slots: set = field(default_factory=set)  # weight matrices / filters: tied when shared
    attributes: dict = field(default_factory=dict)  # node index -> {name: value}


def node_label(node, idx: int) -> str:
    return node.name or f"{node.op_type}_{idx}:{node.output[0]}"


class OnnxLabelRun(ElementwiseOps, MoveReplay, RelationRun):
    """A label run of an ONNX graph; the core's ``node`` is the pair ``(node index, NodeProto)``."""

    def __init__(self, model: onnx.ModelProto, shapes: dict, *, plan=None, analysis=None, options=None):
        super().__init__(plan=plan, analysis=analysis, options=options)
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.shapes = shapes  # value name -> shape in the original run
        self.updates = Updates()
        self.dynamic: set = set()  # constants computed from activation shapes (they follow the width)
        if analysis is not None and analysis.graph is self.graph:
            # the initializers and their users are the analysis run's (read-only arrays)
            self.consts, self.users, self.producer = analysis.consts, analysis.users, analysis.producer
            return
        self.consts = {t.name: _read_only(numpy_helper.to_array(t)) for t in self.graph.initializer}
        self.users: dict = {}  # value name -> [(node index, input index)]
        self.producer: dict = {}  # value name -> node index
        for i, n in enumerate(self.graph.node):
            for k, name in enumerate(n.input):
                if name:
                    self.users.setdefault(name, []).append((i, k))
            for name in n.output:
                self.producer[name] = i

    # ------------------------------------------------------------ hooks of the core run
    def site(self, site) -> str:
        idx, node = site
        return f"{node.op_type} node '{node_label(node, idx)}'"

    def node_key(self, site):
        return site[0]

    def salt(self, site) -> int:
        return self._salt(site[0])

    def input_pairs(self, site) -> list:
        return [(self.old.get(n), self.env[n]) for n in site[1].input if n and isinstance(self.env.get(n), LabelTensor)]

    def fixed_outputs(self, site):
        idx, node = site
        outs = []
        for k, name in enumerate(node.output):
            shape = self.shapes.get(name)
            outs.append(self._fixed((idx, k), shape) if shape is not None else None)
        return outs

    def old_outputs(self, site):
        return [self.old.get(name) for name in site[1].output]

    # ------------------------------------------------------------ helpers
    def _fixed(self, key, shape):
        if key not in self.fixed_space:
            self.fixed_space[key] = self.table.new_space(str(key), 1, "fixed")
        return LabelTensor.element(shape, self.fixed_space[key].base, hash(key) & 0xFFFF)

    def _conflict(self, idx, node, reason):
        return self.conflict((idx, node), reason)

    def _opaque(self, idx, node, reason):
        return self.opaque((idx, node), reason)

    def _mix(self, idx, node, x: LabelTensor, why):
        return self.mix((idx, node), x, why)

    def _attrs(self, node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _salt(self, idx, k=0):
        return (idx * 4 + k + 1) & 0xFFFF

    def _old_input(self, node, k, x):
        return x if self.analysis else self.old[node.input[k]]

    def _set_const(self, idx, k, value, shape=False, weight=False):
        self.updates.initializers[(idx, k)] = value
        if shape:
            self.updates.shape_slots.add((idx, k))
        if weight:
            self.updates.weight_slots.add((idx, k))

    def _check_shared_weights(self):
        """A weight shared by several nodes (tied weights) changes for all of them identically or not
        at all: never half.  Shared per-channel vectors (biases, norm parameters: exporters deduplicate
        equal ones) and shape constants get a copy per node instead."""
        names = {self.graph.node[i].input[k] for (i, k) in self.updates.weight_slots}
        for name in names:
            users = self.users.get(name, [])
            if len(users) < 2:
                continue
            vals = [self.updates.initializers.get(u) if u in self.updates.weight_slots or u not in
                    self.updates.initializers else self.updates.initializers[u] for u in users]
            first = vals[0]
            same = all((v is None and first is None) or (v is not None and first is not None and v.shape == first.shape
                                                         and np.array_equal(v, first)) for v in vals)
            if not same:
                i, _ = next(u for u, v in zip(users, vals) if v is not None)
                chans = []
                for j, _ in users:
                    v = self.old.get(self.graph.node[j].input[0])
                    if isinstance(v, LabelTensor):
                        chans.append(v.chans)
                raise Conflict((i, self.graph.node[i]), np.unique(np.concatenate(chans)) if chans else
                               np.zeros(0, np.int64), f"constant '{name}' is shared by {len(users)} nodes that would "
                               "need different widened values (tied weights)")

    def _const(self, node, k):
        name = node.input[k] if k < len(node.input) else ""
        if not name:
            return None
        v = self.env.get(name)
        return v if isinstance(v, np.ndarray) else None

    def _weight_ok(self, idx, node, ks) -> bool:
        """Weights must be constants (computed weights are not rewritten)."""
        for k in ks:
            name = node.input[k] if k < len(node.input) else ""
            if name and self._const(node, k) is None:
                return False
        return True

    # ------------------------------------------------------------ driver
    def run(self, feeds_shapes: dict):
        for inp in self.graph.input:
            if inp.name in self.consts:
                self.env[inp.name] = self.consts[inp.name]
            else:
                self.env[inp.name] = self._fixed(("input", inp.name), feeds_shapes[inp.name])
        for name, arr in self.consts.items():
            self.env.setdefault(name, arr)
        for idx, node in enumerate(self.graph.node):
            try:
                outs = self._node(idx, node)
            except NotUnderstood as exc:
                outs = self._opaque(idx, node, str(exc))
            except (Conflict, GraphGrowError, LabelOverflow):
                raise
            except Exception as exc:  # noqa: BLE001 - fail closed on ops that break on labels
                msg = f"could not be analysed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                if self.analysis:
                    outs = self._opaque(idx, node, msg)
                else:
                    raise self._conflict(idx, node, msg) from None
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v
        if not self.analysis:
            self._check_shared_weights()
        for out in self.graph.output:
            v = self.env.get(out.name)
            if isinstance(v, LabelTensor):
                self.model_output(self.old.get(out.name), v, what=f"model output '{out.name}'")
        return self

    def _inputs_unchanged(self, node, vals) -> bool:
        has_label = False
        for name, v in zip(node.input, vals):
            if not name:
                continue
            o = self.old.get(name)
            if isinstance(v, LabelTensor):
                has_label = True
                if not same_labels(o, v):
                    return False
            elif v is None:
                if o is not None:
                    return False
            elif not (o is v or (isinstance(o, np.ndarray) and isinstance(v, np.ndarray) and o.shape == v.shape
                                 and o.dtype == v.dtype and np.array_equal(o, v))):
                return False
        return has_label

    def _node(self, idx, node):
        op = node.op_type
        vals = [self.env.get(n) if n else None for n in node.input]
        if not self.analysis and idx in self.opaque_nodes:
            return self._opaque(idx, node, "not understood")
        if (not self.analysis and idx not in self.node_space and op not in ("Shape", "Size")
                and self._inputs_unchanged(node, vals)):
            # a non-producing op whose inputs are those of the original gives the original's outputs
            # (no plan-dependent state is read and nothing is rewritten)
            return [self.old.get(n) if n else None for n in node.output]
        if node.domain not in ("", "ai.onnx"):
            return self._opaque(idx, node, f"operator domain '{node.domain}' is not understood")
        if op == "Gather" and self._added_table(node, vals):
            return self._table_rows(idx, node, vals[0], vals[1])
        if not any(isinstance(v, LabelTensor) for v in vals) and op not in ("Shape", "Size"):
            # constant subgraph (Constant, ConstantOfShape, Cast/Reshape of weights, shape arithmetic)
            if op == "Identity" and len(vals) == 1 and isinstance(vals[0], np.ndarray):
                out = [vals[0]]  # (no evaluator needed)
            elif (op == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"
                  and node.attribute[0].t.data_type in ops.PLAIN_TYPES and not node.attribute[0].t.external_data):
                out = [numpy_helper.to_array(node.attribute[0].t)]
            else:
                out = evaluate(self.opset, self.model, node, vals, idx)
            if any(i in self.dynamic for i in node.input if i):
                self.dynamic.update(n for n in node.output if n)
            return [None if o is None else np.asarray(o) for o in out]
        x = vals[0] if vals else None
        a = self._attrs(node)
        if op == "Shape":
            shape = np.array(x.shape, dtype=np.int64)
            start, end = a.get("start", 0), a.get("end", None)
            self.dynamic.add(node.output[0])
            return [shape[start:end]]
        if op == "Size":
            self.dynamic.add(node.output[0])
            return [np.array(int(np.prod(x.shape)), dtype=np.int64)]
        if op in ops.CONSTANT_CLOSED and self._without_channels(node, vals):
            return self._constant_result(idx, node, vals)
        if op in ops.PASS:
            if op == "Cast" and a.get("to") not in ops.FLOAT_TYPES:
                return self._opaque(idx, node, "cast of an activation to a non-float type")
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                return self._opaque(idx, node, "dropout mask is used")
            return [x] + [None] * (len(node.output) - 1)
        if op in ops.UNARY or op == "PRelu" and self._const(node, 1) is not None and self._const(node, 1).size == 1:
            if not isinstance(x, LabelTensor) or any(isinstance(v, LabelTensor) for v in vals[1:]):
                return self._opaque(idx, node, "a parameter input is an activation")
            return [self.elementwise((idx, node), x)]
        if op == "PRelu":
            return self._binary_const(idx, node, vals, order=(0, 1))
        if op in ops.BINARY:
            return self._binary(idx, node, vals)
        if op == "Where" and len(vals) == 3:
            return self._where(idx, node, vals)
        if op in ops.POSITIONAL:
            return self._positional(idx, node, vals, a)
        if op in ("Conv", "ConvTranspose"):
            return self._conv(idx, node, x, a)
        if op == "Gemm":
            return self._gemm(idx, node, x, a)
        if op == "MatMul" and isinstance(x, LabelTensor) and self._tied_table(node) is not None:
            return self._tied_head(idx, node, x)
        if op == "MatMul":
            if isinstance(x, LabelTensor) and not isinstance(vals[1], LabelTensor) and vals[1] is not None and vals[1].ndim == 2:
                if not self._weight_ok(idx, node, [1]):
                    return self._opaque(idx, node, "its weight is computed, not a constant")
                return self._produce(idx, node, x, weight_k=1, bias_k=None, in_axis=-1, out_axis=-1, w_in=0, w_out=1)
            if isinstance(x, LabelTensor) and isinstance(vals[1], LabelTensor):
                return [self.batched_product((idx, node), node_label(node, idx), x, vals[1],
                                             self._old_input(node, 0, x), self._old_input(node, 1, vals[1]))]
            return self._opaque(idx, node, "matrix product of an activation with a computed or batched constant")
        if op in ("BatchNormalization", "InstanceNormalization"):
            if len([o for o in node.output if o]) > 1:
                return self._opaque(idx, node, "training-mode outputs are used")
            ks = [1, 2, 3, 4] if op == "BatchNormalization" else [1, 2]
            if not self._weight_ok(idx, node, ks):
                return self._opaque(idx, node, "its parameters are computed")
            return self._carry_params(idx, node, x, ks)
        if op in ("LayerNormalization", "RMSNormalization"):
            return self._norm(idx, node, x, a)
        if op == "Attention":
            return self._attention(idx, node, vals, a)
        if op in ops.MIX:
            return self._mix(idx, node, x, f"{op} normalizes across channels")
        if op in ops.SOFTMAX:
            axis = a.get("axis", 1 if self.opset < 13 else -1) % x.ndim
            # (before opset 13 softmax flattens the axes from `axis` on into one)
            if self.mixes(x, self._old_input(node, 0, x), range(axis, x.ndim) if self.opset < 13 else [axis]):
                return self._mix(idx, node, x, f"{op} over the channel axis")
            return [self.elementwise((idx, node), x)]
        if op in ops.POOL:
            return self._pool(idx, node, x, a)
        if op in ops.REDUCE:
            return self._reduce(idx, node, x, a, vals)
        if op == "Gather" and isinstance(vals[0], np.ndarray) and isinstance(vals[1], LabelTensor) \
                and a.get("axis", 0) == 0 and vals[0].ndim == 2 and self._weight_ok(idx, node, [0]):
            return self._embedding(idx, node, vals[1], vals[0])
        if op == "Concat" and any(isinstance(v, LabelTensor) for v in vals) \
                and any(isinstance(v, np.ndarray) for v in vals):
            out = self._concat_parameters(idx, node, vals, a)
            if out is not None:
                return out
        if op in ops.MOVE:
            return self._move(idx, node, vals, a)
        return self._opaque(idx, node, "this operator is not understood by the channel analysis")

    # ------------------------------------------------------------ producers
    def _conv(self, idx, node, x: LabelTensor, a):
        w = self._const(node, 1)
        if not isinstance(x, LabelTensor) or w is None:
            return self._opaque(idx, node, "its weight is not a constant")
        if not self._weight_ok(idx, node, [1, 2]):
            return self._opaque(idx, node, "its weight is computed, not a constant")
        g = a.get("group", 1)
        if node.op_type == "ConvTranspose":
            if g != 1:
                return self._opaque(idx, node, "grouped transposed convolution")
            return self._produce(idx, node, x, weight_k=1, bias_k=2, in_axis=1, out_axis=1, w_in=0, w_out=1)
        if g == 1:
            return self._produce(idx, node, x, weight_k=1, bias_k=2, in_axis=1, out_axis=1, w_in=1, w_out=0)
        c_in = (self.old[node.input[0]] if not self.analysis else x).shape[1]
        if g == c_in == w.shape[0] or (not self.analysis and g == c_in and w.shape[0] == c_in):
            return self._depthwise(idx, node, x, w)
        return self._grouped(idx, node, x, w, g)

    def _gemm(self, idx, node, x: LabelTensor, a):
        if not isinstance(x, LabelTensor) or self._const(node, 1) is None or a.get("transA", 0):
            return self._opaque(idx, node, "transposed or non-constant operands")
        if not self._weight_ok(idx, node, [1, 2]):
            return self._opaque(idx, node, "its weight is computed, not a constant")
        tb = a.get("transB", 0)
        return self._produce(idx, node, x, weight_k=1, bias_k=2, in_axis=1, out_axis=1, w_in=1 if tb else 0,
                             w_out=0 if tb else 1)

    # ------------------------------------------------------------ relations
    def _binary(self, idx, node, vals):
        labels = [v for v in vals if isinstance(v, LabelTensor)]
        if len(labels) != len(vals):
            if len(labels) != 1 or len(vals) != 2:
                return self._opaque(idx, node, "mixes several activations with constants")
            return self._binary_const(idx, node, vals, order=(0, 1) if isinstance(vals[0], LabelTensor) else (1, 0))
        try:
            out_shape = tuple(np.broadcast_shapes(*[v.shape for v in labels]))
        except ValueError:
            if self.analysis:
                return self._opaque(idx, node, "operands do not broadcast")
            raise self._conflict(idx, node, "operands no longer broadcast") from None
        full = next((k for k, v in enumerate(vals) if v.shape == out_shape), None)
        if full is None:
            return self._opaque(idx, node, "no operand has the result's shape")
        operands = [(None if self.analysis else self.old[name], v) for name, v in zip(node.input, vals)]
        return [self.unify((idx, node), operands, full)]

    def _binary_const(self, idx, node, vals, order):
        """An activation combined with a constant: scalar-like, or one value per channel (gathered)."""
        xk, ck = order
        x, c = vals[xk], vals[ck]
        if c is None:
            return self._opaque(idx, node, "missing operand")
        ref = self._old_input(node, xk, x)
        if isinstance(x, LabelTensor) and len(ref.vary) >= 2 and isinstance(c, np.ndarray):
            try:
                if tuple(np.broadcast_shapes(ref.shape, c.shape)) == ref.shape:
                    return [self.fixed_operand((idx, node), x, ref, c.shape)]  # rotary cos / sin on heads
            except ValueError:
                pass
        try:
            out, new = self.per_channel_constant((idx, node), node_label(node, idx), x,
                                                 self._old_input(node, xk, x), c,
                                                 computed=not self._weight_ok(idx, node, [ck]),
                                                 combine={"Add": "add", "Sub": "add", "Mul": "mul",
                                                          "Div": "mul"}.get(node.op_type),
                                                 collapse=node.input[ck] not in self.consts)
        except NotUnderstood as exc:
            return self._opaque(idx, node, str(exc))
        if new is not None:
            self._set_const(idx, ck, new)
        return [out]

    def _carry_params(self, idx, node, x: LabelTensor, ks):
        params = {} if self.analysis else {k: self._const(node, k) for k in ks}
        out, new, _ = self.carry((idx, node), node_label(node, idx), x, self._old_input(node, 0, x), params)
        for k, arr in new.items():
            self._set_const(idx, k, arr)
        return [out] + [None] * (len(node.output) - 1)

    def _norm(self, idx, node, x: LabelTensor, a):
        """LayerNormalization / RMSNormalization over the axes from ``axis`` on (uniform replication)."""
        if not isinstance(x, LabelTensor) or len([o for o in node.output if o]) > 1:
            return self._opaque(idx, node, "its mean / inverse standard deviation outputs are used")
        ks = [k for k in (1, 2) if k < len(node.input) and node.input[k]]
        if not self._weight_ok(idx, node, ks):
            return self._opaque(idx, node, "its scale or bias is computed")
        axis = a.get("axis", -1) % x.ndim
        axes = list(range(axis, x.ndim))
        ax = self._norm_axis(x, self._old_input(node, 0, x), axes)
        params = {} if self.analysis else {k: self._const(node, k) for k in ks}
        kind = "layer" if node.op_type == "LayerNormalization" else "rms"
        eps = float(a.get("epsilon", 1e-5))
        out, new, match, new_eps = self.norm((idx, node), node_label(node, idx), x, self._old_input(node, 0, x), axes,
                                             params, (ax - axis) if ax is not None else 0, kind=kind, eps=eps)
        for k, arr in new.items():
            self._set_const(idx, k, arr)
        if new_eps is not None:
            self.updates.attributes.setdefault(idx, {})["epsilon"] = float(new_eps)
        return [out] + [None] * (len(node.output) - 1)

    def _attention(self, idx, node, vals, a):
        """ONNX Attention (opset 23) on 4-d (batch, heads, positions, head_dim) inputs without a KV cache: the core's
        fused attention (heads copied whole, GQA groups kept)."""
        q, k, v = (vals + [None] * 3)[:3]
        extra = [n for n in node.input[3:] if n]
        if not all(isinstance(t, LabelTensor) and t.ndim == 4 for t in (q, k, v)) or len(node.input) > 4 \
                or any(o for o in node.output[1:]) or a.get("softcap", 0.0):
            return self._opaque(idx, node, "Attention with 3-d inputs, a KV cache or softcap is not understood")
        if extra and isinstance(self.env.get(extra[0]), LabelTensor) and self.env[extra[0]].vary:
            return self._opaque(idx, node, "its attention mask has channel structure")
        olds = [self._old_input(node, i, t) for i, t in enumerate((q, k, v))]
        out_shape = list(olds[0].shape[:-1]) + [olds[2].shape[-1]] if not self.analysis else \
            list(self.shapes[node.output[0]])
        try:
            return [self.attention((idx, node), node_label(node, idx), q, k, v, *olds, out_shape=out_shape)]
        except NotUnderstood as exc:
            return self._opaque(idx, node, str(exc))

    def _embedding(self, idx, node, ids: LabelTensor, table: np.ndarray):
        """Gather of rows of a constant table by token ids: a producer whose units are the table's columns."""
        if ids.vary:
            return self._opaque(idx, node, "its indices carry channels")
        out, new_w, mapping = self.produce((idx, node), node_label(node, idx), ids, self._old_input(node, 1, ids),
                                           table, in_axis=-1, out_axis=-1, w_in=0, w_out=1,
                                           shape=self.shapes[node.output[0]])
        if new_w is not None:
            self._set_const(idx, 0, new_w, weight=True)
        return [out]

    def _added_table(self, node, vals) -> bool:
        """A Gather of rows of a float table (an initializer only it reads) by constant indices whose rows only
        reach additions (through moves and masks): a position embedding or T5's relative bias, whose positions the
        exporter folded into a constant.  Read as an embedding, its columns widen in the table itself."""
        table, ids = (vals + [None, None])[:2]
        if not (isinstance(table, np.ndarray) and isinstance(ids, np.ndarray) and table.ndim == 2
                and table.dtype.kind == "f" and ids.dtype.kind in "iu" and node.input[0] in self.consts
                and len(self.users.get(node.input[0], [])) == 1 and self._attrs(node).get("axis", 0) == 0):
            return False
        seen, todo = set(), [node.output[0]]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            users = [self.graph.node[j] for j, _ in self.users.get(name, [])]
            if not users or any(o.name == name for o in self.graph.output):
                return False
            for u in users:
                if u.op_type in ("Cast", "Identity", "Transpose", "Unsqueeze", "Reshape", "Squeeze", "Expand"):
                    if u.input[0] != name:
                        return False
                    todo.append(u.output[0])
                elif u.op_type == "Where":  # (a causal mask applied to a relative bias)
                    if u.input[0] == name:
                        return False
                    todo.append(u.output[0])
                elif u.op_type not in ("Add", "Sub"):
                    return False
        return True

    def _table_rows(self, idx, node, table: np.ndarray, ids: np.ndarray):
        """:meth:`_added_table`'s Gather: an embedding whose token ids are constant positions."""
        pos = self._fixed((idx, "positions"), ids.shape)
        out, new_w, _ = self.produce((idx, node), node_label(node, idx), pos, pos, table, in_axis=-1, out_axis=-1,
                                     w_in=0, w_out=1, shape=self.shapes[node.output[0]])
        if new_w is not None:
            self._set_const(idx, 0, new_w, weight=True)
        return [out]

    def _tied_table(self, node):
        """``(transpose node index, table name)`` when a MatMul reads the transpose of a table an embedding
        Gather also reads (a tied output head), else None."""
        i = self.producer.get(node.input[1])
        if i is None or self.graph.node[i].op_type != "Transpose":
            return None
        t = self.graph.node[i]
        perm = self._attrs(t).get("perm")
        name = t.input[0]
        users = self.users.get(name, [])
        if name not in self.consts or self.consts[name].ndim != 2 or list(perm or [1, 0]) != [1, 0] \
                or len(users) != 2 or len(self.users.get(node.input[1], [])) != 1:
            return None
        others = [self.graph.node[j] for j, k in users if j != i]
        if len(others) != 1 or others[0].op_type != "Gather" or self._attrs(others[0]).get("axis", 0) != 0:
            return None
        return i, name

    def _tied_head(self, idx, node, x: LabelTensor):
        """An output head reading the transposed embedding table: the shared table is the embedding's (columns
        copied, not divided), and the 1/k of a k-fold replication is folded into the norm before it."""
        t_idx, name = self._tied_table(node)
        labels, gathered, k = self.tied_head((idx, node), node_label(node, idx), x, self.old.get(node.input[0]),
                                             self.consts[name], self.shapes[node.output[0]])
        if gathered is not None:
            self._set_const(t_idx, 0, gathered, weight=True)  # (the embedding's Gather writes the same value)
        if k > 1:
            self._fold_scale(idx, node, 1.0 / k)
        return [labels]

    def _fold_scale(self, idx, node, scale: float) -> None:
        """Multiply the affine parameters of the norm computing the head's input (through moves) by ``scale``."""
        name = node.input[0]
        while True:
            j = self.producer.get(name)
            if j is None or len(self.users.get(name, [])) != 1:
                break
            n = self.graph.node[j]
            if n.op_type in ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Gather", "Slice", "Flatten"):
                name = n.input[0]
                continue
            slots = []
            if n.op_type in ("LayerNormalization", "RMSNormalization"):
                slots = [(j, k) for k in (1, 2) if (j, k) in self.updates.initializers]
            elif n.op_type == "Add":  # ... * gamma + beta
                beta = [(j, k) for k in (0, 1) if (j, k) in self.updates.initializers]
                mul = [self.producer.get(v) for v in n.input]
                mul = [m for m in mul if m is not None and self.graph.node[m].op_type == "Mul"
                       and len(self.users.get(self.graph.node[m].output[0], [])) == 1]
                gamma = [(mul[0], k) for k in (0, 1) if mul and (mul[0], k) in self.updates.initializers]
                slots = beta + gamma if len(beta) == 1 and len(gamma) == 1 else []
            elif n.op_type == "Mul":
                slots = [(j, k) for k in (0, 1) if (j, k) in self.updates.initializers][:1]
            if slots:
                for slot in slots:
                    arr = self.updates.initializers[slot]
                    self.updates.initializers[slot] = arr * np.asarray(scale, arr.dtype)
                return
            break
        raise self._conflict(idx, node, "its input does not come from an affine norm to fold the width factor into")

    def _parameter_piece(self, site, name: str, shape):
        """Labels of a constant joined to activations when it is a float initializer with one axis longer than 1
        (a class token), possibly broadcast by an Expand: ``(labels, original labels)`` of its own channel space
        along that axis (:meth:`~graphgrow.core.relations.RelationRun.bare_parameter`), or None."""
        src, i = name, self.producer.get(name)
        if src not in self.consts:
            if i is None or self.graph.node[i].op_type != "Expand":
                return None
            src = self.graph.node[i].input[0]
        arr = self.consts.get(src)
        long_axes = [k for k, d in enumerate(arr.shape) if d > 1] if arr is not None else []
        if arr is None or arr.dtype.kind != "f" or len(long_axes) != 1 or len(self.users.get(src, [])) != 1:
            return None
        axis = long_axes[0] + len(shape) - arr.ndim
        if shape[axis] != arr.shape[long_axes[0]]:
            return None
        labels, old, new = self.bare_parameter(site, src, arr, long_axes[0], shape, axis, suffix=f"param:{src}")
        if new is not None:
            self._set_const(*self.users[src][0], new)
        return labels, old

    def _concat_parameters(self, idx, node, vals, a):
        """A concatenation of activations with parameters along a position axis (class token + patches)."""
        pieces, olds = [], []
        for name, v in zip(node.input, vals):
            if isinstance(v, LabelTensor):
                pieces.append(v)
                olds.append(self._old_input(node, list(node.input).index(name), v))
                continue
            got = self._parameter_piece((idx, node), name, v.shape) if isinstance(v, np.ndarray) else None
            if got is None:
                return None
            pieces.append(got[0])
            olds.append(got[1])
        out = self.concat_positions((idx, node), pieces, olds, int(a.get("axis", 0)))
        return None if out is None else [out]

    def _pool(self, idx, node, x: LabelTensor, a):
        if len([o for o in node.output if o]) > 1:
            return self._opaque(idx, node, "pooling indices are used")
        if node.op_type == "Pad":
            pads = self._const(node, 1) if len(node.input) > 1 else np.array(a.get("pads", []))
            if pads is None:
                return self._opaque(idx, node, "pads are computed")
            r = x.ndim
            if len(pads) and (pads[1] != 0 or pads[1 + r] != 0):
                return self._opaque(idx, node, "pads the channel axis")
        try:
            return [self.pool((idx, node), x, self._old_input(node, 0, x), self.shapes.get(node.output[0]))]
        except NotUnderstood as exc:
            return self._opaque(idx, node, str(exc))

    def _reduce(self, idx, node, x: LabelTensor, a, vals):
        axes = a.get("axes")
        if axes is None and len(vals) > 1 and vals[1] is not None:
            axes = [int(v) for v in np.asarray(vals[1]).ravel()]
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            return self._mix(idx, node, x, "reduces over all axes")
        axes = sorted({int(ax) % x.ndim for ax in axes})
        mean = node.op_type == "ReduceMean"
        out = self.reduce((idx, node), x, self._old_input(node, 0, x), axes, bool(a.get("keepdims", 1)),
                          mean=mean, mean_kind=self._mean_terms(node) if mean else None)
        return out if isinstance(out, list) else [out]

    def _source(self, name: str) -> str:
        """The value ``name`` with casts and identities looked through."""
        while (i := self.producer.get(name)) is not None and self.graph.node[i].op_type in ("Cast", "Identity"):
            name = self.graph.node[i].input[0]
        return name

    def _mean_terms(self, node) -> str:
        """What a ReduceMean averages, for fill + rescale: "mean_sq", "mean_centered" or "mean_x"."""
        i = self.producer.get(self._source(node.input[0]))
        n = self.graph.node[i] if i is not None else None
        if n is None:
            return "mean_x"
        if n.op_type == "Pow":
            e = self.env.get(n.input[1])
            squared = isinstance(e, np.ndarray) and e.size == 1 and float(e.ravel()[0]) == 2.0
        else:
            squared = n.op_type == "Mul" and n.input[0] == n.input[1]
        if not squared:
            return "mean_x"
        j = self.producer.get(self._source(n.input[0]))
        sub = self.graph.node[j] if j is not None else None
        if sub is not None and sub.op_type == "Sub":
            m = self.producer.get(self._source(sub.input[1]))
            if m is not None and self.graph.node[m].op_type == "ReduceMean" \
                    and self._source(self.graph.node[m].input[0]) == self._source(sub.input[0]):
                return "mean_centered"
        return "mean_sq"

    def _produce(self, idx, node, x: LabelTensor, *, weight_k, bias_k, in_axis, out_axis, w_in, w_out):
        weight = self._const(node, weight_k)
        out, new_w, mapping = self.produce((idx, node), node_label(node, idx), x, self._old_input(node, 0, x), weight,
                                           in_axis=in_axis, out_axis=out_axis, w_in=w_in, w_out=w_out,
                                           shape=self.shapes[node.output[0]])
        if new_w is not None:
            self._set_const(idx, weight_k, new_w, weight=True)
            bias = self._const(node, bias_k) if bias_k is not None else None
            if bias is not None:
                if bias.ndim >= 1 and bias.shape[-1] == weight.shape[w_out]:
                    self._set_const(idx, bias_k, ar.gather_fill(bias, bias.ndim - 1, mapping,
                                                                self.fill_kind_of((idx, node))))
                elif bias.size != 1:
                    raise self._conflict(idx, node, "bias of an unexpected shape")
        return [out]

    def _depthwise(self, idx, node, x: LabelTensor, w):
        params = {} if self.analysis else {1: w, 2: self._const(node, 2)}
        try:
            out, new, match = self.depthwise((idx, node), node_label(node, idx), x, self._old_input(node, 0, x),
                                             params, self.shapes[node.output[0]])
        except NotUnderstood as exc:
            return self._opaque(idx, node, str(exc))
        if match is not None:
            self._set_const(idx, 1, new[1], weight=True)
            if 2 in new:
                self._set_const(idx, 2, new[2])
            self.updates.attributes.setdefault(idx, {})["group"] = match.n_new
        return [out]

    def _grouped(self, idx, node, x: LabelTensor, w, g):
        try:
            out, new_w, mapping = self.grouped((idx, node), node_label(node, idx), x, self._old_input(node, 0, x), w,
                                               g, self.shapes[node.output[0]])
        except NotUnderstood as exc:
            return self._opaque(idx, node, str(exc))
        if new_w is not None:
            self._set_const(idx, 1, new_w, weight=True)
            b = self._const(node, 2)
            if b is not None:
                self._set_const(idx, 2, ar.gather(b, 0, mapping))
        return [out]


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


