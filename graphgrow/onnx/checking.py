"""Do two ONNX models compute the same function?  (The library behind ``graphgrow check``.)

Both models are run in onnxruntime on the same inputs (optional given arrays as the first batch, then
seeded random batches) and their outputs are compared by position with
:func:`graphgrow.compare.compare_outputs` semantics.  Dynamic dimensions are 1 unless ``shapes`` gives the
full shape of that input (with given arrays, their shapes are used for all batches instead); a named
dimension set that way for one input also applies to other inputs that use the same name.

This module imports numpy, onnx and onnxruntime only -- never torch.  The public entry point is
:func:`graphgrow.onnx.check`; :func:`check_models` here returns the plain report and the input shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputAccumulator, make_session, random_feeds, resolve_providers
from ..errors import GraphGrowError, InputMismatchError, InvalidArgumentError, UnsupportedModelError, first_line
from .source import model_source

DEFAULT_BATCHES = 3

__all__ = ["check_models", "check_batches", "shape_dict", "DEFAULT_BATCHES"]


# --------------------------------------------------------------------------------------------------------------------
# model signatures
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _InputSpec:
    name: str
    elem_type: int
    shape: tuple | None  # None = unknown rank; dims are int (static) or str/None (dynamic)


def _np_dtype(elem_type: int, name: str) -> np.dtype:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001
        raise UnsupportedModelError(f"input {name!r} has ONNX element type {elem_type}, which graphgrow check "
                                    f"cannot feed") from None


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def _graph_inputs(model, label: str) -> list:
    init = {t.name for t in model.graph.initializer} | {t.name for t in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in init:
            continue  # old exporters list weights as inputs
        if vi.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedModelError(f"{label} input {vi.name!r} is not a tensor "
                                        f"({vi.type.WhichOneof('value')}); graphgrow check feeds tensors only")
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(_InputSpec(vi.name, int(tt.elem_type), shape))
    return specs


def _fmt_shape(shape) -> str:
    if shape is None:
        return "unknown rank"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def _merge_inputs(ref: list, cand: list) -> list:
    """Check that both models take the same inputs; returns merged specs (reference order)."""
    rn, cn = [s.name for s in ref], [s.name for s in cand]
    if set(rn) != set(cn):
        only_r = [n for n in rn if n not in set(cn)]
        only_c = [n for n in cn if n not in set(rn)]
        parts = []
        if only_r:
            parts.append("only the reference has " + ", ".join(repr(n) for n in only_r))
        if only_c:
            parts.append("only the candidate has " + ", ".join(repr(n) for n in only_c))
        raise InputMismatchError(f"the models' inputs differ: {'; '.join(parts)}")
    cmap = {s.name: s for s in cand}
    bad_types = [f"{r.name!r} ({_type_name(r.elem_type)} vs {_type_name(cmap[r.name].elem_type)})"
                 for r in ref if r.elem_type != cmap[r.name].elem_type]
    if bad_types:
        raise InputMismatchError(f"the models' input types differ: {', '.join(bad_types)} (reference vs candidate)")
    merged = []
    for r in ref:
        c = cmap[r.name]
        if r.shape is None or c.shape is None:
            merged.append(_InputSpec(r.name, r.elem_type, r.shape if c.shape is None else c.shape))
            continue
        bad = len(r.shape) != len(c.shape)
        dims = []
        if not bad:
            for a, b in zip(r.shape, c.shape):
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    bad = True
                    break
                dims.append(a if isinstance(a, int) else b if isinstance(b, int) else (a or b))
        if bad:
            raise InputMismatchError(f"the models' input {r.name!r} has incompatible shapes: reference "
                                     f"{_fmt_shape(r.shape)}, candidate {_fmt_shape(c.shape)}")
        merged.append(_InputSpec(r.name, r.elem_type, tuple(dims)))
    return merged


def _fits(spec: _InputSpec, shape: tuple) -> bool:
    if spec.shape is None:
        return True
    return len(shape) == len(spec.shape) and all(not isinstance(d, int) or d == s for d, s in zip(spec.shape, shape))


def _read_npz(path: str) -> dict:
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"inputs file {path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgumentError(f"inputs file {path} is not a readable .npz file: {first_line(exc)}") from None
    if not hasattr(z, "files"):
        raise InvalidArgumentError(f"inputs file {path} holds a single array; save the inputs with "
                                   f"numpy.savez(path, NAME=array, ...) keyed by input name")
    try:
        with z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgumentError(f"inputs file {path} is not a readable .npz file: {first_line(exc)}") from None


def _input_arrays(inputs, specs: list) -> dict:
    """The first batch: ``inputs`` (an .npz path or a mapping of input name to array) checked against ``specs``."""
    if isinstance(inputs, (str, os.PathLike)):
        what = f"inputs file {os.fspath(inputs)}"
        arrays = _read_npz(os.fspath(inputs))
    elif isinstance(inputs, Mapping):
        what = "inputs"
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        raise InvalidArgumentError(f"inputs must be the path of an .npz file or a mapping of input name to array, "
                                   f"not {type(inputs).__name__}")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(repr(n) for n in missing))
        if extra:
            parts.append("unknown " + ", ".join(repr(n) for n in extra))
        expected = ", ".join(repr(n) for n in names)
        raise InputMismatchError(f"{what} do not match the model inputs ({expected}): {'; '.join(parts)}")
    for s in specs:
        a = arrays[s.name]
        want = _np_dtype(s.elem_type, s.name)
        if a.dtype != want:
            raise InputMismatchError(f"{what}: array {s.name!r} has dtype {a.dtype}, the model expects {want}")
        if not _fits(s, a.shape):
            raise InputMismatchError(f"{what}: array {s.name!r} has shape {list(a.shape)}, the model expects "
                                     f"{_fmt_shape(s.shape)}")
    return arrays


def shape_dict(shapes) -> dict:
    """``shapes`` (None or a mapping of input name to shape) as ``{name: tuple of ints}``; InvalidArgumentError
    for anything else."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise InvalidArgumentError(f"shapes must be a mapping of input name to shape, not {type(shapes).__name__}")
    out = {}
    for name, shape in shapes.items():
        try:
            dims = tuple(shape)
            ok = all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims)
        except TypeError:
            ok = False
        if not isinstance(name, str) or not ok:
            raise InvalidArgumentError(f"shapes must map input names to tuples of non-negative integers, not "
                                       f"{name!r}: {shape!r}")
        out[name] = tuple(int(d) for d in dims)
    return out


def _resolve_shapes(specs: list, given: Mapping, arrays: Mapping | None) -> dict:
    """Concrete shape of every input: ``given``, else the given array's, else static dims with dynamic ones = 1
    (or the value that another input's given shape / array gave the same named dimension)."""
    by_name = {s.name: s for s in specs}
    for name, shape in given.items():
        text = f"{name}={'x'.join(map(str, shape))}"
        if name not in by_name:
            raise InvalidArgumentError(f"shape {text}: the models have no input {name!r} (inputs: "
                                       f"{', '.join(repr(n) for n in by_name) or 'none'})")
        s = by_name[name]
        if s.shape is not None and len(shape) != len(s.shape):
            raise InputMismatchError(f"shape {text} has rank {len(shape)} but input {name!r} has rank "
                                     f"{len(s.shape)} {_fmt_shape(s.shape)}")
        if not _fits(s, shape):
            raise InputMismatchError(f"shape {text} disagrees with the fixed dimensions of input {name!r} "
                                     f"{_fmt_shape(s.shape)}")
    # a named dynamic dim fixed by one input (a given shape or array) applies to the other inputs that share the name
    named = {}
    for s in specs:
        src = given.get(s.name, None if arrays is None else tuple(arrays[s.name].shape))
        if src is not None and s.shape is not None and len(src) == len(s.shape):
            for d, v in zip(s.shape, src):
                if isinstance(d, str):
                    named.setdefault(d, v)
    shapes = {}
    for s in specs:
        if s.name in given:
            shape = given[s.name]
            if arrays is not None and tuple(arrays[s.name].shape) != shape:
                raise InputMismatchError(f"the given array {s.name!r} has shape {list(arrays[s.name].shape)} but "
                                         f"its given shape is {list(shape)}")
        elif arrays is not None:
            shape = tuple(arrays[s.name].shape)
        elif s.shape is None:
            raise InvalidArgumentError(f"input {s.name!r} has no shape in the model; give its shape "
                                       f"({s.name}=AxBxC)")
        else:
            shape = tuple(d if isinstance(d, int) else named.get(d, 1) for d in s.shape)
        shapes[s.name] = shape
    return shapes


# --------------------------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------------------------


def _batch_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(i)]).generate_state(1)[0])


def _session(source, name: str, label: str, providers):
    try:
        return make_session(source, providers)
    except GraphGrowError as exc:
        raise type(exc)(f"{label} {name}: {exc}") from None


def _quiet_run_options():
    import onnxruntime

    ro = onnxruntime.RunOptions()
    ro.log_severity_level = 4  # the failure is reported once, as our own one-line error
    return ro


def _run(sess, feeds: dict, label: str, name: str, batch: int) -> list:
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise InputMismatchError(f"onnxruntime expects input(s) {', '.join(repr(n) for n in missing)} of the "
                                 f"{label} {name} that its graph does not list as inputs")
    try:
        out = sess.run(None, {n: feeds[n] for n in wanted}, _quiet_run_options())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise GraphGrowError(f"onnxruntime failed to run the {label} {name} on batch {batch}: {first_line(exc)}") \
            from None
    return [np.asarray(o) for o in out]


def check_batches(batches, name: str = "batches") -> int:
    """``batches`` as an int; InvalidArgumentError (naming it ``name``) unless it is a positive integer."""
    if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, not {batches!r}")
    return int(batches)


def check_models(reference, candidate, *, inputs=None, batches: int = DEFAULT_BATCHES, shapes: Mapping | None = None,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, providers=None, seed: int = 0,
                 progress=None) -> tuple:
    """Compare two ONNX models (paths or ModelProtos); returns ``(CheckReport, {input name: shape})``.

    Raises a :class:`~graphgrow.errors.GraphGrowError` for bad input (files, options, mismatched signatures,
    onnxruntime failures).
    """
    batches = check_batches(batches)
    acc = OutputAccumulator(None, atol, rtol)  # validates atol / rtol before any slow work
    providers = resolve_providers(providers)
    shapes = shape_dict(shapes)
    say = progress or (lambda msg: None)

    say("loading the models ...")
    ref_model, ref_path = model_source(reference, "reference")
    cand_model, cand_path = model_source(candidate, "candidate")
    ref_name = ref_path or "(in-memory model)"
    cand_name = cand_path or "(in-memory model)"
    specs = _merge_inputs(_graph_inputs(ref_model, "reference"), _graph_inputs(cand_model, "candidate"))
    ref_out = [o.name for o in ref_model.graph.output]
    cand_out = [o.name for o in cand_model.graph.output]
    if len(ref_out) != len(cand_out):
        raise InputMismatchError(f"the models have different numbers of outputs: reference {len(ref_out)} "
                                 f"({', '.join(ref_out)}), candidate {len(cand_out)} ({', '.join(cand_out)})")

    arrays = _input_arrays(inputs, specs) if inputs is not None else None
    concrete = _resolve_shapes(specs, shapes, arrays)
    spec_list = [(s.name, concrete[s.name], _np_dtype(s.elem_type, s.name)) for s in specs]

    say(f"creating onnxruntime sessions ({', '.join(providers)}) ...")
    # from a path, onnxruntime reads the file itself (external data included)
    ref_sess = _session(ref_path or ref_model, ref_name, "reference", providers)
    cand_sess = _session(cand_path or cand_model, cand_name, "candidate", providers)
    del ref_model, cand_model

    acc.names = ref_out
    used = []
    for i in range(batches):
        if i == 0 and arrays is not None:
            feeds = {s.name: arrays[s.name] for s in specs}
            what = "the given inputs"
        else:
            feeds = random_feeds(spec_list, _batch_seed(seed, i))
            what = "random inputs"
        say(f"batch {i + 1}/{batches} ({what}) ...")
        r = _run(ref_sess, feeds, "reference", ref_name, i + 1)
        c = _run(cand_sess, feeds, "candidate", cand_name, i + 1)
        acc.add(r, c)
        used.append((feeds, r))
    report = acc.report(backend="onnxruntime", providers=providers)
    if not report.float32_passed:  # rounding or error: float64 copies of both models decide (onnx/precision.py)
        from .precision import recheck

        say("float32 outputs differ: re-checking in float64")
        recheck(report, reference, candidate, [f for f, _ in used], [r for _, r in used], providers=providers)
    return report, concrete
