"""``graphgrow check REF.onnx CAND.onnx``: do two ONNX models compute the same function?

Both models are run in onnxruntime on the same inputs (an optional ``.npz``
first batch, then seeded random batches) and their outputs are compared by
position with :func:`graphgrow.compare.compare_outputs` semantics.

This module imports numpy, onnx and onnxruntime only -- never torch.

Exit codes: 0 equivalent, 1 not equivalent, 2 bad input (unreadable model,
mismatched inputs/outputs, bad option, onnxruntime failure).

Public API:

* :func:`add_check_parser` -- add the ``check`` subcommand to an argparse
  subparsers object (``set_defaults(func=run_check)``).
* :func:`run_check` -- run it from parsed arguments, returns the exit code.
* :func:`check_onnx_files` -- the same as a function returning the
  :class:`~graphgrow.compare.CheckReport` (raises GraphGrowError on bad input).
* :func:`main` -- standalone entry point (``python -m graphgrow.onnx.checkcmd
  REF CAND [options]``), mapping GraphGrowError to one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputAccumulator, make_session, random_feeds, resolve_providers
from ..errors import GraphGrowError, InputMismatchError, InvalidArgumentError, UnsupportedModelError

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_BATCHES = 3

__all__ = ["add_check_parser", "run_check", "check_onnx_files", "parse_shape", "main"]

_DESCRIPTION = (
    "Run two ONNX models in onnxruntime on the same inputs and compare their outputs by position "
    "(output names may differ; the report uses the reference's names). Both models must have the same graph "
    "input names (inputs that are also initializers are ignored) with the same element types. "
    "Exit status: 0 equivalent, 1 not equivalent, 2 bad input.")

_EPILOG = (
    "Dynamic dimensions (a dim_param or a missing dim_value) are 1 unless --shape gives the full shape of that "
    "input (with --inputs, the .npz arrays' shapes are used for all batches instead); a named dimension set that "
    "way for one input also applies to other inputs that use the same name. An output passes when "
    "max_abs <= atol or max_rel <= rtol (max_rel = max_abs / max|reference|), over all batches.")


# --------------------------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------------------------


def _add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF.onnx", help="the reference model")
    p.add_argument("candidate", metavar="CAND.onnx", help="the candidate model (e.g. the widened one)")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="arrays keyed by input name, used as the first batch (shape and dtype must fit the model); "
                        "further batches are random")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, metavar="N",
                   help=f"number of batches to compare, including the --inputs batch (default {DEFAULT_BATCHES})")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=AxBxC",
                   help="full shape of input NAME, e.g. input=1x3x224x224 (repeatable). Needed to set dynamic "
                        "dimensions, which default to 1; use NAME= for a scalar")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"relative tolerance, relative to max|reference| (default {DEFAULT_RTOL:g})")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="onnxruntime execution provider (default cpu; cuda needs onnxruntime-gpu)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (with \"equivalent\": true/false) instead of the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batches (default 0)")


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("check", help="compare two ONNX models' outputs in onnxruntime",
                              description=_DESCRIPTION, epilog=_EPILOG)
    _add_check_arguments(p)
    p.set_defaults(func=run_check)
    return p


def parse_shape(text: str) -> tuple:
    """``"NAME=1x3x224x224"`` -> ``("NAME", (1, 3, 224, 224))``; ``"NAME="`` is a scalar."""
    name, eq, dims = str(text).rpartition("=")
    if not eq or not name:
        raise InvalidArgumentError(f"--shape {text!r} is malformed: expected NAME=AxBxC, e.g. input=1x3x224x224")
    dims = dims.strip()
    if not dims:
        return name, ()
    parts = dims.replace(",", "x").split("x")
    out = []
    for part in parts:
        part = part.strip()
        if not part.isdigit():
            raise InvalidArgumentError(f"--shape {text!r} is malformed: dimensions must be non-negative integers "
                                       f"separated by 'x', e.g. {name}=1x3x224x224")
        out.append(int(part))
    return name, tuple(out)


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


def _load_npz(path: str, specs: list) -> dict:
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"--inputs {path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"--inputs {path} is not a readable .npz file: {msg}") from None
    if not hasattr(z, "files"):
        raise InvalidArgumentError(f"--inputs {path} holds a single array; save the inputs with numpy.savez(path, "
                                   f"NAME=array, ...) keyed by input name")
    try:
        with z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"--inputs {path} is not a readable .npz file: {msg}") from None
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
        raise InputMismatchError(f"--inputs {path} does not match the model inputs ({expected}): {'; '.join(parts)}")
    for s in specs:
        a = arrays[s.name]
        want = _np_dtype(s.elem_type, s.name)
        if a.dtype != want:
            raise InputMismatchError(f"--inputs {path}: array {s.name!r} has dtype {a.dtype}, the model expects {want}")
        if not _fits(s, a.shape):
            raise InputMismatchError(f"--inputs {path}: array {s.name!r} has shape {list(a.shape)}, the model expects "
                                     f"{_fmt_shape(s.shape)}")
    return arrays


def _resolve_shapes(specs: list, shape_args: Sequence[str], npz: Mapping | None) -> dict:
    """Concrete shape of every input: --shape, else the .npz array's, else static dims with dynamic ones = 1
    (or the value that another input's --shape / .npz array gave the same named dimension)."""
    by_name = {s.name: s for s in specs}
    given = {}
    for text in shape_args:
        name, shape = parse_shape(text)
        if name not in by_name:
            raise InvalidArgumentError(f"--shape {text!r}: the models have no input {name!r} (inputs: "
                                       f"{', '.join(repr(n) for n in by_name) or 'none'})")
        if name in given and given[name] != shape:
            raise InvalidArgumentError(f"--shape given twice for input {name!r} with different shapes")
        s = by_name[name]
        if s.shape is not None and len(shape) != len(s.shape):
            raise InputMismatchError(f"--shape {text!r} has rank {len(shape)} but input {name!r} has rank "
                                     f"{len(s.shape)} {_fmt_shape(s.shape)}")
        if not _fits(s, shape):
            raise InputMismatchError(f"--shape {text!r} disagrees with the fixed dimensions of input {name!r} "
                                     f"{_fmt_shape(s.shape)}")
        given[name] = shape
    # a named dynamic dim fixed by one input (--shape or the .npz) applies to the other inputs that share the name
    named = {}
    for s in specs:
        src = given.get(s.name, None if npz is None else tuple(npz[s.name].shape))
        if src is not None and s.shape is not None and len(src) == len(s.shape):
            for d, v in zip(s.shape, src):
                if isinstance(d, str):
                    named.setdefault(d, v)
    shapes = {}
    for s in specs:
        if s.name in given:
            shape = given[s.name]
            if npz is not None and tuple(npz[s.name].shape) != shape:
                raise InputMismatchError(f"--inputs array {s.name!r} has shape {list(npz[s.name].shape)} but --shape "
                                         f"says {list(shape)}")
        elif npz is not None:
            shape = tuple(npz[s.name].shape)
        elif s.shape is None:
            raise InvalidArgumentError(f"input {s.name!r} has no shape in the model; give it with "
                                       f"--shape {s.name}=AxBxC")
        else:
            shape = tuple(d if isinstance(d, int) else named.get(d, 1) for d in s.shape)
        shapes[s.name] = shape
    return shapes


# --------------------------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------------------------


def _batch_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(i)]).generate_state(1)[0])


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _session(path: str, label: str, providers):
    try:
        return make_session(path, providers)
    except GraphGrowError as exc:
        raise type(exc)(f"{label} {path}: {exc}") from None


def _quiet_run_options():
    import onnxruntime

    ro = onnxruntime.RunOptions()
    ro.log_severity_level = 4  # the failure is reported once, as our own one-line error
    return ro


def _run(sess, feeds: dict, label: str, path: str, batch: int) -> list:
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise InputMismatchError(f"onnxruntime expects input(s) {', '.join(repr(n) for n in missing)} of the "
                                 f"{label} {path} that its graph does not list as inputs")
    try:
        out = sess.run(None, {n: feeds[n] for n in wanted}, _quiet_run_options())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise GraphGrowError(f"onnxruntime failed to run the {label} {path} on batch {batch}: {_first_line(exc)}") \
            from None
    return [np.asarray(o) for o in out]


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"graphgrow check: {msg}", file=sys.stderr, flush=True)


def check_onnx_files(reference: str, candidate: str, *, inputs: str | None = None, batches: int = DEFAULT_BATCHES,
                     shapes: Sequence[str] = (), atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                     provider: str = "cpu", seed: int = 0, progress: bool = False) -> tuple:
    """Compare two ONNX files; returns ``(CheckReport, {input name: shape})``.

    Raises a :class:`~graphgrow.errors.GraphGrowError` for bad input (files,
    options, mismatched signatures, onnxruntime failures).
    """
    from .io import load_model

    if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 1:
        raise InvalidArgumentError(f"--batches must be a positive integer, not {batches!r}")
    acc = OutputAccumulator(None, atol, rtol)  # validates atol / rtol before any slow work
    try:
        providers = resolve_providers(provider)
    except InvalidArgumentError as exc:  # say it in command-line terms
        raise InvalidArgumentError(str(exc).replace("providers='cpu'", "--provider cpu")) from None
    shapes = list(shapes)
    for text in shapes:
        parse_shape(text)  # syntax errors before loading anything

    _progress(progress, f"loading {reference} and {candidate}")
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    specs = _merge_inputs(_graph_inputs(ref_model, "reference"), _graph_inputs(cand_model, "candidate"))
    ref_out = [o.name for o in ref_model.graph.output]
    cand_out = [o.name for o in cand_model.graph.output]
    if len(ref_out) != len(cand_out):
        raise InputMismatchError(f"the models have different numbers of outputs: reference {len(ref_out)} "
                                 f"({', '.join(ref_out)}), candidate {len(cand_out)} ({', '.join(cand_out)})")
    del ref_model, cand_model  # onnxruntime reloads from the paths (external data included)

    npz = _load_npz(inputs, specs) if inputs is not None else None
    concrete = _resolve_shapes(specs, shapes, npz)
    spec_list = [(s.name, concrete[s.name], _np_dtype(s.elem_type, s.name)) for s in specs]

    _progress(progress, f"creating onnxruntime sessions ({', '.join(providers)})")
    ref_sess = _session(reference, "reference", providers)
    cand_sess = _session(candidate, "candidate", providers)

    acc.names = ref_out
    used = []
    for i in range(int(batches)):
        if i == 0 and npz is not None:
            feeds = {s.name: npz[s.name] for s in specs}
            what = f"--inputs {inputs}"
        else:
            feeds = random_feeds(spec_list, _batch_seed(seed, i))
            what = "random inputs"
        _progress(progress, f"batch {i + 1}/{batches} ({what})")
        r = _run(ref_sess, feeds, "reference", reference, i + 1)
        c = _run(cand_sess, feeds, "candidate", candidate, i + 1)
        acc.add(r, c)
        used.append((feeds, r))
    report = acc.report(backend="onnxruntime", providers=providers)
    if not report.float32_passed:  # rounding or error: float64 copies of both files decide (graphgrow.onnx.precision)
        from .precision import recheck

        _progress(progress, "float32 outputs differ: re-checking in float64")
        recheck(report, reference, candidate, [f for f, _ in used], [r for _, r in used], providers=providers)
    return report, concrete


def run_check(args) -> int:
    """The ``check`` subcommand: returns 0 (equivalent), 1 (not equivalent); raises GraphGrowError for bad input."""
    progress = sys.stderr.isatty() and not getattr(args, "quiet", False)
    report, concrete = check_onnx_files(args.reference, args.candidate, inputs=args.inputs, batches=args.batches,
                                        shapes=args.shape or (), atol=args.atol, rtol=args.rtol,
                                        provider=args.provider, seed=args.seed, progress=progress)
    if args.json:
        d = report.to_dict()
        d["equivalent"] = bool(report.passed)
        d["reference"] = args.reference
        d["candidate"] = args.candidate
        d["input_shapes"] = {k: [int(x) for x in v] for k, v in concrete.items()}
        print(json.dumps(d, indent=1))
    else:
        print(report.table())
    sys.stdout.flush()
    return EXIT_OK if report.passed else EXIT_NOT_EQUIVALENT


# --------------------------------------------------------------------------------------------------------------------
# standalone entry point
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphgrow check", description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _add_check_arguments(p)
    p.set_defaults(func=run_check)
    return p


def main(argv=None) -> int:
    """``python -m graphgrow.onnx.checkcmd REF.onnx CAND.onnx [options]``; exit codes as ``graphgrow check``."""
    from ..cli import run_guarded

    return run_guarded(run_check, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
