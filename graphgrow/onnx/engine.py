"""The ONNX widening engine: prepare, record shapes, analyse, plan, apply, rebuild, verify.

Imports onnx, onnxruntime and numpy only (never torch).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputAccumulator, make_session, random_feeds
from ..core.growth import check_factor, check_options, grow, space_reports, widen_targets
from ..core.labels import LabelOverflow, channel_of
from ..core.plan import WidenPlan
from ..core.report import GrowthReport
from ..core.sites import GrowOptions
from ..errors import InputMismatchError, InvalidArgumentError, ModelFileError, UnsupportedModelError, VerificationError
from .io import TWO_GB
from .labeling import LN, OnnxLabelRun

MIN_OPSET = 9


def _first_line(exc) -> str:
    t = str(exc).strip()
    return t.splitlines()[0] if t else type(exc).__name__


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bring very old opsets up to a version whose semantics graphgrow knows (onnx's version converter)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModelError("the model imports no default-domain opset")
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(f"opset {opset} is older than {MIN_OPSET} and onnx cannot convert it: "
                                        f"{_first_line(exc)}") from None
    return model


def graph_inputs(model) -> list:
    """Real inputs (old IR versions also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
       onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


def input_specs(model, shapes: dict | None = None) -> dict:
    """name -> (shape, dtype) for every real input; dynamic dims from ``shapes`` (by input) or 1."""
    shapes = dict(shapes or {})
    specs = {}
    known = {i.name for i in graph_inputs(model)}
    for name in shapes:
        if name not in known:
            raise InvalidArgumentError(f"--shape names {name!r}, which is not an input of the model "
                                       f"(inputs: {', '.join(sorted(known))})")
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {inp.name!r} is not a tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if inp.name in shapes:
            given = tuple(int(v) for v in shapes[inp.name])
            if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given)):
                raise InputMismatchError(f"shape {given} for input {inp.name!r} does not fit its declared shape "
                                         f"{tuple(d if d is not None else '?' for d in dims)}")
            dims = list(given)
        dims = [1 if d is None else d for d in dims]
        specs[inp.name] = (tuple(dims), np.dtype(_NP.get(tt.elem_type, np.float32)))
    return specs


class _SessionSource:
    """A model handed to onnxruntime: in memory, or through a temporary file when over 2 GB."""

    def __init__(self, model):
        self.model = model
        self.tmp = None

    def __enter__(self):
        if self.model.ByteSize() < TWO_GB:
            return self.model
        self.tmp = tempfile.TemporaryDirectory(prefix="graphgrow-")
        path = os.path.join(self.tmp.name, "model.onnx")
        onnx.save_model(self.model, path, save_as_external_data=True, location="model.onnx.data")
        return path

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def _static_shapes(inferred, model, feeds) -> dict | None:
    """Shapes from onnx shape inference when every node output gets a static one (dim_params bound by
    the feeds); None when some shape is unknown."""
    bound = {}
    for inp in graph_inputs(model):
        if inp.name in feeds:
            for d, v in zip(inp.type.tensor_type.shape.dim, feeds[inp.name].shape):
                if d.HasField("dim_param"):
                    bound[d.dim_param] = v
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.dim_param in bound:
                dims.append(bound[d.dim_param])
            else:
                break
        else:
            shapes[vi.name] = tuple(dims)
    for node in model.graph.node:
        for name in node.output:
            if name and name not in shapes:
                return None
    return shapes


def record_shapes(model, feeds: dict) -> dict:
    """Shapes of every value of the original model: from onnx shape inference when it finds them all,
    else from one onnxruntime run with every value exposed."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is a convenience here
        inferred = model
    static = _static_shapes(inferred, model, feeds)
    if static is not None:
        static.update({name: tuple(v.shape) for name, v in feeds.items()})
        return static
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in outs and name in types:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                outs.add(name)
    with _SessionSource(probe) as src:
        sess = make_session(src)
        names = [o.name for o in sess.get_outputs()]
        try:
            values = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise InputMismatchError(f"onnxruntime cannot run the model on inputs of these shapes: {_first_line(exc)}") \
                from None
    shapes = {n: tuple(np.shape(v)) for n, v in zip(names, values)}
    for name, v in feeds.items():
        shapes[name] = tuple(v.shape)
    return shapes


class OnnxAnalysis:
    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None, seed: int = 0):
        self.model = prepare(model)
        self.specs = input_specs(self.model, shapes)
        self.feeds = random_feeds(self.specs, seed)
        self.shapes = record_shapes(self.model, self.feeds)
        try:
            self.run = OnnxLabelRun(self.model, self.shapes).run({k: v[0] for k, v in self.specs.items()})
        except LabelOverflow as exc:
            raise InvalidArgumentError(f"input too large for the analysis ({exc}); pass smaller --shape values") \
                from None
        self.table = self.run.table
        self.constraints = self.run.constraints
        self.produced = self.table.produced()

    def attempt(self, plan, options):
        run = OnnxLabelRun(self.model, self.shapes, plan=plan, analysis=self.run, options=options)
        return run.run({k: v[0] for k, v in self.specs.items()})

    def upstream(self, conflict, frozen):
        """Free channels feeding the conflicting node, walking up the graph."""
        if conflict.node is None:
            return np.zeros(0, np.int64)
        idx, node = conflict.node
        producers = {}
        for i, n in enumerate(self.model.graph.node):
            for o in n.output:
                producers[o] = n
        seen, todo = set(), list(node.input)
        while todo:
            name = todo.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            v = self.run.env.get(name)
            if isinstance(v, LN):
                c = np.unique(channel_of(v.a))
                free = c[~frozen[c]]
                if len(free):
                    return free
            if name in producers:
                todo.extend(producers[name].input)
        return np.zeros(0, np.int64)


def rebuild(model: onnx.ModelProto, run: OnnxLabelRun) -> onnx.ModelProto:
    """Apply the new initializers and attributes; shared or folded constants get node-specific copies."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    inits = {t.name: t for t in g.initializer}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    declared = {i.name: i for i in g.input}
    shared_done: dict = {}
    for (idx, k), arr in sorted(run.updates.initializers.items()):
        node = g.node[idx]
        name = node.input[k]
        old = inits.get(name)
        orig = run.env.get(name) if isinstance(run.env.get(name), np.ndarray) else None
        dtype = numpy_helper.to_array(old).dtype if old is not None else (orig.dtype if orig is not None else arr.dtype)
        tensor = numpy_helper.from_array(np.ascontiguousarray(np.asarray(arr).astype(dtype)))
        node_specific = (idx, k) not in run.updates.weight_slots
        if old is not None and uses.get(name, 0) == 1:
            tensor.name = name
            old.CopyFrom(tensor)
            if name in declared:  # old IR: the initializer is also a graph input
                vi = onnx.helper.make_tensor_value_info(name, old.data_type, list(arr.shape))
                declared[name].CopyFrom(vi)
        elif not node_specific and uses.get(name, 0) > 1:
            # every user got the same new value (checked by the label run): one shared tensor again
            if name not in shared_done:
                tensor.name = f"{name}__graphgrow"
                g.initializer.append(tensor)
                shared_done[name] = tensor.name
            node.input[k] = shared_done[name]
        else:
            tensor.name = f"{name}__graphgrow_{idx}_{k}"
            g.initializer.append(tensor)
            node.input[k] = tensor.name
    if new.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        listed = {i.name for i in g.input}
        for t in g.initializer:
            if t.name not in listed:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for idx, attrs in run.updates.attributes.items():
        node = g.node[idx]
        for at in node.attribute:
            if at.name in attrs:
                v = attrs[at.name]
                if isinstance(v, (list, tuple)):
                    del at.ints[:]
                    at.ints.extend(int(x) for x in v)
                else:
                    at.i = int(v)
    # shapes recorded for the original no longer hold (onnx.shape_inference can add them back)
    del g.value_info[:]
    return new


def verify(reference, candidate, specs: dict, *, batches=3, seed=0, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL,
           providers=None, feeds=None):
    """Run both models in onnxruntime on the same random batches and compare every output."""
    with _SessionSource(reference) as a, _SessionSource(candidate) as b:
        s_ref, s_cand = make_session(a, providers), make_session(b, providers)
        names = [o.name for o in s_ref.get_outputs()]
        acc = OutputAccumulator(names, atol, rtol)
        for k in range(batches):
            f = feeds if (k == 0 and feeds is not None) else random_feeds(specs, seed + 1000 + k)
            acc.add(s_ref.run(None, f), s_cand.run(None, f))
        return acc.report("onnxruntime", s_ref.get_providers())


def count_params(model) -> int:
    consts = set()
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                         "Add", "Mul", "PRelu", "LayerNormalization"):
            consts.update(n.input[1:])
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.name in consts))


def widen_model(model: onnx.ModelProto, factor: float | None = 1.41, *, widths=None, only=None, exclude=None,
                divisor: int = 1, init: str = "net2net", noise: float = 0.0, noise_mode: str = "exact", seed: int = 0,
                shapes: dict | None = None, check: bool = True, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, batches=3,
                providers=None, progress=None):
    """Net2WiderNet on an ONNX model; returns ``(widened ModelProto, GrowthReport)``."""
    factor = check_factor(factor, widths)
    check_options(init, noise_mode, divisor, noise)
    say = progress or (lambda s: None)
    say("analysing channel spaces ...")
    an = OnnxAnalysis(model, shapes, seed)
    targets = widen_targets(an.produced, an.constraints, factor, widths, only, exclude, divisor, what="producer node")
    options = GrowOptions(noise=noise, noise_mode=noise_mode, init=init, seed=seed)
    say("planning and rewriting ...")
    plan, run, rounds = grow(an.constraints, targets, seed, lambda p: an.attempt(p, options), an.upstream, say)
    out = rebuild(an.model, run)
    preserving = init == "net2net" and not (noise > 0 and noise_mode == "paper")
    report = GrowthReport(space_reports(an.produced, plan, targets), params_before=count_params(an.model),
                          params_after=count_params(out), function_preserving=preserving, rounds=rounds)
    try:
        if out.ByteSize() < TWO_GB:
            onnx.checker.check_model(out)  # (no full check: shapes were verified by the label runs)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"the rewritten model fails the ONNX checker: {_first_line(exc)}") from None
    if check and preserving:
        say("verifying in onnxruntime ...")
        rep = verify(an.model, out, an.specs, batches=batches, seed=seed, atol=atol, rtol=rtol, providers=providers,
                     feeds=an.feeds)
        report.check = rep
        if not rep.passed:
            w = rep.worst
            raise VerificationError(f"widened model is not equivalent: output {w.name!r} differs by max_rel "
                                    f"{w.max_rel:.3g} (max_abs {w.max_abs:.3g})", report=report)
    return out, report


def analyze_model(model: onnx.ModelProto, shapes: dict | None = None) -> tuple:
    """``(GrowthReport, OnnxAnalysis)`` without changing anything."""
    an = OnnxAnalysis(model, shapes)
    report = GrowthReport(space_reports(an.produced, WidenPlan.identity(an.table)),
                          params_before=count_params(an.model), params_after=count_params(an.model))
    for s in report.spaces:
        if s.frozen_reasons == ["not selected for widening"]:
            s.frozen_reasons = []
    return report, an


__all__ = ["widen_model", "analyze_model", "verify", "input_specs", "ModelFileError"]
