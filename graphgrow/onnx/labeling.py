"""Label propagation over an ONNX graph (the ONNX adapter of the core analysis).

The counterpart of :mod:`graphgrow.fx.labeling` for ``onnx.ModelProto``:
numpy label arrays replace activations; data-movement ops (Reshape,
Transpose, Concat, Split, Slice, Gather, Squeeze, Unsqueeze, Flatten,
DepthToSpace, ...) and constant subgraphs run through onnx's reference
evaluator, so their semantics (per opset) come from onnx itself.  No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..core import arithmetic as ar
from ..core import sites
from ..core.growth import Conflict
from ..core.labels import (CHAN_SHIFT, MAX_POSITIONS, SALT_MASK, SALT_SHIFT, LabelOverflow, _mix,
                           channel_label_factors, channel_of, channel_sequence, element_labels, resalt,
                           unique_channels, varying_axes)
from ..core.provenance import Mismatch, RowMatch, match_rows
from ..errors import GraphGrowError


_EVALUATORS: dict = {}


class LN:
    """Label array standing in for an activation.

    ``like``: an LN whose labels have the same channel field (an elementwise op's input): the channel
    ids and the axes they vary along, computed once, are shared with it.

    An LN made by a producer (:meth:`factored`) keeps its labels as two factors, the per-channel
    part along its channel axis and the position grid of the other axes (see
    :func:`~graphgrow.core.labels.channel_label_factors`); the full array ``a`` is built on first use.
    Elementwise ops, comparisons and row matching along the channel axis then work on the
    per-channel part alone (see the module functions below), which is exact: the position grid is
    the same for every channel and its bits never overlap the part's.

    An LN without channel structure (model inputs, results of opaque or channel-mixing ops:
    :meth:`element`) is one channel id and one salt over every element, its positions numbering
    the elements in C order (:func:`~graphgrow.core.labels.element_labels`); it is kept as those
    two numbers (``elem``), so elementwise ops and reshapes on it cost nothing.

    A reshape that splits a factored channel axis (attention heads: 3 x 768, 12 x 64) leaves labels
    factored over several channel axes (:meth:`multi`): ``mpart`` holds the channel-and-salt part over
    the axes ``cax``, the position grid numbers the other axes in C order. Only moves use this form
    directly; every other op reads the full array ``a``.
    """

    __slots__ = ("_a", "_shape", "_chans", "_vary", "_like", "part", "ax", "elem", "mpart", "cax")

    def __init__(self, a: np.ndarray, like: "LN | None" = None):
        self._blank(np.shape(a))
        self._a = np.ascontiguousarray(a)
        self._like = like if like is not None and like.shape == self._shape else None

    def _blank(self, shape):
        self._a = self._chans = self._vary = self._like = None
        self.part = self.ax = self.elem = self.mpart = self.cax = None
        self._shape = tuple(int(d) for d in shape)

    @classmethod
    def element(cls, shape, chan_id: int, salt: int) -> "LN":
        """``LN(element_labels(shape, chan_id, salt))`` (``salt``: the 16-bit salt field), built on first use."""
        self = cls.__new__(cls)
        self._blank(shape)
        n = int(np.prod(self._shape)) if self._shape else 1
        if n >= MAX_POSITIONS:
            raise LabelOverflow(f"a tensor with {n} elements exceeds the label encoding")
        self.elem = (int(chan_id), int(salt) & SALT_MASK)
        self._chans, self._vary = np.array([chan_id] if n else [], np.int64), []
        return self

    @classmethod
    def factored(cls, shape, axis: int, part: np.ndarray) -> "LN":
        """Labels ``part`` (along ``axis``) | the position grid of ``shape`` (non-empty shapes only)."""
        self = cls.__new__(cls)
        self._blank(shape)
        self.part, self.ax = part, axis
        return self

    @classmethod
    def multi(cls, shape, cax, mpart: np.ndarray) -> "LN":
        """Labels ``mpart`` (over the axes ``cax``, in order) | the position grid of the other axes of
        ``shape``; one channel axis gives :meth:`factored`, none :meth:`element`."""
        shape, cax = tuple(int(d) for d in shape), tuple(int(c) for c in cax)
        if len(cax) == 1:
            return cls.factored(shape, cax[0], np.ascontiguousarray(mpart).reshape(-1))
        if len(cax) == 0:
            v = int(np.asarray(mpart).reshape(-1)[0])
            return cls.element(shape, v >> CHAN_SHIFT, (v >> SALT_SHIFT) & SALT_MASK)
        self = cls.__new__(cls)
        self._blank(shape)
        self.mpart, self.cax = np.ascontiguousarray(mpart), cax
        return self

    def factors(self):
        """``(channel axes, their part)`` of a factored or multi-factored LN, else None."""
        if self.part is not None:
            return (self.ax,), self.part
        if self.mpart is not None:
            return self.cax, self.mpart
        return None

    def bpart(self) -> np.ndarray:
        """The part broadcast to the tensor's rank (size 1 on the position axes)."""
        cax, part = self.factors()
        return part.reshape([self._shape[i] if i in cax else 1 for i in range(len(self._shape))])

    @classmethod
    def channels(cls, shape, axis: int, chan_ids, salt: int) -> "LN":
        """``LN(channel_labels(shape, axis, chan_ids, salt))``, factored when the tensor is not empty."""
        part, grid, axis = channel_label_factors(shape, axis, chan_ids, salt)
        if grid.size == 0 or len(part) == 0:
            return cls(part.reshape([-1 if i == axis else 1 for i in range(grid.ndim)]) | grid)
        return cls.factored(shape, axis, part)

    @property
    def a(self) -> np.ndarray:
        if self._a is None and self.elem is not None:
            self._a = element_labels(self._shape, *self.elem)
        elif self._a is None:  # the part | the C-order position grid of the other axes
            cax = self.factors()[0]
            other = [d for i, d in enumerate(self._shape) if i not in cax]
            grid = np.arange(int(np.prod(other)) if other else 1, dtype=np.int64).reshape(
                [1 if i in cax else d for i, d in enumerate(self._shape)])
            self._a = np.ascontiguousarray(self.bpart() | grid)
        return self._a

    @property
    def shape(self):
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def grid_key(self):
        """Shape of the position grid (the shape with the channel axis left out) and that axis."""
        return tuple(d for i, d in enumerate(self._shape) if i != self.ax), self.ax

    def _shared(self, slot, compute):
        node, chain = self, []
        while getattr(node, slot) is None and node._like is not None:
            chain.append(node)
            node = node._like
        if getattr(node, slot) is None:
            setattr(node, slot, compute(node))
        for n in chain:
            setattr(n, slot, getattr(node, slot))
        return getattr(self, slot)

    @property
    def chans(self) -> np.ndarray:
        """Sorted distinct channel ids (``np.unique(channel_of(a))``)."""
        return self._shared("_chans", lambda n: unique_channels(n.factors()[1] if n.factors() else n.a))

    @property
    def vary(self) -> list:
        """Axes along which the channel id changes (``varying_axes(a)``)."""
        def compute(n):
            f = n.factors()
            if f is not None:  # the part's own axes are the channel axes, in order
                return [f[0][k] for k in varying_axes(f[1])]
            return [] if n._chans is not None and len(n._chans) <= 1 else varying_axes(n.a)
        return self._shared("_vary", compute)


def _factored_alike(*lns) -> bool:
    """All factored along one axis with one position grid (so labels compare as their parts do)."""
    return all(v.part is not None for v in lns) and len({v.grid_key() for v in lns}) == 1


def same_labels(o, v) -> bool:
    """``o.a == v.a`` everywhere (same shape)."""
    if not isinstance(o, LN) or not isinstance(v, LN) or o.shape != v.shape:
        return False
    if o.elem is not None and v.elem is not None:
        return o.elem == v.elem
    if o.mpart is not None and v.mpart is not None and o.cax == v.cax:
        return bool(np.array_equal(o.mpart, v.mpart))
    if _factored_alike(o, v):
        return bool(np.array_equal(o.part, v.part))
    return bool(np.array_equal(o.a, v.a))


def match_labels(old: "LN", new: "LN", axis: int, what: str = "input") -> RowMatch:
    """``match_rows(old.a, new.a, axis, what)``; on the parts when both are factored along ``axis``."""
    if _factored_alike(old, new) and axis % old.ndim == old.ax:
        try:
            return match_rows(old.part, new.part, 0, what)
        except Mismatch:
            pass  # the same question on the full arrays, for the same message
    return match_rows(old.a, new.a, axis, what)


def resalt_labels(x: "LN", salt: int) -> "LN":
    """``LN(resalt(x.a, salt))`` (the salt lives in the factored part, or in ``elem``)."""
    if x.elem is not None:
        return LN.element(x.shape, x.elem[0], int(_mix(np.int64(x.elem[1]), salt)))
    f = x.factors()
    if f is not None:
        return LN.multi(x.shape, f[0], resalt(f[1], salt))
    return LN(resalt(x.a, salt), like=x)


def label_channel_ids(x: "LN", axis: int = 1):
    """``sites.channel_ids(x.a, axis)``."""
    if x.part is not None and x.ndim >= 2 and axis % x.ndim == x.ax:
        return sites.channel_ids(x.part.reshape(1, -1), 1)
    return sites.channel_ids(x.a, axis)


UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
         "Softplus", "Softsign", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil",
         "Round", "Sign", "ThresholdedRelu", "Sin", "Cos", "Clip", "Swish", "Shrink"}
PASS = {"Identity", "Dropout", "Cast", "CastLike"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # moves that keep the elements' C order
MOVE = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather",
        "Expand", "DepthToSpace", "SpaceToDepth", "Tile"}
POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Resize",
        "Upsample", "Pad"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceProd", "ReduceSumSquare", "ReduceLogSum"}
MIX = {"GroupNormalization", "LRN", "LpNormalization", "MeanVarianceNormalization"}
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
# element types numpy holds as they are (no bfloat16, float8, 4-bit or string)
PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64,
               onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
               onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass
class Updates:
    """What the apply pass changes in the model."""

    initializers: dict = field(default_factory=dict)  # (node index, input index) -> new array
    shape_slots: set = field(default_factory=set)  # slots holding shape constants (node-specific copies)
    weight_slots: set = field(default_factory=set)  # weight matrices / filters: tied when shared
    attributes: dict = field(default_factory=dict)  # node index -> {name: value}


def node_label(node, idx: int) -> str:
    return node.name or f"{node.op_type}_{idx}:{node.output[0]}"


class OnnxLabelRun(sites.LabelRunState):
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
            self.consts, self.users = analysis.consts, analysis.users
            return
        self.consts = {t.name: _read_only(numpy_helper.to_array(t)) for t in self.graph.initializer}
        self.users: dict = {}  # value name -> [(node index, input index)]
        for i, n in enumerate(self.graph.node):
            for k, name in enumerate(n.input):
                if name:
                    self.users.setdefault(name, []).append((i, k))

    # ------------------------------------------------------------ helpers
    def _fixed(self, key, shape):
        if key not in self.fixed_space:
            self.fixed_space[key] = self.table.new_space(str(key), 1, "fixed")
        sp = self.fixed_space[key]
        return LN.element(shape, sp.base, hash(key) & 0xFFFF)

    def _conflict(self, idx, node, reason):
        chans = []
        for name in node.input:
            v = self.old.get(name)
            if isinstance(v, LN):
                chans.append(v.chans)
        chans = np.unique(np.concatenate(chans)) if chans else np.zeros(0, np.int64)
        return Conflict((idx, node), chans, f"{node.op_type} node '{node_label(node, idx)}': {reason}")

    def _attrs(self, node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _salt(self, idx, k=0):
        return (idx * 4 + k + 1) & 0xFFFF

    def _label_inputs(self, node):
        return [(n, self.env[n]) for n in node.input if n and isinstance(self.env.get(n), LN)]

    def _require_unchanged(self, idx, node):
        for name, v in self._label_inputs(node):
            o = self.old.get(name)
            if not same_labels(o, v):
                raise self._conflict(idx, node, "its input changed but the op must keep it as it is")

    def _opaque(self, idx, node, reason):
        if self.analysis:
            self.opaque_nodes.add(idx)
            for _, v in self._label_inputs(node):
                self.constraints.freeze(v.chans, f"{node.op_type} node '{node_label(node, idx)}': {reason}")
            outs = []
            for k, name in enumerate(node.output):
                shape = self.shapes.get(name)
                outs.append(self._fixed((idx, k), shape) if shape is not None else None)
            return outs
        self._require_unchanged(idx, node)
        return [self.old.get(name) for name in node.output]

    def _mix(self, idx, node, x: LN, why):
        if self.analysis:
            self.constraints.freeze(x.chans, f"{node.op_type} node '{node_label(node, idx)}': {why} (mixes channels)")
            return [self._fixed((idx, k), self.shapes[n]) for k, n in enumerate(node.output)]
        self._require_unchanged(idx, node)
        return [self.old.get(name) for name in node.output]

    def _match(self, idx, node, name, new: LN, axis) -> RowMatch | None:
        old = self.old[name]
        if same_labels(old, new):
            return None
        try:
            return match_labels(old, new, axis)
        except Mismatch as exc:
            raise self._conflict(idx, node, str(exc)) from None

    def _note_roles(self, x: LN, role, name):
        if self.analysis:
            for sp in self.table.spaces_of(x.chans):
                sp.add_role(role, name)

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
                    if isinstance(v, LN):
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
            if isinstance(v, LN):
                if self.analysis:
                    self.constraints.freeze(v.chans, "reaches a model output")
                else:
                    o = self.old.get(out.name)
                    if not same_labels(o, v):
                        raise Conflict(None, o.chans, f"model output '{out.name}' changed")
        return self

    def _inputs_unchanged(self, node, vals) -> bool:
        has_label = False
        for name, v in zip(node.input, vals):
            if not name:
                continue
            o = self.old.get(name)
            if isinstance(v, LN):
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

    def _evaluate(self, node, inputs, idx):
        """Run one node with onnx's reference implementation (constants or label arrays).

        The node is wrapped in a one-node model importing the graph's opset, so the
        operator version (Split, Squeeze, Slice, ... changed over time) is the model's.
        Its inputs and outputs are renamed positionally, so that nodes alike in op, attributes
        and opset share one evaluator (nodes with subgraph attributes, which may read outer
        names, keep their own).
        """
        if any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute):
            key = ("node", id(self.model), idx, node.op_type, tuple(node.output), _attr_key(node), self.opset)
            run_node, names = node, list(node.input)
        else:
            key = ("op", self.opset, node.domain, node.op_type, tuple(at.SerializeToString() for at in node.attribute),
                   tuple(bool(n) for n in node.input), tuple(bool(n) for n in node.output))
            names = [f"i{k}" if n else "" for k, n in enumerate(node.input)]
            run_node = None
        ev = _EVALUATORS.get(key)
        if ev is None:
            if run_node is None:
                run_node = helper.make_node(node.op_type, names, [f"o{k}" if n else "" for k, n in enumerate(node.output)],
                                            domain=node.domain)
                run_node.attribute.extend(node.attribute)
            g = helper.make_graph([run_node], "one",
                                  [helper.make_value_info(n, onnx.TypeProto()) for n in dict.fromkeys(n for n in names if n)],
                                  [helper.make_value_info(n, onnx.TypeProto()) for n in run_node.output if n])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
            ev = ReferenceEvaluator(m)
            if len(_EVALUATORS) > 4096:
                _EVALUATORS.clear()
            _EVALUATORS[key] = ev
        feeds = {n: v for n, v in zip(names, inputs) if n}
        outs = ev.run(None, feeds)
        return outs + [None] * (len(node.output) - len(outs))

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
        if not any(isinstance(v, LN) for v in vals) and op not in ("Shape", "Size"):
            # constant subgraph (Constant, ConstantOfShape, Cast/Reshape of weights, shape arithmetic)
            if op == "Identity" and len(vals) == 1 and isinstance(vals[0], np.ndarray):
                out = [vals[0]]  # (no evaluator needed)
            elif (op == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"
                  and node.attribute[0].t.data_type in PLAIN_TYPES and not node.attribute[0].t.external_data):
                out = [numpy_helper.to_array(node.attribute[0].t)]
            else:
                out = self._evaluate(node, vals, idx)
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
        if op in PASS:
            if op == "Cast" and a.get("to") not in FLOAT_TYPES:
                return self._opaque(idx, node, "cast of an activation to a non-float type")
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                return self._opaque(idx, node, "dropout mask is used")
            return [x] + [None] * (len(node.output) - 1)
        if op in UNARY or op == "PRelu" and self._const(node, 1) is not None and self._const(node, 1).size == 1:
            if not isinstance(x, LN) or any(isinstance(v, LN) for v in vals[1:]):
                return self._opaque(idx, node, "a parameter input is an activation")
            return [resalt_labels(x, self._salt(idx))]
        if op == "PRelu":
            return self._binary_const(idx, node, vals, order=(0, 1))
        if op in BINARY:
            return self._binary(idx, node, vals)
        if op in ("Conv", "ConvTranspose"):
            return self._conv(idx, node, x, a)
        if op == "Gemm":
            return self._gemm(idx, node, x, a)
        if op == "MatMul":
            if isinstance(x, LN) and not isinstance(vals[1], LN) and vals[1] is not None and vals[1].ndim == 2:
                if not self._weight_ok(idx, node, [1]):
                    return self._opaque(idx, node, "its weight is computed, not a constant")
                return self._produce(idx, node, x, weight_k=1, bias_k=None, in_axis=-1, out_axis=-1, w_in=0, w_out=1)
            return self._opaque(idx, node, "matrix product of two activations")
        if op in ("BatchNormalization", "InstanceNormalization"):
            if len([o for o in node.output if o]) > 1:
                return self._opaque(idx, node, "training-mode outputs are used")
            ks = [1, 2, 3, 4] if op == "BatchNormalization" else [1, 2]
            if not self._weight_ok(idx, node, ks):
                return self._opaque(idx, node, "its parameters are computed")
            return self._carry_params(idx, node, x, ks)
        if op == "LayerNormalization":
            axis = a.get("axis", -1) % x.ndim
            va = (self.old[node.input[0]] if not self.analysis else x).vary
            if any(ax >= axis for ax in va):
                return self._mix(idx, node, x, "LayerNormalization normalizes over the channel axis")
            return [resalt_labels(x, self._salt(idx))] + [None] * (len(node.output) - 1)
        if op in MIX:
            return self._mix(idx, node, x, f"{op} normalizes across channels")
        if op in SOFTMAX:
            axis = a.get("axis", 1 if self.opset < 13 else -1) % x.ndim
            va = (self.old[node.input[0]] if not self.analysis else x).vary
            covered = [ax for ax in va if ax >= axis] if self.opset < 13 else [ax for ax in va if ax == axis]
            if covered:
                return self._mix(idx, node, x, f"{op} over the channel axis")
            return [resalt_labels(x, self._salt(idx))]
        if op in POOL:
            return self._pool(idx, node, x, a)
        if op in REDUCE:
            return self._reduce(idx, node, x, a, vals)
        if op in MOVE:
            return self._move(idx, node, vals, a)
        return self._opaque(idx, node, "this operator is not understood by the channel analysis")

    # ------------------------------------------------------------ relations
    def _binary(self, idx, node, vals):
        labels = [v for v in vals if isinstance(v, LN)]
        consts = [v for v in vals if not isinstance(v, LN)]
        if consts:
            if len(labels) != 1 or len(vals) != 2:
                return self._opaque(idx, node, "mixes several activations with constants")
            return self._binary_const(idx, node, vals, order=(0, 1) if isinstance(vals[0], LN) else (1, 0))
        try:
            out_shape = np.broadcast_shapes(*[v.shape for v in labels])
        except ValueError:
            if self.analysis:
                return self._opaque(idx, node, "operands do not broadcast")
            raise self._conflict(idx, node, "operands no longer broadcast") from None
        full = next((v for v in labels if v.shape == tuple(out_shape)), None)
        if full is None:
            return self._opaque(idx, node, "no operand has the result's shape")
        fk = next(k for k, v in enumerate(vals) if v is full)
        if self.analysis:
            for k, v in enumerate(labels):
                if v is not full:
                    if v.shape == full.shape and _factored_alike(full, v):
                        # every position pairs the same two channels: the parts' pairs are all of them
                        ca, cb = channel_of(full.part), channel_of(v.part)
                    elif len(full.chans) == 1 or len(v.chans) == 1:
                        # one side holds one channel: it pairs with every channel of the other
                        # (broadcasting only repeats v's elements over full's shape)
                        ca, cb = full.chans, v.chans
                    else:
                        ca, cb = sites.unify_pairs(full.a, v.a)
                    self.constraints.tie(ca, cb)
        else:
            of = self.old[node.input[fk]]
            for k, name in enumerate(node.input):
                if k == fk:
                    continue
                ob, nb = self.old[name], vals[k]
                if of.shape == ob.shape and full.shape == nb.shape and _factored_alike(of, ob, full, nb):
                    try:  # operand pairs compare as the pairs of their parts (one position grid)
                        sites.check_aligned(of.part, ob.part, full.part, nb.part, of.part)
                        continue
                    except Mismatch:
                        pass  # the same check on the full arrays, for the same message
                try:
                    sites.check_aligned(of.a, ob.a, full.a, nb.a, of.a)
                except Mismatch as exc:
                    raise self._conflict(idx, node, f"its operands no longer align channel by channel ({exc})") \
                        from None
        return [resalt_labels(full, self._salt(idx))]

    def _binary_const(self, idx, node, vals, order):
        """An activation combined with a constant: scalar-like, or one value per channel (gathered)."""
        xk, ck = order
        x, c = vals[xk], vals[ck]
        if c is None:
            return self._opaque(idx, node, "missing operand")
        old_x = self.old[node.input[xk]] if not self.analysis else x
        try:
            out_shape = np.broadcast_shapes(old_x.shape, c.shape)
        except ValueError:
            return self._opaque(idx, node, "operands do not broadcast")
        if tuple(out_shape) != old_x.shape:
            return self._opaque(idx, node, "the constant broadcasts the activation")
        va = old_x.vary
        cb = (1,) * (x.ndim - c.ndim) + tuple(c.shape)
        along = [ax for ax in va if cb[ax] != 1]
        if not along:
            return [resalt_labels(x, self._salt(idx))]
        if len(along) > 1 or len(va) > 1:
            return self._opaque(idx, node, "a constant varies along several channel axes")
        if not self._weight_ok(idx, node, [ck]):
            return self._opaque(idx, node, "its per-channel constant is computed")
        ax = along[0]
        self._note_roles(x, "carrier", node_label(node, idx))
        if not self.analysis:
            match = self._match(idx, node, node.input[xk], x, ax)
            if match is not None:
                if not match.unique_old:
                    raise self._conflict(idx, node, "per-channel constant on duplicated channels")
                new = ar.gather(c.reshape(cb), ax, match.source())
                self._set_const(idx, ck, new.reshape(_const_shape(c.shape, x.ndim, ax, match.n_new)))
        return [resalt_labels(x, self._salt(idx))]

    def _carry_params(self, idx, node, x: LN, ks):
        self._note_roles(x, "carrier", node_label(node, idx))
        if not self.analysis:
            match = self._match(idx, node, node.input[0], x, 1)
            if match is not None:
                if not match.unique_old:
                    raise self._conflict(idx, node, "per-channel parameters on duplicated channels")
                for k in ks:
                    c = self._const(node, k)
                    if c is not None and c.ndim >= 1 and c.shape[0] == match.n_old:
                        self._set_const(idx, k, ar.gather(c, 0, match.source()))
        return [resalt_labels(x, self._salt(idx))] + [None] * (len(node.output) - 1)

    def _pool(self, idx, node, x: LN, a):
        if len([o for o in node.output if o]) > 1:
            return self._opaque(idx, node, "pooling indices are used")
        if node.op_type == "Pad":
            pads = self._const(node, 1) if len(node.input) > 1 else np.array(a.get("pads", []))
            if pads is None:
                return self._opaque(idx, node, "pads are computed")
            r = x.ndim
            if len(pads) and (pads[1] != 0 or pads[1 + r] != 0):
                return self._opaque(idx, node, "pads the channel axis")
        seq = label_channel_ids(x, 1)
        shape = self.shapes.get(node.output[0])
        old_c = (self.old[node.input[0]] if not self.analysis else x).shape[1]
        if seq is None or shape is None or len(shape) != x.ndim or shape[1] != old_c:
            return self._opaque(idx, node, "its input channels are not on axis 1, or one channel id holds different contents")
        out_shape = (shape[0], x.shape[1]) + tuple(shape[2:])
        return [LN.channels(out_shape, 1, seq, self._salt(idx))]

    def _reduce(self, idx, node, x: LN, a, vals):
        axes = a.get("axes")
        if axes is None and len(vals) > 1 and vals[1] is not None:
            axes = [int(v) for v in np.asarray(vals[1]).ravel()]
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            return self._mix(idx, node, x, "reduces over all axes")
        axes = sorted({int(ax) % x.ndim for ax in axes})
        va = (self.old[node.input[0]] if not self.analysis else x).vary
        if set(axes) & set(va):
            return self._mix(idx, node, x, "reduces over the channel axis")
        out = x.a
        keep = a.get("keepdims", 1)
        for ax in reversed(axes):
            out = np.take(out, [0], axis=ax)
            if not keep:
                out = np.squeeze(out, axis=ax)
        return [LN(resalt(out, self._salt(idx)))]

    def _move(self, idx, node, vals, a):
        op = node.op_type
        x0 = vals[0] if vals and isinstance(vals[0], LN) else None
        # a reshape keeps the C order of the elements: it is replayed on a stand-in of the input's shape
        # (one byte per element), and element labels stay element labels of the new shape
        compact = x0 is not None and (x0.elem is not None or x0.factors() is not None)
        perm = None
        if op == "Transpose" and compact:  # (onnx's default perm reverses the axes)
            perm = [int(p) % x0.ndim for p in a["perm"]] if a.get("perm") is not None else list(range(x0.ndim))[::-1]
        reshaping = compact and (op in RESHAPES or perm is not None and _keeps_order(x0, perm))
        gathering = (op == "Gather" and compact and x0.elem is None and len(vals) > 1
                     and isinstance(vals[1], np.ndarray) and len(node.output) == 1)
        ins = []
        for k, v in enumerate(vals):
            if v is None:
                ins.append(None)
            elif isinstance(v, LN):
                ins.append(np.zeros(v.shape, np.bool_) if k == 0 and (reshaping or gathering) else v.a)
            elif op == "Concat":
                ins.append(self._fixed((idx, "const", k), v.shape).a)  # a constant joined to activations
            else:
                ins.append(v)
        run_node = node
        if not self.analysis:
            ins, run_node = self._rewrite_move(idx, node, vals, ins, a)
        try:
            outs = self._evaluate(run_node, ins, idx)
        except Exception as exc:  # noqa: BLE001
            if self.analysis:
                return self._opaque(idx, node, f"could not be replayed on channel labels ({type(exc).__name__})")
            raise self._conflict(idx, node, "cannot be replayed on the widened tensors") from None
        if reshaping or gathering:
            # the stand-in gave the output shape; a gather of constant indices along a channel axis picks parts
            out = (_reshaped(x0, np.shape(outs[0]), perm) if reshaping
                   else _gathered(x0, int(a.get("axis", 0)) % x0.ndim, ins[1], np.shape(outs[0])))
            if out is None:  # the compact form does not survive (channel and position axes mix): full labels
                ins[0] = x0.a
                outs = self._evaluate(run_node, ins, idx)
            else:
                outs = [out]
        outs = [o if isinstance(o, LN) else LN(np.asarray(o)) for o in outs]
        if self.analysis and isinstance(vals[0], LN):
            if op in ("Reshape",) and len(outs) == 1:
                for p, q in _split_axis_ties(vals[0], outs[0]):
                    self.constraints.tie(p, q)
            if op == "Slice" and self.opset >= 10 and any(n in self.dynamic for n in node.input[1:3]):
                self._chunk_ties(vals)
            if op == "Split" and len(outs) > 1 and len({o.shape for o in outs}) == 1:
                for o in outs[1:]:
                    self.constraints.tie(channel_of(outs[0].a), channel_of(o.a))
        return outs

    def _chunk_ties(self, vals):
        """A slice whose bounds are computed from the input's size (torch's chunk exported as Slice):
        in the widened graph it takes the same fraction, so the equal blocks it cuts must widen alike."""
        x = vals[0]
        starts, ends = np.asarray(vals[1]).ravel(), np.asarray(vals[2]).ravel()
        axes = np.asarray(vals[3]).ravel() if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
        for i, ax in enumerate(axes.tolist()):
            ax = ax % x.ndim
            n = x.shape[ax]
            s, e, step = slice(int(starts[i]), int(ends[i])).indices(n)
            length = e - s
            seq = channel_sequence(x.a, ax)
            if seq is None or length <= 0 or length == n or n % length or s % length:
                continue
            self.constraints.tie_blocks(seq, n // length)

    def _rewrite_move(self, idx, node, vals, ins, a):
        """Rewrite channel constants written as literals (reshape targets, split sizes, slice bounds)."""
        op = node.op_type
        x = vals[0]
        if not isinstance(x, LN):
            return ins, node
        old_in = self.old[node.input[0]]
        if same_labels(old_in, x):
            return ins, node
        if op == "Reshape" and len(node.input) > 1 and node.input[1] not in self.dynamic:
            shape = np.asarray(vals[1])
            old_out = self.old[node.output[0]]
            allowzero = a.get("allowzero", 0)
            raw = [None if (d == 0 and not allowzero) else int(d) for d in shape.tolist()]
            try:
                dims = sites.rescale_shape(raw, old_out.vary, int(np.prod(old_in.shape)), int(np.prod(x.shape)))
            except Mismatch as exc:
                raise self._conflict(idx, node, str(exc)) from None
            if dims is not None:
                new = np.array([d if d is not None else 0 for d in dims], dtype=np.int64)
                self._set_const(idx, 1, new, shape=True)
                ins[1] = new
        elif op == "Split":
            axis = a.get("axis", 0) % x.ndim
            sizes = a.get("split")
            from_input = sizes is None and len(node.input) > 1 and node.input[1]
            if from_input:
                if node.input[1] in self.dynamic:
                    return ins, node
                sizes = [int(v) for v in np.asarray(vals[1]).ravel()]
            if sizes is not None and old_in.shape[axis] != x.shape[axis]:
                src = self._source(idx, node, old_in, x, axis)
                bounds = np.cumsum([0] + list(sizes))
                nb = [self._bound(idx, node, src, int(b)) for b in bounds]
                new = [int(nb[i + 1] - nb[i]) for i in range(len(sizes))]
                if from_input:
                    self._set_const(idx, 1, np.array(new, dtype=np.int64), shape=True)
                    ins[1] = np.array(new, dtype=np.int64)
                else:
                    self.updates.attributes.setdefault(idx, {})["split"] = new
                    node = _with_attribute(node, "split", new)
        elif op == "Slice" and self.opset >= 10:
            starts, ends = np.asarray(vals[1]).copy(), np.asarray(vals[2]).copy()
            axes = np.asarray(vals[3]) if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
            steps = np.asarray(vals[4]) if len(vals) > 4 and vals[4] is not None else np.ones(len(starts), np.int64)
            changed = False
            for i, ax in enumerate(axes.tolist()):
                ax = ax % x.ndim
                if old_in.shape[ax] == x.shape[ax]:
                    continue
                if steps[i] != 1:
                    raise self._conflict(idx, node, "strided slicing of a widened axis")
                if any(n in self.dynamic for n in node.input[1:3]):
                    continue
                n_old = old_in.shape[ax]
                s, e, _ = slice(int(starts[i]), int(ends[i])).indices(n_old)
                src = self._source(idx, node, old_in, x, ax)
                starts[i], ends[i] = self._bound(idx, node, src, s), self._bound(idx, node, src, e)
                changed = True
            if changed:
                self._set_const(idx, 1, starts.astype(np.asarray(vals[1]).dtype), shape=True)
                self._set_const(idx, 2, ends.astype(np.asarray(vals[2]).dtype), shape=True)
                ins[1], ins[2] = starts, ends
        elif op == "Gather":
            axis = a.get("axis", 0) % x.ndim
            if old_in.shape[axis] != x.shape[axis]:
                raise self._conflict(idx, node, "gathers along a widened axis")
        return ins, node

    def _source(self, idx, node, old_in: LN, new_in: LN, axis):
        try:
            return match_labels(old_in, new_in, axis, "sliced input").source()
        except Mismatch as exc:
            raise self._conflict(idx, node, str(exc)) from None

    def _bound(self, idx, node, src, b):
        try:
            return sites.remap_bound(src, b)
        except Mismatch as exc:
            raise self._conflict(idx, node, str(exc)) from None

    # ------------------------------------------------------------ producers
    def _out_space(self, idx, node, size):
        if self.analysis:
            name = node_label(node, idx)
            sp = self.table.new_space(name, size, "produced")
            sp.add_role("producer", name)
            self.node_space[idx] = sp
        return self.node_space[idx]

    def _conv(self, idx, node, x: LN, a):
        w = self._const(node, 1)
        if not isinstance(x, LN) or w is None:
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

    def _gemm(self, idx, node, x: LN, a):
        if not isinstance(x, LN) or self._const(node, 1) is None or a.get("transA", 0):
            return self._opaque(idx, node, "transposed or non-constant operands")
        if not self._weight_ok(idx, node, [1, 2]):
            return self._opaque(idx, node, "its weight is computed, not a constant")
        tb = a.get("transB", 0)
        return self._produce(idx, node, x, weight_k=1, bias_k=2, in_axis=1, out_axis=1, w_in=1 if tb else 0,
                             w_out=0 if tb else 1)

    def _produce(self, idx, node, x: LN, *, weight_k, bias_k, in_axis, out_axis, w_in, w_out):
        weight = self._const(node, weight_k)
        name = node_label(node, idx)
        self._note_roles(x, "consumer", name)
        n_out = weight.shape[w_out]
        space = self._out_space(idx, node, n_out)
        shape = self.shapes[node.output[0]]
        if self.analysis:
            return [LN.channels(shape, out_axis, space.chan_ids, self._salt(idx))]
        match = self._match(idx, node, node.input[0], x, in_axis)
        mapping = self.plan.mapping(space)
        if match is not None or len(mapping) != n_out:
            self._set_const(idx, weight_k, sites.produce_weights(weight, w_in, w_out, match, mapping, self.options,
                                                                 self.rng), weight=True)
            bias = self._const(node, bias_k) if bias_k is not None else None
            if bias is not None:
                if bias.ndim >= 1 and bias.shape[-1] == n_out:
                    self._set_const(idx, bias_k, ar.gather(bias, bias.ndim - 1, mapping))
                elif bias.size != 1:
                    raise self._conflict(idx, node, "bias of an unexpected shape")
        out_shape = list(shape)
        out_shape[out_axis] = len(mapping)
        return [LN.channels(out_shape, out_axis, self.plan.new_chan_ids(space), self._salt(idx))]

    def _depthwise(self, idx, node, x: LN, w):
        self._note_roles(x, "carrier", node_label(node, idx))
        seq = label_channel_ids(x, 1)
        shape = self.shapes[node.output[0]]
        if seq is None:
            return self._opaque(idx, node, "channels of a depthwise conv input are not on axis 1")
        if not self.analysis:
            match = self._match(idx, node, node.input[0], x, 1)
            if match is not None:
                if not match.unique_old:
                    raise self._conflict(idx, node, "depthwise filters on duplicated channels")
                self._set_const(idx, 1, ar.gather(w, 0, match.source()), weight=True)
                b = self._const(node, 2)
                if b is not None:
                    self._set_const(idx, 2, ar.gather(b, 0, match.source()))
                self.updates.attributes.setdefault(idx, {})["group"] = match.n_new
        out_shape = (shape[0], len(seq)) + tuple(shape[2:])
        return [LN.channels(out_shape, 1, seq, self._salt(idx))]

    def _grouped(self, idx, node, x: LN, w, g):
        self._note_roles(x, "consumer", node_label(node, idx))
        seq = label_channel_ids(x, 1)
        if seq is None:
            return self._opaque(idx, node, "channels of a grouped conv input are not on axis 1")
        space = self._out_space(idx, node, w.shape[0])
        shape = self.shapes[node.output[0]]
        if self.analysis:
            self.constraints.tie_blocks(seq, g)
            self.constraints.tie_blocks(space.chan_ids, g)
            return [LN.channels(shape, 1, space.chan_ids, self._salt(idx))]
        mapping = self.plan.mapping(space)
        old_x = self.old[node.input[0]]
        if len(mapping) != w.shape[0] or not same_labels(old_x, x):
            try:
                new_w = sites.grouped_weights(w, g, old_x.a, x.a, 1, w.shape[0], mapping, self.options, self.rng)
            except Mismatch as exc:
                raise self._conflict(idx, node, str(exc)) from None
            self._set_const(idx, 1, new_w, weight=True)
            b = self._const(node, 2)
            if b is not None:
                self._set_const(idx, 2, ar.gather(b, 0, mapping))
        out_shape = (shape[0], len(mapping)) + tuple(shape[2:])
        return [LN.channels(out_shape, 1, self.plan.new_chan_ids(space), self._salt(idx))]


def _keeps_order(x: LN, perm: list) -> bool:
    """A transpose (``perm``: non-negative axes) of element or factored labels that moves only axes of size 1,
    and the channel axes of factored labels, keeps the order of the elements (of the other coordinates, for
    factored labels): it is a reshape for the labels."""
    cax = x.factors()[0] if x.elem is None else ()
    kept = [p for p in perm if x.shape[p] != 1 and p not in cax]
    return kept == sorted(kept)


def _blocks(src, dst):
    """The finest pairing of ``src`` and ``dst`` axes (sizes > 1) into consecutive blocks of equal size
    that a C-order reshape maps onto each other; None for shapes with a zero."""
    if 0 in src or 0 in dst:
        return None
    si = [k for k, d in enumerate(src) if d != 1]
    dj = [k for k, d in enumerate(dst) if d != 1]
    i = j = 0
    out = []
    try:
        while i < len(si) or j < len(dj):
            a, b, pa, pb = [si[i]], [dj[j]], src[si[i]], dst[dj[j]]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    a.append(si[i])
                    pa, i = pa * src[si[i]], i + 1
                else:
                    b.append(dj[j])
                    pb, j = pb * dst[dj[j]], j + 1
            out.append((a, b))
    except IndexError:
        return None
    return out


def _reshaped(x: LN, shape, perm=None) -> "LN | None":
    """``x`` reshaped (C order) to ``shape`` without building its labels: element labels always; factored
    labels when no block of the reshape mixes channel axes with position axes (the parts reshape within
    the channel blocks, the position grid within the others, so both keep their C order); else None.
    ``perm`` (non-negative axes): a transpose that :func:`_keeps_order` (the channel axes go where it puts
    them)."""
    shape = tuple(int(d) for d in shape)
    if x.elem is not None:
        return LN.element(shape, *x.elem)
    cax, part = x.factors()
    part = part.reshape([x.shape[c] for c in cax])
    if perm is not None:
        new_cax = [o for o in range(len(perm)) if perm[o] in cax]
        return LN.multi(shape, new_cax, np.transpose(part, [cax.index(perm[o]) for o in new_cax]))
    blocks = _blocks(x.shape, shape)
    if blocks is None:
        return None
    new_cax = []
    for a, b in blocks:
        kinds = {k in cax for k in a}
        if len(kinds) > 1:
            return None
        if kinds == {True}:
            new_cax += b
    return LN.multi(shape, new_cax, part.reshape([shape[c] for c in new_cax]))


def _gathered(x: LN, axis: int, index, shape) -> "LN | None":
    """Gather of constant ``index`` along channel axis ``axis`` of factored labels: the part is gathered,
    the position grid of the other axes is unchanged; None when ``axis`` holds positions."""
    cax, part = x.factors()
    index = np.asarray(index)
    n = x.shape[axis]
    if axis not in cax or index.dtype.kind not in "iu" or index.size == 0 or index.min() < -n or index.max() >= n:
        return None
    part = part.reshape([x.shape[c] for c in cax])
    k, r = cax.index(axis), index.ndim
    new_cax = [c for c in cax if c < axis] + list(range(axis, axis + r)) + [c + r - 1 for c in cax if c > axis]
    return LN.multi(shape, new_cax, np.take(part, index.astype(np.int64), axis=k))


def _split_axis_ties(x: LN, out: LN) -> list:
    """``sites.split_axis_ties(x.a, out.a)`` with the LNs' cached varying axes."""
    va = out.vary
    if len(va) < 2 or len(x.vary) >= len(va):
        return []
    return sites.block_ties(channel_of(out.bpart() if out.factors() is not None else out.a), va)


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _const_shape(shape, ndim, ax, n_new):
    """Shape of a per-channel constant after its channel axis ``ax`` (of the activation) grows."""
    lead = ndim - len(shape)
    out = list(shape)
    out[ax - lead] = n_new
    return tuple(out)


def _with_attribute(node, name, ints):
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for at in out.attribute:
        if at.name == name:
            del at.ints[:]
            at.ints.extend(int(v) for v in ints)
    return out


def _attr_key(node):
    """Attributes that can change between runs (split sizes); large tensor attributes are left out."""
    return tuple((a.name, tuple(a.ints)) for a in node.attribute if a.ints)
