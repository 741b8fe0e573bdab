"""Float64 re-checks of ONNX models (rounding or error), without torch.

A failed float32 comparison is repeated on float64 copies of both graphs (float initializers, Constant /
ConstantOfShape values, graph inputs, outputs and value_info, Cast targets: FLOAT -> DOUBLE).  onnxruntime's
CPU provider has no double kernel for Conv, ConvTranspose, AveragePool, GlobalAveragePool, HardSigmoid,
InstanceNormalization, LRN, Erf, Elu, Softplus ... (measured on onnxruntime 1.32), so when it cannot build a
session for the float64 copy the graph runs in ``onnx.reference`` (numpy; timm regnetz_b16 at 1x3x64x64:
1.2 s a batch against onnxruntime's 0.4 s).  When neither can run it, the float32 verdict stands and the
report says why.  See :mod:`graphgrow.compare` for the tolerance and how the verdict is decided.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..compare import RTOL64, CheckReport, attach_float64, make_session
from ..errors import UnsupportedModelError, first_line

__all__ = ["to_float64", "run_float64", "recheck", "rounding_of"]

# ops whose float inputs are not data of the model's precision (scales, sizes): not converted
_FIXED_TYPE_OPS = {"Resize", "Upsample"}


def _double_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float64)
    out = numpy_helper.from_array(arr, t.name)
    return out


def _convert_graph(g: onnx.GraphProto) -> None:
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_double_tensor(t))
        elif t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise UnsupportedModelError(f"initializer {t.name!r} is {TensorProto.DataType.Name(t.data_type)}")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type == TensorProto.FLOAT:
            tt.elem_type = TensorProto.DOUBLE
    for node in g.node:
        if node.op_type in _FIXED_TYPE_OPS and node.domain in ("", "ai.onnx"):
            raise UnsupportedModelError(f"{node.op_type} takes float32 scales")
        for a in node.attribute:
            if node.op_type in ("Cast", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                "EyeLike") and a.name in ("to", "dtype") and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_double_tensor(a.t))
            elif a.type == onnx.AttributeProto.GRAPH:
                _convert_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _convert_graph(sub)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of a float32 model; UnsupportedModelError when it holds what cannot be converted
    (float16/bfloat16 tensors, Resize scales)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _convert_graph(out.graph)
    return out


def _feeds64(feeds: dict) -> dict:
    return {k: (np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else v) for k, v in feeds.items()}


def run_float64(model64: onnx.ModelProto, batches: list, providers=None) -> list:
    """The outputs of ``model64`` on each batch of feeds (float32 feeds given in float64): onnxruntime when
    it has double kernels for every op, else onnx.reference."""
    feeds = [_feeds64(f) for f in batches]
    try:
        sess = make_session(model64, providers)
    except Exception:  # noqa: BLE001 - no double kernel (NOT_IMPLEMENTED): the numpy evaluator
        sess = None
    if sess is not None:
        names = {i.name for i in sess.get_inputs()}
        return [[np.asarray(o) for o in sess.run(None, {k: v for k, v in f.items() if k in names})] for f in feeds]
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model64)
    names = set(ev.input_names)
    return [[np.asarray(o) for o in ev.run(None, {k: v for k, v in f.items() if k in names})] for f in feeds]


def _as_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.ModelProto.FromString(bytes(model))
    return onnx.load(model)  # a path (external data beside it)


def rounding_of(out32: onnx.ModelProto, out64: onnx.ModelProto) -> str:
    """"" when ``out64`` is ``out32`` computed in float64: same nodes (op types, inputs, outputs), same
    initializers, the float ones within float32 eps x |value| of the double ones; else what differs."""
    a, b = out32.graph, out64.graph
    if [(n.op_type, list(n.input), list(n.output)) for n in a.node] != \
            [(n.op_type, list(n.input), list(n.output)) for n in b.node]:
        return "the graphs differ"
    ta, tb = {t.name: t for t in a.initializer}, {t.name: t for t in b.initializer}
    if set(ta) != set(tb):
        return "the initializers differ"
    eps = float(np.finfo(np.float32).eps)
    for name, t in ta.items():
        u = tb[name]
        if list(t.dims) != list(u.dims):
            return f"initializer {name!r} has dims {list(t.dims)}, not {list(u.dims)}"
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(u)
        if t.data_type == TensorProto.FLOAT and u.data_type == TensorProto.DOUBLE:
            bad = np.abs(x.astype(np.float64) - y) > np.maximum(np.abs(y) * eps, np.finfo(np.float32).tiny)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                return f"initializer {name!r}[{i}] is {x.ravel()[i]!r}, the float64 value {y.ravel()[i]!r}"
        elif t.data_type != u.data_type or not np.array_equal(x, y):
            return f"initializer {name!r} differs"
    return ""


def recheck(report: CheckReport, reference, candidate, batches: list, ref32: list | None = None, *,
            candidate64=None, providers=None, rtol64: float = RTOL64) -> CheckReport:
    """Attach the float64 re-check to a failed float32 ``report`` (in place; returns it).

    ``reference`` / ``candidate``: the float32 models (ModelProto, bytes or path); ``batches``: the feeds
    the float32 comparison used; ``ref32``: the reference's float32 outputs on them (for the floor).
    ``candidate64``: the candidate as computed in float64 (a ModelProto, or a function returning one, called
    here), by default a float64 copy of ``candidate`` (its float32 weight rounding then counts as error)."""
    if report.float32_passed:
        return report
    if any(o.note for o in report.outputs):
        report.recheck_note = "float32 outputs differ in shape or finiteness"
        return report
    try:
        ref64 = run_float64(to_float64(_as_proto(reference)), batches, providers)
    except Exception as exc:  # noqa: BLE001 - the float32 verdict stands
        report.recheck_note = f"the original does not run in float64: {first_line(exc)}"
        return report
    cand64 = None
    cast = False
    try:
        if callable(candidate64):
            candidate64 = candidate64()
        cast = candidate64 is None
        model64 = to_float64(_as_proto(candidate)) if cast else candidate64
        cand64 = run_float64(model64, batches, providers)
    except Exception as exc:  # noqa: BLE001
        report.recheck_note = f"the candidate does not run in float64: {first_line(exc)}"
    return attach_float64(report, ref64, cand64, ref32, rtol64, cast=cast)
