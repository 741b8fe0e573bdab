"""The ONNX widening engine: prepare, record shapes, analyse, plan, apply, rebuild, verify.

Imports onnx, onnxruntime and numpy only (never torch).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import numpy as np
import onnx
from onnx import numpy_helper

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputAccumulator, make_session, random_feeds
from ..core.growth import (check_factor, check_options, grow, require_head_widths, require_reachable, space_reports,
                           widen_targets)
from ..core.labels import LabelOverflow
from ..core.plan import WidenPlan
from ..core.report import GrowthReport
from ..core.sites import GrowOptions
from ..errors import (InputMismatchError, InvalidArgumentError, ModelFileError, UnsupportedModelError, VerificationError,
                      first_line, require_equivalent)
from . import io as _io
from .io import copy_fields, light_model
from ..core.label_tensor import LabelTensor
from ..core.relations import free_upstream
from .labeling import OnnxLabelRun
from .ops import PLAIN_TYPES

MIN_OPSET = 9


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
                                        f"{first_line(exc)}") from None
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
            raise InvalidArgumentError(f"a shape is given for {name!r}, which is not an input of the model "
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
    """A model handed to onnxruntime: a file path or bytes as they are; a ModelProto in memory, or
    through a temporary file when over 2 GB."""

    def __init__(self, model):
        self.model = model
        self.tmp = None

    def __enter__(self):
        if isinstance(self.model, (bytes, str, os.PathLike)) or _io.serialized_size_below(self.model):
            return self.model
        self.tmp = tempfile.TemporaryDirectory(prefix="graphgrow-")
        path = os.path.join(self.tmp.name, "model.onnx")
        onnx.save_model(self.model, path, save_as_external_data=True, location="model.onnx.data")
        return path

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def check_rewritten(model: onnx.ModelProto, what: str = "rewritten") -> None:
    """The ONNX checker on what a rewrite wrote: the graph, its nodes, attributes and small constants.

    The large float weights are left out (:func:`~graphgrow.onnx.io.light_model`), which saves serializing and parsing
    them once more on onnx's C++ side: the ones a rewrite wrote are complete by construction
    (:func:`_fill_tensor` takes their dims and bytes from one array), the others are the input's,
    checked when it was loaded.  Works for models over 2 GB too."""
    try:
        onnx.checker.check_model(light_model(model))
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"the {what} model fails the ONNX checker: {first_line(exc)}") from None


class RecordedShapes(dict):
    """value name -> shape of the original model on the example inputs.

    Filled from onnx shape inference; a value whose shape inference leaves unknown is asked of
    onnxruntime (one run of the original with those values exposed) the first time a shape that is
    missing is looked up; label runs that never need it never pay for that run."""

    def __init__(self, static: dict, probe):
        super().__init__(static)
        self._probe = probe
        self.probed = probe is None

    def _fill(self):
        if not self.probed:
            self.probed = True
            for name, shape in self._probe().items():
                self.setdefault(name, shape)

    def __missing__(self, key):
        self._fill()
        return dict.__getitem__(self, key) if dict.__contains__(self, key) else super().__missing__(key)

    def get(self, key, default=None):
        if not dict.__contains__(self, key):
            self._fill()
        return dict.get(self, key, default)


def _inferred_shapes(inferred, model, feeds) -> dict:
    """Static shapes found by onnx shape inference (dim_params bound by the feeds)."""
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
    return shapes


def _value_types(inferred) -> dict:
    return {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}


def probe_values(model, feeds: dict, names, types: dict | None = None, providers=None) -> dict:
    """name -> value of every output of one onnxruntime run of ``model`` on ``feeds`` with the values
    ``names`` exposed as outputs too.  ``types``: their element types (else from onnx shape inference on
    the model without its large weights; onnxruntime accepts undefined ones)."""
    if types is None:
        try:
            types = _value_types(onnx.shape_inference.infer_shapes(light_model(model)))
        except Exception:  # noqa: BLE001 - types only help onnxruntime
            types = {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = {o.name for o in probe.graph.output}
    for name in names:
        if name and name not in outs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 0), None))
            outs.add(name)
    with _SessionSource(probe) as src:
        sess = make_session(src, providers)
        out_names = [o.name for o in sess.get_outputs()]
        try:
            values = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise InputMismatchError(f"onnxruntime cannot run the model on inputs of these shapes: {first_line(exc)}") \
                from None
    return dict(zip(out_names, values))


def record_shapes(model, feeds: dict) -> RecordedShapes:
    """Shapes of every value of the original model: from onnx shape inference (on the model without
    its large weights), and from one onnxruntime run for the values whose shape it leaves unknown,
    done only if one of them is looked up."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light_model(model), data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is a convenience here
        inferred = model
    static = _inferred_shapes(inferred, model, feeds)
    static.update({name: tuple(v.shape) for name, v in feeds.items()})
    missing = {name for node in model.graph.node for name in node.output if name and name not in static}
    if not missing:
        return RecordedShapes(static, None)
    types = _value_types(inferred)
    # (values without a known type are not tensors we can expose)
    exposed = [n for node in model.graph.node for n in node.output if n in missing and n in types]
    return RecordedShapes(static, lambda: {n: tuple(np.shape(v))
                                           for n, v in probe_values(model, feeds, exposed, types).items()})


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
        producers = {o: n for n in self.model.graph.node for o in n.output}

        def parents(name):
            return list(producers[name].input) if name in producers else []

        def labels_of(name):
            v = self.run.env.get(name) if name else None
            return [v] if isinstance(v, LabelTensor) else []

        return free_upstream(list(conflict.node[1].input), parents, labels_of, frozen)


# element types whose raw_data is the numpy array's bytes (little-endian)
_RAW_TYPES = {t: onnx.helper.tensor_dtype_to_np_dtype(t) for t in PLAIN_TYPES}


def _fill_tensor(t, name: str, arr, old, orig) -> None:
    """Write ``arr`` into the empty TensorProto ``t``, in the element type of the tensor it replaces."""
    arr = np.asarray(arr)
    if old is not None and old.data_type in _RAW_TYPES and sys.byteorder == "little":
        # what numpy_helper.from_array writes, without its intermediate tensor and copy
        t.name = name
        t.data_type = old.data_type
        t.dims.extend(arr.shape)  # (dims and bytes from one array: complete by construction)
        t.raw_data = np.ascontiguousarray(arr, dtype=_RAW_TYPES[old.data_type]).tobytes()
        return
    dtype = numpy_helper.to_array(old).dtype if old is not None else (orig.dtype if orig is not None else arr.dtype)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype)), name))


def rebuild(model: onnx.ModelProto, run: OnnxLabelRun) -> onnx.ModelProto:
    """Apply the new initializers and attributes; shared or folded constants get node-specific copies.

    The new model is assembled field by field: initializers that change are written once, in place
    of the old ones (never copied first and overwritten)."""
    src = model.graph
    inits = {t.name: t for t in src.initializer}
    uses = {}
    for n in src.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    in_place: dict = {}  # initializer name -> (array, orig)
    added: list = []  # (new name, array, old tensor, orig)
    renamed: list = []  # (node index, input index, new name)
    shared_done: dict = {}
    weight_users: dict = {}  # initializer name -> how many of its uses are rewritten weight slots
    for (idx, k) in run.updates.weight_slots:
        name = src.node[idx].input[k]
        weight_users[name] = weight_users.get(name, 0) + 1
    same_everywhere = _rewritten_alike(src, run.updates.initializers, uses)
    for (idx, k), arr in sorted(run.updates.initializers.items()):
        name = src.node[idx].input[k]
        old = inits.get(name)
        orig = run.env.get(name) if isinstance(run.env.get(name), np.ndarray) else None
        node_specific = (idx, k) not in run.updates.weight_slots
        if old is not None and (uses.get(name, 0) == 1 or not node_specific and weight_users.get(name) == uses[name]
                                or name in same_everywhere):
            # its only use, or every use a weight that got this same value (a tied weight), or every use the same
            # value (a mask several layers add): rewritten in place
            in_place[name] = (arr, orig)
        elif (not node_specific or name in same_everywhere) and uses.get(name, 0) > 1:
            # every user got the same new value (checked by the label run, or equal): one shared tensor again
            if name not in shared_done:
                shared_done[name] = f"{name}__graphgrow"
                added.append((shared_done[name], arr, old, orig))
            renamed.append((idx, k, shared_done[name]))
        else:
            added.append((f"{name}__graphgrow_{idx}_{k}", arr, old, orig))
            renamed.append((idx, k, added[-1][0]))
    new = onnx.ModelProto()
    copy_fields(new, model, skip=("graph",))
    g = new.graph
    copy_fields(g, src, skip=("initializer", "value_info"))  # recorded shapes no longer hold
    for t in src.initializer:
        if t.name in in_place:
            arr, orig = in_place[t.name]
            _fill_tensor(g.initializer.add(), t.name, arr, t, orig)
        else:
            g.initializer.add().CopyFrom(t)  # (faster than append in upb)
    for name, arr, old, orig in added:
        _fill_tensor(g.initializer.add(), name, arr, old, orig)
    for idx, k, name in renamed:
        g.node[idx].input[k] = name
    declared = {i.name: i for i in g.input}
    for name, (arr, _) in in_place.items():
        if name in declared:  # old IR: the initializer is also a graph input
            vi = onnx.helper.make_tensor_value_info(name, inits[name].data_type, list(np.shape(arr)))
            declared[name].CopyFrom(vi)
    if new.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        listed = {i.name for i in g.input}
        for t in g.initializer:
            if t.name not in listed:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for idx, attrs in run.updates.attributes.items():
        node = g.node[idx]
        for name, v in attrs.items():
            at = next((a for a in node.attribute if a.name == name), None)
            if at is None:
                node.attribute.append(onnx.helper.make_attribute(name, v))
            elif isinstance(v, (list, tuple)):
                del at.ints[:]
                at.ints.extend(int(x) for x in v)
            elif isinstance(v, float):
                at.f = v
            else:
                at.i = int(v)
    if run.mean_scales:
        _scale_means(model, g, run.mean_scales)
    # shapes recorded for the original no longer hold (onnx.shape_inference can add them back)
    del g.value_info[:]
    drop_orphans(src, g)
    return new


def _rewritten_alike(src, initializers: dict, uses: dict) -> set:
    """Names of shared constants that every use rewrote to one same value (a mask or bias several layers add,
    gathered alike for each): rewritten once, in place, instead of a copy per use."""
    values: dict = {}
    for (idx, k), arr in initializers.items():
        values.setdefault(src.node[idx].input[k], []).append(np.asarray(arr))
    return {name for name, arrs in values.items() if len(arrs) > 1 and len(arrs) == uses.get(name, 0)
            and all(a.shape == arrs[0].shape and a.dtype == arrs[0].dtype and np.array_equal(a, arrs[0])
                    for a in arrs[1:])}


def _live(graph) -> tuple:
    """Indices of the nodes an output of ``graph`` depends on, and every value name they read."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    todo = [o.name for o in graph.output]
    nodes, read = set(), set(todo)
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in nodes:
            continue
        nodes.add(i)
        for name in graph.node[i].input:
            if name and name not in read:
                read.add(name)
                todo.append(name)
    return nodes, read


def drop_orphans(src, g) -> None:
    """Remove from the rewritten graph ``g`` what the rewrite orphaned: nodes that computed a constant a new
    initializer replaced (a folded position table, a shared constant copied per user) and initializers no longer
    read.  What was already unused in the original ``src`` stays; graphs with subgraphs are left as they are
    (their bodies may read outer names)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return
    live_old, read_old = _live(src)
    live_new, read_new = _live(g)
    dead = [i for i in range(len(g.node)) if i in live_old and i not in live_new]
    for i in reversed(dead):
        del g.node[i]
    inputs = {i.name for i in g.input}  # (old IR: an initializer listed as an input stays one)
    for i in reversed(range(len(g.initializer))):
        name = g.initializer[i].name
        if name in read_old and name not in read_new and name not in inputs:
            del g.initializer[i]


def _scale_means(model: onnx.ModelProto, g, scales: dict) -> None:
    """Multiply the outputs of the ReduceMean nodes ``scales`` names (node index -> factor): a mean over a stream
    fill + rescale widened, back to the mean over the original channels (docs/maths.md §5)."""
    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(light_model(model)).graph.value_info}
    nodes = list(g.node)
    out = []
    for idx, node in enumerate(nodes):
        out.append(node)
        if idx not in scales:
            continue
        name = node.output[0]
        node.output[0] = f"{name}__graphgrow_unscaled"
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types.get(name, onnx.TensorProto.FLOAT))
        const = f"{name}__graphgrow_scale"
        g.initializer.append(numpy_helper.from_array(np.asarray(scales[idx], dtype=dtype), const))
        out.append(onnx.helper.make_node("Mul", [node.output[0], const], [name], name=f"{node.name}__graphgrow_scale"))
    del g.node[:]
    g.node.extend(out)


class ReferenceRun:
    """The original model's outputs on the verification batches, computed by onnxruntime in a background
    thread, so that the rewrite overlaps the reference's session build and inference (onnxruntime's C++
    work runs without the GIL; vit_b_16 widen + check: 6.5 s sequential, 5.2-6.0 s overlapped).
    :meth:`result` waits for it.

    The batches are ``feeds`` (when given) and then ``random_feeds(specs, seed + 1000 + k)``."""

    def __init__(self, reference, specs: dict, *, batches=3, seed=0, providers=None, feeds=None, background=True):
        self.reference, self.providers_asked = reference, providers
        self.batches = [feeds if (k == 0 and feeds is not None) else random_feeds(specs, seed + 1000 + k)
                        for k in range(batches)]
        self.shapes = ", ".join(f"{name} {'x'.join(str(d) for d in shape)}" for name, (shape, _) in specs.items())
        self.names = self.outputs = self.providers = None
        self._error = None
        self._thread = threading.Thread(target=self._run, name="graphgrow-reference", daemon=True)
        if background:
            self._thread.start()
        else:
            self._run()

    def _run(self):
        try:
            with _SessionSource(self.reference) as src:
                sess = make_session(src, self.providers_asked)
                self.names = [o.name for o in sess.get_outputs()]
                self.providers = sess.get_providers()
                outputs = []
                for f in self.batches:
                    try:
                        outputs.append(sess.run(None, f))
                    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
                        raise InputMismatchError(f"onnxruntime cannot run the original model on inputs of shape "
                                                 f"{self.shapes} (set them with --shape): {first_line(exc)}") from None
                self.outputs = outputs
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def result(self) -> "ReferenceRun":
        self.wait()
        if self._error is not None:
            raise self._error
        return self


def verify(reference, candidate, specs: dict, *, batches=3, seed=0, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL,
           providers=None, feeds=None, reference_run: ReferenceRun | None = None, float64: bool = True,
           candidate64=None):
    """Run both models in onnxruntime on the same random batches and compare every output.

    ``reference_run``: the reference's outputs already being computed (see :class:`ReferenceRun`; then
    ``reference``, ``batches``, ``seed`` and ``feeds`` are its).  The original failing to run is bad
    input (:class:`InputMismatchError`); the rewritten one failing where the original runs is a failed
    verification (:class:`VerificationError`).  A failed float32 comparison is re-checked in float64 when
    ``float64`` (see :mod:`graphgrow.onnx.precision`; ``candidate64``: the rewrite computed in float64, a
    ModelProto or a function returning one)."""
    ref = reference_run or ReferenceRun(reference, specs, batches=batches, seed=seed, providers=providers,
                                        feeds=feeds, background=False)
    ref.result()
    with _SessionSource(candidate) as b:
        try:
            s_cand = make_session(b, providers)
        except ModelFileError as exc:
            raise VerificationError(f"onnxruntime cannot load the rewritten model: {exc}") from None
        acc = OutputAccumulator(ref.names, atol, rtol)
        for f, ref_out in zip(ref.batches, ref.outputs):
            try:
                cand_out = s_cand.run(None, f)
            except Exception as exc:  # noqa: BLE001
                raise VerificationError(f"onnxruntime cannot run the rewritten model where the original runs: "
                                        f"{first_line(exc)}") from None
            acc.add(ref_out, cand_out)
        rep = acc.report("onnxruntime", ref.providers)
    if float64 and not rep.float32_passed:
        from .precision import recheck

        recheck(rep, ref.reference, candidate, ref.batches, ref.outputs, candidate64=candidate64,
                providers=ref.providers_asked)
    return rep


def count_params(model) -> int:
    """Parameters of an ONNX model: the elements of the initializers that parameterized ops (conv, linear,
    normalization, per-channel scale/shift, PRelu) read as weights; one definition for every report."""
    consts = set()
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                         "Add", "Mul", "PRelu", "LayerNormalization"):
            consts.update(n.input[1:])
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.name in consts))


def widen_model(model: onnx.ModelProto, factor: float | None = 1.41, *, widths=None, only=None, exclude=None,
                divisor: int = 1, init: str = "net2net", noise: float = 0.0, noise_mode: str = "exact", seed: int = 0,
                shapes: dict | None = None, check: bool = True, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, batches=3,
                providers=None, progress=None, fill: bool = True, strict: bool = False):
    """Net2WiderNet on an ONNX model; returns ``(widened ModelProto, GrowthReport)``."""
    out, report, _ = widen_model_serialized(
        model, factor, widths=widths, only=only, exclude=exclude, divisor=divisor, init=init, noise=noise,
        noise_mode=noise_mode, seed=seed, shapes=shapes, check=check, atol=atol, rtol=rtol, batches=batches,
        providers=providers, progress=progress, fill=fill, strict=strict)
    return out, report


def widen_model_serialized(model: onnx.ModelProto, factor: float | None = 1.41, *, widths=None, only=None,
                           exclude=None, divisor: int = 1, init: str = "net2net", noise: float = 0.0,
                           noise_mode: str = "exact", seed: int = 0, shapes: dict | None = None, check: bool = True,
                           atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, batches=3, providers=None, progress=None,
                           reference=None, fill: bool = True, strict: bool = False):
    """:func:`widen_model`, also returning the widened model serialized (the bytes onnxruntime
    verified; None for models over 2 GB), so that a caller writing it to a file does not serialize
    it again.

    ``reference``: the path of a binary ONNX file holding ``model`` (the file it was loaded from),
    for onnxruntime to load the original from instead of serializing ``model`` again; ignored when
    the model had to be converted to a newer opset first."""
    factor = check_factor(factor, widths)
    check_options(init, noise_mode, divisor, noise)
    say = progress or (lambda s: None)
    say("analysing channel spaces ...")
    an = OnnxAnalysis(model, shapes, seed)
    targets = widen_targets(an.produced, an.constraints, factor, widths, only, exclude, divisor, what="producer node")
    options = GrowOptions(noise=noise, noise_mode=noise_mode, init=init, seed=seed)
    preserving = init == "net2net" and not (noise > 0 and noise_mode == "paper")
    reference_run = None
    if check and preserving:  # the original's outputs, computed while the rewrite runs
        ref = reference if reference is not None and an.model is model else an.model
        reference_run = ReferenceRun(ref, an.specs, batches=batches, seed=seed, providers=providers, feeds=an.feeds)
    try:
        say("planning and rewriting ...")
        fill = bool(fill) and init == "net2net"
        plan, run, rounds = grow(an.constraints, targets, seed, lambda p: an.attempt(p, options), an.upstream, say,
                                 fill=fill)
        if strict:
            require_reachable(an.produced, plan, targets)
        require_head_widths(an.produced, plan, an.constraints, widths)
        out = rebuild(an.model, run)
        report = GrowthReport(space_reports(an.produced, plan, targets), params_before=count_params(an.model),
                              params_after=count_params(out), function_preserving=preserving, rounds=rounds)
        check_rewritten(out)  # (no full check: shapes were verified by the label runs)
        data = out.SerializeToString() if _io.serialized_size_below(out) else None
    except BaseException:
        if reference_run is not None:  # no onnxruntime work left running behind a refusal
            reference_run.wait()
        raise
    if reference_run is not None:
        say("verifying in onnxruntime ...")
        def widen64():  # the same widening computed in float64 (same plan, same draws), checked to be `out`
            from .precision import rounding_of, to_float64

            out64, _ = widen_model(to_float64(an.model), factor, widths=widths, only=only, exclude=exclude,
                                   divisor=divisor, init=init, noise=noise, noise_mode=noise_mode, seed=seed,
                                   shapes=shapes, check=False, fill=fill)
            problem = rounding_of(out, out64)
            if problem:
                raise VerificationError(f"the float64 widening is not the float32 one up to rounding: {problem}")
            return out64

        rep = verify(None, out if data is None else data, an.specs, atol=atol, rtol=rtol, providers=providers,
                     reference_run=reference_run, candidate64=widen64)
        report.check = rep
        try:
            require_equivalent(rep, "widened", report)
        except VerificationError as exc:
            if not plan.fills:
                raise
            # fill + rescale assumed what the new channels hold; where the numbers disagree, keep those streams
            out, report, data = widen_model_serialized(
                model, factor, widths=widths, only=only, exclude=exclude, divisor=divisor, init=init, noise=noise,
                noise_mode=noise_mode, seed=seed, shapes=shapes, check=check, atol=atol, rtol=rtol, batches=batches,
                providers=providers, progress=progress, reference=reference, fill=False, strict=strict)
            report.notes.append(f"fill + rescale did not verify ({first_line(exc)}); normalized streams kept "
                                "their width")
    return out, report, data


def analyze_model(model: onnx.ModelProto, shapes: dict | None = None) -> tuple:
    """``(GrowthReport, OnnxAnalysis)`` without changing anything."""
    an = OnnxAnalysis(model, shapes)
    report = GrowthReport(space_reports(an.produced, WidenPlan.identity(an.table, an.constraints)),
                          params_before=count_params(an.model), params_after=count_params(an.model))
    for s in report.spaces:
        if s.frozen_reasons == ["not selected for widening"]:
            s.frozen_reasons = []
    return report, an


__all__ = ["widen_model", "analyze_model", "verify", "input_specs", "ModelFileError"]
