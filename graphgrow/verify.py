"""Numerical equivalence check of two PyTorch modules (torch side of graphgrow's verification).

:func:`check` runs a reference and a candidate module on the same inputs,
either eagerly in torch or exported to ONNX and run in onnxruntime, and
returns a :class:`~graphgrow.compare.CheckReport`.  The comparison itself
lives in :mod:`graphgrow.compare`, which does not import torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .compare import (DEFAULT_ATOL, DEFAULT_RTOL, RTOL64, CheckReport, OutputAccumulator, attach_float64, make_session,
                      resolve_providers)
from .errors import (InputMismatchError, InvalidArgumentError, UnsupportedModelError, VerificationError, first_line,
                     require_equivalent)

__all__ = ["check", "BACKENDS", "verify_growth"]

BACKENDS = ("torch", "onnxruntime")


def _as_inputs(inputs) -> tuple:
    if inputs is None:
        raise InvalidArgumentError("example inputs are required to check torch modules: pass a tensor or a tuple of "
                                   "tensors the model accepts")
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    raise InvalidArgumentError(f"inputs must be a tensor or a tuple of tensors, not {type(inputs).__name__}")


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random tensor with t's shape, dtype and device, drawn from ``gen`` (a CPU generator)."""
    shape = tuple(t.shape)
    if t.dtype == torch.bool:
        out = torch.randint(0, 2, shape, generator=gen).bool()
    elif t.dtype.is_floating_point:
        draw_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        out = torch.randn(shape, generator=gen, dtype=draw_dtype).to(t.dtype)
    elif t.dtype.is_complex:
        out = torch.randn(shape, generator=gen, dtype=t.dtype)
    else:
        high = int(t.max().item()) + 1 if t.numel() else 1
        out = torch.randint(0, max(high, 1), shape, generator=gen, dtype=torch.int64).to(t.dtype)
    return out.to(t.device)


def _make_batches(inputs: tuple, batches: int, seed: int) -> list:
    """Batch 0 is ``inputs`` as given; batch b > 0 draws random tensors of the same shapes/dtypes (seed + b)."""
    out = [inputs]
    for b in range(1, batches):
        gen = torch.Generator().manual_seed(int(seed) + b)
        out.append(tuple(_random_like(x, gen) if isinstance(x, torch.Tensor) else x for x in inputs))
    return out


def _tensor_leaves(output) -> list:
    leaves, _ = tree_flatten(output)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    if t.is_conj():
        t = t.resolve_conj()
    return t.numpy()


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Put every module of ``models`` in eval mode; restore each module's own training flag afterwards."""
    saved = []
    seen = set()
    for m in models:
        for sub in m.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                saved.append((sub, sub.training))
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


class _FullPrecision:
    """Switch off TF32 (on by default for cuDNN convolutions on Ampere and newer GPUs) while checking:
    its ~1e-3 rounding would hide, or fake, differences the check is there to find."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _run_torch(model: nn.Module, args: tuple, which: str) -> list:
    try:
        with torch.no_grad(), _FullPrecision():
            out = model(*args)
    except Exception as exc:
        raise InputMismatchError(f"the inputs do not fit the {which} model: {first_line(exc)}") from None
    return [_to_numpy(t) for t in _tensor_leaves(out)]


@contextlib.contextmanager
def _silence_fds():
    """Send file descriptors 1 and 2 to a scratch file for the duration.

    The TorchScript exporter logs from C++ straight to std::cerr (e.g. "Torch IR
    graph at exception: ..." on failure; torch turns its ONNX log on whatever
    the user set), which redirect_stdout/redirect_stderr cannot catch.
    """
    saved = []
    try:
        sink = tempfile.TemporaryFile()
    except OSError:  # pragma: no cover - no temp space: stay noisy rather than fail
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                continue
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        for fd, _ in saved:
            os.dup2(sink.fileno(), fd)
        yield
    finally:
        for fd, dup in saved:
            try:
                os.dup2(dup, fd)
            finally:
                os.close(dup)
        sink.close()


@contextlib.contextmanager
def _quiet():
    """Silence the ONNX exporter's warnings, prints, log records and C++ log output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                _silence_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _export(model: nn.Module, args: tuple, path: str, opset: int, n_outputs: int, which: str) -> list:
    """Export ``model`` (fixed shapes) to ``path`` with the TorchScript exporter; returns the input names."""
    input_names = [f"input{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    output_names = [f"output{i}" for i in range(n_outputs)]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        # nn.MultiheadAttention's inference fast path (a fused op) has no ONNX export: trace the plain math
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, args, path, dynamo=False, opset_version=int(opset), do_constant_folding=True,
                              export_params=True, input_names=input_names, output_names=output_names)
    except Exception as exc:
        raise UnsupportedModelError(f"could not export {which} model to ONNX: {first_line(exc)}") from None
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
    return input_names


def _feeds(session, args: tuple) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    feeds = {}
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        name = f"input{i}"
        if name in wanted:
            if a.dtype == torch.bfloat16:
                raise UnsupportedModelError("bfloat16 inputs cannot be fed to onnxruntime; use backend='torch'")
            feeds[name] = _to_numpy(a)
    return feeds


def _run_ort(session, args: tuple) -> list:
    return [np.asarray(o) for o in session.run(None, _feeds(session, args))]


def float32_rounding_of(state32: dict, state64: dict) -> str:
    """"" when every tensor of ``state32`` is the one of ``state64`` rounded to its dtype (floating tensors within
    eps x |value| of that dtype, i.e. a unit or two in the last place; others equal; same keys and shapes),
    else what differs."""
    if list(state32) != list(state64):
        return "the state_dict keys differ"
    for k, a in state32.items():
        b = state64[k]
        if tuple(a.shape) != tuple(b.shape):
            return f"{k!r} has shape {tuple(a.shape)}, not {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.dtype)):
                return f"{k!r} differs"
            continue
        finfo = torch.finfo(a.dtype)
        a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
        ulp = (b.abs() * finfo.eps).clamp_min(finfo.tiny)  # one to two units in the last place of a's dtype
        bad = (a - b).abs() > ulp
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            return f"{k!r}[{i}] is {a.flatten()[i].item():.9g}, the float64 value {b.flatten()[i].item():.17g}"
    return ""


def _double_args(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _float_dtypes(model: nn.Module) -> set:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


def _eager_experts(model: nn.Module) -> nn.Module:
    """``model`` (a float64 copy) with transformers' experts run by the eager loop: its default kernel
    (grouped_mm) takes no float64.  A config is shared by the modules of one model: each is set once."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"
    return model


def _recheck64(report: CheckReport, reference: nn.Module, candidate: nn.Module, candidate64, all_args: list,
               rtol64: float) -> None:
    """Re-run both models in float64 (eagerly, on CPU-or-wherever copies) on the same batches and attach the
    figures to ``report`` (see :func:`graphgrow.compare.attach_float64`)."""
    if any(o.note for o in report.outputs):
        report.recheck_note = "float32 outputs differ in shape or finiteness"
        return
    dtypes = _float_dtypes(reference) | _float_dtypes(candidate)
    if not dtypes or dtypes == {torch.float64}:
        report.recheck_note = "the models already compute in float64" if dtypes else "the models hold no floats"
        return
    try:
        ref64 = _eager_experts(copy.deepcopy(reference).double())
        if callable(candidate64) and not isinstance(candidate64, nn.Module):
            candidate64 = candidate64()
        cast = candidate64 is None
        if cast:  # both models as they are, cast: float32 weight rounding stays in the figure
            cand64 = _eager_experts(copy.deepcopy(candidate).double())
        else:
            cand64 = candidate64
        args64 = [_double_args(a) for a in all_args]
        with _eval_mode(ref64, cand64):
            r64 = [_run_torch(ref64, a, "float64 reference") for a in args64]
            c64 = [_run_torch(cand64, a, "float64 candidate") for a in args64]
            r32 = [_run_torch(reference, a, "reference") for a in all_args]
    except Exception as exc:  # noqa: BLE001 - the float32 verdict stands
        report.recheck_note = f"the float64 re-run failed: {first_line(exc)}"
        return
    attach_float64(report, r64, c64, r32, rtol64, cast=cast)


def check(reference: nn.Module, candidate: nn.Module, inputs=None, *, atol: float = DEFAULT_ATOL,
          rtol: float = DEFAULT_RTOL, backend: str = "onnxruntime", providers=None, batches: int = 3, seed: int = 0,
          opset: int = 17, floor: bool = False, float64: bool = True, candidate64=None,
          rtol64: float = RTOL64) -> CheckReport:
    """Check that ``candidate`` computes the same function as ``reference``.

    ``inputs`` (a tensor or tuple of tensors) is batch 0; batches 1.. are random
    tensors of the same shapes and dtypes (floats: standard normal from a
    generator seeded with ``seed + b``; integers: uniform in
    ``[0, max(example) + 1)``; bools: coin flips).  Both models run in eval
    mode under ``torch.no_grad`` (their training flags are restored after).

    ``backend="torch"`` compares eager outputs; ``backend="onnxruntime"``
    exports both models to ONNX (TorchScript exporter, opset ``opset``, fixed
    shapes, constant folding) and compares their outputs in onnxruntime with
    ``providers`` (None/"cpu", "cuda" or a list of provider names).  With
    ``floor=True`` the report's ``floor`` is the worst max_rel between the
    reference in torch and the reference in onnxruntime (the noise floor of
    the two runtimes).  Outputs are the tensor leaves of the module's
    (possibly nested) output, named ``output0``, ``output1``...

    Rounding or error: when the comparison fails and ``float64`` is true,
    float64 copies of the reference and of the candidate run eagerly in torch
    on the same batches; the float64 comparison (tolerance ``rtol64``,
    relative to max|reference|) then decides (``report.float64``,
    ``report.decided_by``), and ``report.floor32`` is the reference's own
    float32-vs-float64 difference.  ``candidate64`` is the candidate as
    computed in float64 (a module or a function returning one, called only
    when needed); by default a float64 cast of ``candidate``, whose float32
    weight rounding then counts as error.
    """
    if not isinstance(reference, nn.Module) or not isinstance(candidate, nn.Module):
        bad = reference if not isinstance(reference, nn.Module) else candidate
        raise InvalidArgumentError(f"check compares torch nn.Modules, not {type(bad).__name__}")
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise InvalidArgumentError(f"batches must be a positive integer, not {batches!r}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InvalidArgumentError(f"opset must be an integer, not {opset!r}")
    args = _as_inputs(inputs)
    acc = OutputAccumulator(None, atol, rtol)  # validates atol / rtol
    use_ort = backend == "onnxruntime" or floor
    provider_names = resolve_providers(providers) if use_ort else []
    all_args = _make_batches(args, batches, seed)

    with _eval_mode(reference, candidate):
        ref_torch = [_run_torch(reference, all_args[0], "reference")]
        same = candidate is reference
        cand_torch0 = ref_torch[0] if same else _run_torch(candidate, all_args[0], "candidate")
        if backend == "torch" or floor:
            ref_torch += [_run_torch(reference, a, "reference") for a in all_args[1:]]

        if backend == "torch":
            cand_torch = [cand_torch0] + [ref_torch[b] if same else _run_torch(candidate, all_args[b], "candidate")
                                          for b in range(1, batches)]
            for r, c in zip(ref_torch, cand_torch):
                acc.add(r, c)
            report = acc.report("torch", [])
        ref_ort = cand_ort = None
        used_providers = provider_names
        if use_ort:
            with tempfile.TemporaryDirectory(prefix="graphgrow-check-") as tmp:
                ref_path = os.path.join(tmp, "reference.onnx")
                _export(reference, all_args[0], ref_path, opset, len(ref_torch[0]), "reference")
                sess = make_session(ref_path, provider_names)
                used_providers = list(sess.get_providers())
                ref_ort = [_run_ort(sess, a) for a in all_args]
                sess = None  # release the file before the directory goes
                if backend == "onnxruntime":
                    if same:
                        cand_ort = ref_ort
                    else:
                        cand_path = os.path.join(tmp, "candidate.onnx")
                        _export(candidate, all_args[0], cand_path, opset, len(cand_torch0), "candidate")
                        sess = make_session(cand_path, provider_names)
                        cand_ort = [_run_ort(sess, a) for a in all_args]
                        sess = None

    if backend == "onnxruntime":
        for r, c in zip(ref_ort, cand_ort):
            acc.add(r, c)
        report = acc.report("onnxruntime", used_providers)
    if floor:
        fl = OutputAccumulator(None, atol, rtol)
        for r, c in zip(ref_torch, ref_ort):
            fl.add(r, c)
        w = fl.report().worst
        report.floor = float(w.max_rel) if w is not None else 0.0
    if float64 and not report.float32_passed:
        with _eval_mode(reference, candidate):
            _recheck64(report, reference, candidate, candidate64, all_args, rtol64)
    return report


def linked_rederivation(result: nn.Module, redo):
    """A function giving the float64 re-derivation of ``result`` (``redo()``), checked to be ``result`` up to
    float32 rounding: same class, same code (GraphModules), same state_dict keys and shapes, every floating
    tensor of ``result`` within one float32 ulp of the float64 one (non-floating tensors equal).  Only then
    does its float64 check speak for ``result``; otherwise an error says what differs."""

    def run():
        r64 = redo()
        if type(r64) is not type(result) or getattr(r64, "code", None) != getattr(result, "code", None):
            raise VerificationError("the float64 re-derivation has another structure than the float32 result")
        problem = float32_rounding_of(result.state_dict(), r64.state_dict())
        if problem:
            raise VerificationError(f"the float64 re-derivation is not the float32 result up to rounding: {problem}")
        return r64

    return run


def verify_growth(model, result, inputs, report, what: str, backend: str, atol, rtol, seed: int, redo64=None):
    """Check ``result`` against ``model`` on 3 batches; the check goes into ``report``; VerificationError if not.

    ``redo64``: a function computing the same rewrite in float64; when the float32 check fails, its result
    (if it is ``result`` up to float32 rounding) is checked against the float64 original and decides."""
    rep = check(model, result, inputs, backend=backend, atol=atol if atol is not None else DEFAULT_ATOL,
                rtol=rtol if rtol is not None else DEFAULT_RTOL, batches=3, seed=seed,
                candidate64=None if redo64 is None else linked_rederivation(result, redo64))
    report.check = rep
    require_equivalent(rep, what, report)
