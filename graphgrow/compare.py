"""Frontend-neutral numerical comparison of model outputs.

This module needs numpy (and onnxruntime, imported lazily, for
:func:`run_onnx` / :func:`make_session`); it never imports torch, so the ONNX
path of graphgrow can use it without torch installed.

Definitions, per output (``a`` = reference, ``b`` = candidate, both widened to
float64):

* ``max_abs``  = max |a - b|
* ``ref_max``  = max |a|
* ``max_rel``  = max_abs / ref_max  (= max_abs when ref_max == 0)
* ``cosine``   = cosine similarity of the flattened outputs (1.0 when both
  are all zero, 0.0 when exactly one is)

Positions where both outputs hold the same non-finite value (NaN and NaN,
+inf and +inf) are ignored; any other disagreement in finiteness (e.g. NaN in
the candidate where the reference is finite) is a *non-finite mismatch* and
fails the output with max_abs = max_rel = inf.  A shape mismatch, or an output
present on one side only, fails the same way (cosine is then NaN).

Over several batches the errors take the max over batches and the cosine the
min.  An output passes when ``max_abs <= atol or max_rel <= rtol`` and it has
no mismatch of the kinds above.

Rounding or error: when a float32 comparison fails, the frontends may re-check
in float64 (:attr:`CheckReport.float64`, a report of its own with tolerance
``RTOL64``) and the float64 figure decides, provided the float32 outputs had no
mismatch of the kinds above (a NaN or shape difference in float32 is a fault
of the float32 model whatever float64 says).  ``RTOL64 = 1e-9``: float64
rounds 2**29 (5.4e8) times finer than float32, so a float64 error of 1e-9
relative to the output scale corresponds to a float32 rounding error of about
0.5, an output without meaning; no model whose float32 outputs mean anything
rounds that much in float64.  Measured: correct widenings in float64 sit at
1e-15..1e-12 (timm regnetz_b16 with randomized BN statistics, x1.5 at
1x3x64x64: float32 3.7e-4 against the original's own float32 error 3.0e-4,
float64 3.6e-13), while scaling one consumer column by 1.001 moves the output
by 3.5e-4..0.37 in the tests, the same in float32 and float64.  ``floor32`` is the
reference's own float32 vs float64 difference (worst max_rel), the rounding a
float32 run of the unchanged model already carries.

onnxruntime sessions are built with ``ORT_ENABLE_ALL`` (onnxruntime's default
graph optimizations, i.e. what a deployed model runs with).  Measured on
torchvision resnet18 (random init, 1x3x64x64, 4 seeds x 3 batches, CPU) the
torch-vs-onnxruntime floor is max_rel 5.6e-7..7.1e-7 with ORT_ENABLE_ALL and
6.4e-7..7.7e-7 with ORT_DISABLE_ALL / ENABLE_BASIC / ENABLE_EXTENDED (which
all give identical numbers), so the default level has the smaller floor; a
widened resnet18 compared in onnxruntime sits at ~9e-7 at either level.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputMismatchError, InvalidArgumentError, ModelFileError, UnsupportedModelError, first_line

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
RTOL64 = 1e-9  # float64 re-check tolerance, relative to max|reference| (see the module docstring)

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "RTOL64", "OutputDiff", "CheckReport", "OutputAccumulator", "compare_outputs", "attach_float64",
           "resolve_providers", "make_session", "run_onnx", "random_feeds"]


# --------------------------------------------------------------------------------------------------------------------
# report classes
# --------------------------------------------------------------------------------------------------------------------


def _json_float(x: float):
    """A float for JSON: finite floats as they are, inf/nan as the strings "inf", "-inf", "nan"."""
    x = float(x)
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def _sort_key(x: float) -> float:
    return math.inf if math.isnan(x) else x


@dataclass
class OutputDiff:
    """How one output of the candidate differs from the reference's."""

    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float
    passed: bool
    note: str = ""  # why it failed beyond tolerance (shape mismatch, non-finite mismatch, missing output)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": [int(d) for d in self.shape], "max_abs": _json_float(self.max_abs),
                "max_rel": _json_float(self.max_rel), "cosine": _json_float(self.cosine),
                "ref_max": _json_float(self.ref_max), "passed": bool(self.passed), "note": self.note}


@dataclass
class CheckReport:
    """The result of comparing a candidate model's outputs with a reference's."""

    outputs: list = field(default_factory=list)  # list[OutputDiff]
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    backend: str = ""
    providers: list = field(default_factory=list)
    batches: int = 0
    floor: float | None = None  # worst max_rel of the reference in two runtimes (torch vs onnxruntime), if measured
    float64: "CheckReport | None" = None  # the float64 re-check after a failed float32 one (it decides), if run
    floor32: float | None = None  # worst max_rel of the reference's float32 outputs against its float64 ones
    recheck_note: str = ""  # why a failed float32 check was not re-checked in float64
    float64_cast: bool = False  # the float64 candidate is the float32 one cast (its weight rounding counts as error)

    @property
    def float32_passed(self) -> bool:
        """The verdict of the comparison itself (float32 for float32 models), before any float64 re-check."""
        return all(o.passed for o in self.outputs)

    @property
    def decided_by(self) -> str:
        """``"float64"`` when a float64 re-check decides the verdict, else ``"float32"``."""
        if self.float64 is not None and not any(o.note for o in self.outputs):
            # a cast float32 candidate carries its weights' rounding: its float64 figure can pass a model
            # (then nothing but arithmetic rounding is left) but cannot tell a failure from that rounding
            if not self.float64_cast or self.float64.float32_passed:
                return "float64"
        return "float32"

    @property
    def passed(self) -> bool:
        if self.decided_by == "float64":
            return self.float64.float32_passed
        return self.float32_passed

    def precision_summary(self) -> str:
        """The float32 and float64 figures and which decided, for messages ("" when float32 passed alone)."""
        w = self.worst
        if self.float32_passed or w is None:
            return ""
        text = f"float32 max_rel {w.max_rel:.2g} over rtol {self.rtol:.1g}"
        if self.floor32 is not None:
            text += f" (the original's own float32 error: {self.floor32:.2g})"
        if self.float64 is not None:
            w64 = self.float64.worst
            text += (f"; float64 max_rel {w64.max_rel:.2g} {'within' if self.float64.float32_passed else 'over'} "
                     f"{self.float64.rtol:.1g}")
        text += f"; decided by {self.decided_by}"
        if self.float64 is None and self.recheck_note:
            text += f" ({self.recheck_note})"
        return text

    def failure_message(self, what: str) -> str:
        """One sentence for a failed verification of a ``what`` (``"widened"``, ``"deepened"``) model."""
        if self.decided_by == "float64":
            w = self.float64.worst
            return (f"{what} model is not equivalent: output {w.name!r} differs by max_rel {w.max_rel:.3g} in "
                    f"float64 (max_abs {w.max_abs:.3g}; float32 max_rel {self.worst.max_rel:.3g})")
        w = self.worst
        msg = f"{what} model is not equivalent: output {w.name!r} differs by max_rel {w.max_rel:.3g} (max_abs " \
              f"{w.max_abs:.3g})"
        extra = self.precision_summary()
        return msg + (f"; {extra}" if extra and (self.floor32 is not None or self.recheck_note) else "")

    @property
    def worst(self) -> OutputDiff | None:
        """The output with the largest max_rel (NaN counts as largest); None when there is no output."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: (_sort_key(o.max_rel), _sort_key(o.max_abs)))

    def summary(self) -> str:
        n = len(self.outputs)
        plural = "output" if n == 1 else "outputs"
        if self.passed:
            head = f"equivalent: {n} {plural}"
        else:
            nfail = sum(not o.passed for o in self.outputs)
            head = f"NOT equivalent: {nfail} of {n} {plural} differ{'s' if nfail == 1 else ''}"
        w = self.worst
        if w is not None:
            head += f", worst {w.name!r} max_rel {w.max_rel:.1e} (max_abs {w.max_abs:.1e}, cos {w.cosine:.6f})"
            if w.note:
                head += f" [{w.note}]"
        if not self.float32_passed and self.decided_by == "float32":
            head += f"; tolerance atol {self.atol:.1e} / rtol {self.rtol:.1e}"
        if self.floor is not None:
            head += f"; runtime floor max_rel {self.floor:.1e}"
        if not self.float32_passed:
            if self.float64 is not None:
                w64 = self.float64.worst
                head += (f"; float64 re-check{' (float32 weights cast)' if self.float64_cast else ''} max_rel "
                         f"{w64.max_rel:.1e} (rtol {self.float64.rtol:.0e}, "
                         f"{'within' if self.float64.float32_passed else 'over'})")
            if self.floor32 is not None:
                head += f"; original's float32-vs-float64 max_rel {self.floor32:.1e}"
            head += f"; decided by {self.decided_by}"
            if self.float64 is None and self.recheck_note:
                head += f" ({self.recheck_note})"
        return head

    def to_dict(self) -> dict:
        w = self.worst
        return {"passed": self.passed, "atol": float(self.atol), "rtol": float(self.rtol), "backend": self.backend,
                "providers": list(self.providers), "batches": int(self.batches),
                "floor": None if self.floor is None else _json_float(self.floor),
                "worst": None if w is None else w.name, "summary": self.summary(),
                "outputs": [o.to_dict() for o in self.outputs],
                "float32_passed": self.float32_passed, "decided_by": self.decided_by,
                "float32_max_rel": None if w is None else _json_float(w.max_rel),
                "float64_max_rel": None if self.float64 is None or self.float64.worst is None
                else _json_float(self.float64.worst.max_rel),
                "float64": None if self.float64 is None else self.float64.to_dict(),
                "float32_floor": None if self.floor32 is None else _json_float(self.floor32),
                "float64_weights": None if self.float64 is None else ("float32 cast" if self.float64_cast
                                                                      else "re-derived in float64"),
                "recheck_note": self.recheck_note}

    def table(self) -> str:
        rows = [(o.name, "x".join(str(d) for d in o.shape) or "scalar", f"{o.max_abs:.3e}", f"{o.max_rel:.3e}",
                 f"{o.cosine:.6f}", ("ok" if o.passed else "FAIL") + (f" ({o.note})" if o.note else ""))
                for o in self.outputs]
        header = ("output", "shape", "max_abs", "max_rel", "cosine", "ok")
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
        right = {2, 3, 4}

        def fmt(r):
            cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(r))]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------------------------


def _as_array(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        raise InvalidArgumentError(f"cannot compare an output of type {type(x).__name__}: expected a numeric array")
    return a


def _widen(a: np.ndarray) -> np.ndarray:
    if np.iscomplexobj(a):
        return a.astype(np.complex128)
    return a.astype(np.float64)


@dataclass
class _Acc:
    shape: tuple = ()
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    ref_max: float = 0.0
    mismatch: bool = False
    notes: list = field(default_factory=list)

    def fail(self, note: str):
        self.mismatch = True
        self.max_abs = self.max_rel = math.inf
        if note not in self.notes:
            self.notes.append(note)


def _diff_one(acc: _Acc, ref, cand) -> None:
    """Fold one batch's (ref, cand) pair of a single output into ``acc``."""
    if ref is None or cand is None:
        acc.fail("missing in " + ("reference" if ref is None else "candidate"))
        acc.cosine = math.nan
        if ref is not None:
            a = _widen(_as_array(ref))
            acc.shape = tuple(a.shape)
        return
    a = _widen(_as_array(ref))
    b = _widen(_as_array(cand))
    acc.shape = tuple(a.shape)
    if a.shape != b.shape:
        acc.fail(f"shape mismatch: reference {tuple(a.shape)}, candidate {tuple(b.shape)}")
        acc.cosine = math.nan
        fa = np.isfinite(a)
        if fa.any():
            acc.ref_max = max(acc.ref_max, float(np.abs(a[fa]).max()))
        return
    if a.size == 0:
        return
    fa, fb = np.isfinite(a), np.isfinite(b)
    both = fa & fb
    if not both.all():
        # equal non-finite values (nan/nan, +inf/+inf) are agreement; anything else is a mismatch
        same = (np.isnan(a) & np.isnan(b)) | (~fa & ~fb & (a == b))
        bad = int(np.count_nonzero(~both & ~same))
        if bad:
            acc.fail(f"{bad} non-finite mismatch{'es' if bad != 1 else ''}")
        a = np.where(both, a, 0)
        b = np.where(both, b, 0)
    abs_a = np.abs(a)
    ref_max = float(abs_a.max())
    max_abs = float(np.abs(a - b).max())
    max_rel = max_abs / ref_max if ref_max > 0 else max_abs
    na, nb = float(np.linalg.norm(a.ravel())), float(np.linalg.norm(b.ravel()))
    if na == 0 and nb == 0:
        cos = 1.0
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = float(np.real(np.vdot(a.ravel() / na, b.ravel() / nb)))
        cos = min(1.0, max(-1.0, cos))
    acc.ref_max = max(acc.ref_max, ref_max)
    if not acc.mismatch:
        acc.max_abs = max(acc.max_abs, max_abs)
        acc.max_rel = max(acc.max_rel, max_rel)
    if not math.isnan(acc.cosine):
        acc.cosine = min(acc.cosine, cos)


class OutputAccumulator:
    """Accumulates per-output differences over several batches.

    ``add(ref, cand)`` takes one batch: two lists of arrays (reference and
    candidate outputs, in the same order).  ``report()`` builds the
    :class:`CheckReport`.
    """

    def __init__(self, names: Sequence[str] | None = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL):
        atol, rtol = float(atol), float(rtol)
        if not (atol >= 0) or not (rtol >= 0):
            raise InvalidArgumentError(f"atol and rtol must be non-negative numbers, not atol={atol!r}, rtol={rtol!r}")
        self.names = list(names) if names is not None else None
        self.atol, self.rtol = atol, rtol
        self.batches = 0
        self._accs: list[_Acc] = []

    def add(self, ref: Sequence, cand: Sequence) -> None:
        ref, cand = list(ref), list(cand)
        n = max(len(ref), len(cand), len(self._accs))
        while len(self._accs) < n:
            acc = _Acc()
            if self.batches:  # this output did not exist in the earlier batches
                acc.fail("missing in earlier batches")
                acc.cosine = math.nan
            self._accs.append(acc)
        for i in range(n):
            _diff_one(self._accs[i], ref[i] if i < len(ref) else None, cand[i] if i < len(cand) else None)
        self.batches += 1

    def _name(self, i: int) -> str:
        if self.names is not None and i < len(self.names):
            return str(self.names[i])
        return f"output{i}"

    def diffs(self) -> list:
        out = []
        for i, acc in enumerate(self._accs):
            within = acc.max_abs <= self.atol or acc.max_rel <= self.rtol
            out.append(OutputDiff(name=self._name(i), shape=tuple(int(d) for d in acc.shape), max_abs=acc.max_abs,
                                  max_rel=acc.max_rel, cosine=acc.cosine, ref_max=acc.ref_max,
                                  passed=bool(within and not acc.mismatch), note="; ".join(acc.notes)))
        return out

    def report(self, backend: str = "", providers: Sequence[str] = ()) -> CheckReport:
        return CheckReport(outputs=self.diffs(), atol=self.atol, rtol=self.rtol, backend=backend,
                           providers=list(providers), batches=self.batches)


def attach_float64(report: CheckReport, ref64: Sequence, cand64: Sequence | None, ref32: Sequence | None = None,
                   rtol64: float = RTOL64, cast: bool = False) -> CheckReport:
    """Attach a float64 re-check to ``report`` (a failed float32 comparison), in place; returns it.

    ``ref64`` / ``cand64``: per batch, the float64 outputs of the reference and of the candidate (None: the
    candidate could not be re-run, only the floor is measured); ``ref32``: per batch, the reference's float32
    outputs on the same inputs, for ``floor32``; ``cast``: the float64 candidate is the float32 one cast."""
    report.float64_cast = bool(cast)
    names = [o.name for o in report.outputs]
    if cand64 is not None:
        acc = OutputAccumulator(names, 0.0, rtol64)
        for r, c in zip(ref64, cand64):
            acc.add(r, c)
        report.float64 = acc.report(report.backend + " float64" if report.backend else "float64", report.providers)
    if ref32 is not None:
        fl = OutputAccumulator(names, 0.0, rtol64)
        for r64, r32 in zip(ref64, ref32):
            fl.add(r64, r32)
        w = fl.report().worst
        report.floor32 = float(w.max_rel) if w is not None else 0.0
    return report


def _is_batch_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, (list, tuple)) for e in x)


def compare_outputs(ref: Sequence, cand: Sequence, names: Sequence[str] | None = None, atol: float = DEFAULT_ATOL,
                    rtol: float = DEFAULT_RTOL, *, backend: str = "", providers: Sequence[str] = ()) -> CheckReport:
    """Compare reference and candidate outputs.

    ``ref`` / ``cand`` are either one batch (a list of arrays, one per output)
    or several batches (a list of such lists); errors take the max over
    batches, cosine the min.  Output names default to ``output0``, ``output1``...
    """
    if _is_batch_list(ref) or _is_batch_list(cand):
        if not (_is_batch_list(ref) and _is_batch_list(cand)) or len(ref) != len(cand):
            raise InvalidArgumentError("ref and cand must both be one batch (a list of arrays) or the same number of "
                                       "batches (a list of lists of arrays)")
        batches = list(zip(ref, cand))
    else:
        batches = [(ref, cand)]
    acc = OutputAccumulator(names, atol, rtol)
    for r, c in batches:
        acc.add(r, c)
    return acc.report(backend, providers)


# --------------------------------------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------------------------------------

_PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise InvalidArgumentError(f"the onnxruntime backend needs the onnxruntime package ({exc})") from None
    return onnxruntime


def resolve_providers(providers=None) -> list:
    """Turn ``None`` / ``"cpu"`` / ``"cuda"`` / a list of provider names into onnxruntime provider names.

    CPU is always appended as the fallback.  Raises InvalidArgumentError when a
    requested provider is not available in this onnxruntime build.
    """
    ort = _import_ort()
    if providers is None:
        names = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        key = providers.strip()
        names = [_PROVIDER_ALIASES.get(key.lower(), key)]
    elif isinstance(providers, (list, tuple)):
        names = []
        for p in providers:
            if not isinstance(p, str):
                raise InvalidArgumentError(f"providers must be names of onnxruntime execution providers, not {p!r}")
            names.append(_PROVIDER_ALIASES.get(p.strip().lower(), p.strip()))
    else:
        raise InvalidArgumentError(f"providers must be None, 'cpu', 'cuda' or a list of onnxruntime provider names, "
                                   f"not {providers!r}")
    available = list(ort.get_available_providers())
    for name in names:
        if name not in available:
            if name == "CUDAExecutionProvider":
                raise InvalidArgumentError(
                    f"CUDA was requested but this onnxruntime build has no CUDAExecutionProvider (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu or use providers='cpu'")
            raise InvalidArgumentError(f"onnxruntime execution provider {name!r} is not available (available: "
                                       f"{', '.join(available)})")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    out = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def make_session(model, providers=None):
    """An onnxruntime InferenceSession for a model path, serialized bytes or onnx.ModelProto.

    Uses onnxruntime's default graph optimizations (ORT_ENABLE_ALL); see the
    module docstring.  Raises InvalidArgumentError when a requested provider is
    missing or fails to initialise, ModelFileError when the model cannot be
    loaded.
    """
    ort = _import_ort()
    names = resolve_providers(providers)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # (errors come back as exceptions, reported in one line; no log lines)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ModelFileError(f"ONNX model file {path!r} does not exist")
        source = path
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    elif hasattr(model, "SerializeToString"):
        try:
            source = model.SerializeToString()
        except Exception as exc:  # e.g. protos over 2 GiB
            raise ModelFileError(f"could not serialize the ONNX model ({exc}); save it to a file and pass the path")
    else:
        raise InvalidArgumentError(f"model must be a path, bytes or an onnx.ModelProto, not {type(model).__name__}")
    try:
        sess = ort.InferenceSession(source, so, providers=names)
    except Exception as exc:
        raise ModelFileError(f"onnxruntime could not load the model: {first_line(exc)}") from None
    got = sess.get_providers()
    for n in names:
        if n not in got:
            raise InvalidArgumentError(f"onnxruntime execution provider {n!r} is installed but failed to initialise "
                                       f"(session runs on {', '.join(got)})")
    return sess


def run_onnx(model_path_or_proto, feeds: Mapping[str, Any], providers=None) -> list:
    """Run an ONNX model (path, bytes, ModelProto or an existing InferenceSession) once; returns its outputs."""
    sess = model_path_or_proto if hasattr(model_path_or_proto, "get_inputs") and hasattr(model_path_or_proto, "run") \
        else make_session(model_path_or_proto, providers)
    wanted = {i.name for i in sess.get_inputs()}
    missing = sorted(wanted - set(feeds))
    if missing:
        raise InputMismatchError(f"no value given for model input(s) {', '.join(missing)}")
    feed = {k: np.asarray(v) for k, v in feeds.items() if k in wanted}
    return [np.asarray(o) for o in sess.run(None, feed)]


# --------------------------------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _spec_items(spec) -> list:
    """Normalise an input spec into [(name, shape, np.dtype, example_or_None)]."""
    if hasattr(spec, "get_inputs"):
        spec = spec.get_inputs()
    items = []
    if isinstance(spec, Mapping):
        for name, v in spec.items():
            if isinstance(v, np.ndarray):
                items.append((name, tuple(v.shape), v.dtype, v))
            else:
                shape, dtype = v
                items.append((name, tuple(shape), np.dtype(dtype), None))
        return items
    for v in spec:
        if hasattr(v, "name") and hasattr(v, "shape") and hasattr(v, "type"):  # onnxruntime NodeArg
            if v.type not in _ORT_TYPES:
                raise UnsupportedModelError(f"input {v.name!r} has type {v.type}, for which random inputs cannot be made")
            items.append((v.name, tuple(v.shape), np.dtype(_ORT_TYPES[v.type]), None))
        else:
            name, shape, dtype = v
            items.append((name, tuple(shape), np.dtype(dtype), None))
    return items


def random_feeds(session_inputs_spec, batch_seed: int, *, dim_values: Mapping[str, int] | None = None,
                 int_high: int = 8) -> dict:
    """Random inputs for one batch, reproducible from ``batch_seed``.

    ``session_inputs_spec``: an InferenceSession, its ``get_inputs()`` list,
    a list of ``(name, shape, dtype)`` or a dict ``name -> (shape, dtype)`` or
    ``name -> example array``.  Symbolic or unknown dimensions take their
    value from ``dim_values`` (by dimension name) or 1.  Floats are standard
    normal; integers are uniform in ``[0, int_high)`` (``[0, max(example)+1)``
    when an example array is given); bools are fair coin flips.
    """
    rng = np.random.default_rng(int(batch_seed))
    dim_values = dict(dim_values or {})
    feeds = {}
    for name, shape, dtype, example in _spec_items(session_inputs_spec):
        dims = []
        for d in shape:
            if isinstance(d, (int, np.integer)) and d >= 0:
                dims.append(int(d))
            else:
                dims.append(int(dim_values.get(d, 1)) if isinstance(d, str) else 1)
        dims = tuple(dims)
        if dtype == np.bool_:
            arr = rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            high = int_high
            if example is not None and example.size:
                high = max(int(np.max(example)) + 1, 1)
            arr = rng.integers(0, high, size=dims).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(dims).astype(dtype)
        elif np.issubdtype(dtype, np.complexfloating):
            arr = (rng.standard_normal(dims) + 1j * rng.standard_normal(dims)).astype(dtype)
        else:
            raise UnsupportedModelError(f"input {name!r} has dtype {dtype}, for which random inputs cannot be made")
        feeds[name] = np.asarray(arr)
    return feeds

