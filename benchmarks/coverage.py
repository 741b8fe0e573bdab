"""Coverage sweep: widen every torchvision classification model and verify it in onnxruntime.

For each model of ``torchvision.models.list_models(module=torchvision.models)``
(random init, eval mode, ``torch.manual_seed(0)``) this runs, in a separate
subprocess per model (memory is released, a crash or a timeout does not stop
the sweep)::

    wide = graphgrow.widen(model, FACTOR, example_inputs=(x,), verify="none")   # timed: "widen_s"
    rep  = graphgrow.check(model, wide, (x,), backend="onnxruntime", batches=3)  # timed: "check_s"

which is what ``graphgrow.widen(..., verify="onnxruntime")`` does, split in two
so that the rewrite and the check are timed separately.  Then the same is done
on the model after :func:`desymmetrize` (all-constant tensors -- norm affine
params, running stats, zero biases, layer scales, ViT's zero head -- replaced
by random values), because default init makes the check blind to how those
tensors are mapped (ViT's output is even all zero); ``--no-perturb`` skips it.
A WRONG/error in that variant makes the model's status WRONG/error.

Statuses:

* ``widened+equivalent``            check passed and at least one channel space grew
* ``equivalent, nothing widened``   check passed, no space grew
* ``refused: <error>``              a GraphGrowError other than VerificationError (in widen, or
                                    ``[check]`` when the ONNX export / onnxruntime check could not run;
                                    then a torch-eager check is run as a fallback and reported in ``note``)
* ``WRONG: <msg>``                  VerificationError, or the onnxruntime check did not pass
* ``error: <exc>``                  any other exception (an internal bug): type, message, and the last
                                    traceback frame inside graphgrow
* ``timeout``                       the worker ran longer than ``--timeout`` seconds
* ``killed: ...``                   the worker went over ``--mem-limit-gb`` resident memory, or died
* ``skipped: too large ...``        the widened model would not fit this machine (estimated params after
                                    widening = params_before * factor**2 > ``--max-params``)

Usage::

    PYTHONPATH=. python benchmarks/coverage.py                       # full sweep (80 models)
    PYTHONPATH=. python benchmarks/coverage.py --only 'resnet18|vit_b_16'
    PYTHONPATH=. python benchmarks/coverage.py --resume              # skip models already in the json

Results go to ``benchmarks/results/coverage.json`` and ``coverage.md`` and are
rewritten after every model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# image sizes that models need (everything else: 64, falling back to larger sizes if the forward fails)
# alexnet / vgg*: their AdaptiveAvgPool2d((6, 6)) / ((7, 7)) only exports to ONNX when its input is a multiple
# of the output size, i.e. at 224 (at 64 the TorchScript exporter refuses the reference model)
FIXED_SIZES = [(r"^vit_", 224), (r"^swin", 224), (r"^maxvit_t$", 224), (r"^inception_v3$", 96), (r"^alexnet$", 224),
               (r"^vgg", 224)]
FALLBACK_SIZES = [64, 96, 128, 160, 224]
MODEL_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}

STATUS_ORDER = ["widened+equivalent", "equivalent, nothing widened", "refused", "WRONG", "error", "timeout",
                "killed", "skipped"]


# ----------------------------------------------------------------------------------------------------------------
# worker (one model, in its own process)
# ----------------------------------------------------------------------------------------------------------------

def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _graphgrow_frame(exc: BaseException) -> str | None:
    """The last traceback frame inside the graphgrow package, as 'path:line in func: code'."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if os.sep + "graphgrow" + os.sep in f.filename]
    if not inside:
        return None
    f = inside[-1]
    rel = os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename
    return f"{rel}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _exc_fields(exc: BaseException) -> dict:
    return {"exc_type": type(exc).__name__, "exc_message": str(exc), "graphgrow_frame": _graphgrow_frame(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def graphgrow_src_hash() -> str:
    """sha1 (12 hex) of graphgrow/**/*.py as it is now: other people edit graphgrow while a sweep runs."""
    import hashlib

    h = hashlib.sha1()
    base = os.path.join(ROOT, "graphgrow")
    for d, dirs, files in sorted(os.walk(base)):
        dirs.sort()
        for fn in sorted(files):
            if fn.endswith(".py"):
                path = os.path.join(d, fn)
                h.update(os.path.relpath(path, base).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def _pick_size(name: str, model, torch) -> tuple:
    """(size, notes): the image size the model runs at."""
    for pat, size in FIXED_SIZES:
        if re.search(pat, name):
            return size, []
    notes = []
    for size in FALLBACK_SIZES:
        x = torch.randn(1, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
            return size, notes
        except Exception as exc:  # noqa: BLE001 - try the next size
            notes.append(f"forward at {size}x{size} failed: {_short(exc, 120)}")
    raise RuntimeError("the model runs at none of the sizes " + ", ".join(map(str, FALLBACK_SIZES)) + ": "
                       + "; ".join(notes))


def stream_cell(report) -> str:
    """"residual stream widened": "yes" when every space a norm reads across channels grew, "no (n/m)" with the
    first reason otherwise, "-" when the model has none (a pure CNN)."""
    stream = [s for s in report.spaces if getattr(s, "normalized", False)]
    stayed = [s for s in stream if s.new_width == s.old_width]
    if not stream:
        return "-"
    if not stayed:
        return "yes"
    return f"no ({len(stayed)}/{len(stream)} stay: {(stayed[0].frozen_reasons or ['?'])[0][:80]})"


def _frozen_summary(report, top: int = 4) -> list:
    """[[shortened reason, count], ...] for the most common freezing reasons."""
    counts = sorted(report.frozen_reasons().items(), key=lambda kv: (-kv[1], kv[0]))
    return [[_short(r, 90), c] for r, c in counts[:top]]


def desymmetrize(model, seed: int = 1) -> list:
    """Replace every floating parameter / buffer whose elements are all equal by random values; returns their names.

    Default initialization leaves many tensors constant across channels (norm weights 1 and biases 0, running
    stats 0 / 1, zero biases, ConvNeXt layer scales 1e-6, ViT's zero class token and zero head), which makes an
    equivalence check blind to a wrong channel mapping of those tensors (and, for ViT, makes the output all zero).
    New values: running_var -> U(0.5, 1.5); zeros -> N(0, 0.02) for tensors of dim >= 2 else N(0, 0.1);
    tiny constants (|v| < 1e-3, layer scales) -> U(0.1, 1); any other constant v -> v * U(0.5, 1.5).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.detach().flatten()
            if not bool((flat == flat[0]).all()):
                continue
            v = float(flat[0])
            r = torch.rand(t.shape, generator=g)
            if name.endswith("running_var"):
                new = 0.5 + r
            elif v == 0.0:
                new = torch.randn(t.shape, generator=g) * (0.02 if t.dim() >= 2 else 0.1)
            elif abs(v) < 1e-3:
                new = 0.1 + 0.9 * r
            else:
                new = v * (0.5 + r)
            t.copy_(new.to(t.dtype))
            changed.append(name)
    return changed


def _widen_and_check(model, x, factor: float) -> dict:
    """widen(verify="none") then the onnxruntime check; a dict of results with a "status"."""
    import torch

    import graphgrow
    # graphgrow.check (the function) lives in graphgrow.verify; import it from there directly (before the
    # rename of graphgrow/check.py, the package attribute turned into the submodule after its first access)
    from graphgrow.verify import check as gg_check

    res: dict = {}
    # 1. analysis + rewrite
    t0 = time.perf_counter()
    try:
        wide = graphgrow.widen(model, factor, example_inputs=(x,), verify="none")
    except graphgrow.VerificationError as exc:  # not expected with verify="none", but never hide it
        res.update(_exc_fields(exc), widen_s=round(time.perf_counter() - t0, 3))
        res["status"] = f"WRONG: {_short(exc)}"
        return res
    except graphgrow.GraphGrowError as exc:
        res.update(_exc_fields(exc), widen_s=round(time.perf_counter() - t0, 3))
        res["status"] = f"refused: {type(exc).__name__}: {_short(exc)}"
        return res
    except Exception as exc:  # noqa: BLE001 - an internal bug: record it
        res.update(_exc_fields(exc), widen_s=round(time.perf_counter() - t0, 3))
        res["status"] = f"error: {type(exc).__name__}: {_short(exc)}"
        return res
    res["widen_s"] = round(time.perf_counter() - t0, 3)
    rep = wide.graphgrow_report
    res["params_after"] = int(rep.params_after)
    res["ratio"] = round(rep.params_after / max(rep.params_before, 1), 4)
    res["spaces"] = len(rep.spaces)
    res["widened"] = len(rep.widened)
    res["fully_frozen"] = sum(1 for s in rep.spaces if s.status == "frozen")
    res["partly_frozen"] = sum(1 for s in rep.spaces if s.status == "partly frozen")
    res["unchanged"] = sum(1 for s in rep.spaces if s.status == "unchanged")
    res["rounds"] = rep.rounds
    res["frozen_reasons_top"] = _frozen_summary(rep)
    res["stream"] = stream_cell(rep)
    res["frozen_reasons"] = rep.frozen_reasons()
    res["report_summary"] = rep.summary()
    res["rss_after_widen_mb"] = round(_rss_peak_mb(), 1)

    # 2. onnxruntime check (3 batches), as verify="onnxruntime" does
    t0 = time.perf_counter()
    try:
        chk = gg_check(model, wide, (x,), backend="onnxruntime", batches=3)
    except graphgrow.GraphGrowError as exc:
        res.update(_exc_fields(exc), check_s=round(time.perf_counter() - t0, 3))
        res["status"] = f"refused: [check] {type(exc).__name__}: {_short(exc)}"
        extras = []
        # workaround 1: nn.MultiheadAttention's eval fast path (aten::_native_multi_head_attention) has no ONNX
        # export; with the fast path off, the same check can run in onnxruntime
        if "_native_multi_head_attention" in str(exc) and hasattr(torch.backends, "mha"):
            t1 = time.perf_counter()
            prev = torch.backends.mha.get_fastpath_enabled()
            try:
                torch.backends.mha.set_fastpath_enabled(False)
                wchk = gg_check(model, wide, (x,), backend="onnxruntime", batches=3)
                w = wchk.worst
                res["ort_check_mha_fastpath_off"] = {
                    "passed": bool(wchk.passed), "max_rel": w.max_rel if w else None,
                    "max_abs": w.max_abs if w else None, "ref_max": w.ref_max if w else None,
                    "s": round(time.perf_counter() - t1, 3)}
                extras.append(f"onnxruntime check with torch.backends.mha fast path off: "
                              f"{'passed' if wchk.passed else 'NOT PASSED'}, max_rel {w.max_rel:.2e}, max_abs "
                              f"{w.max_abs:.2e} ({time.perf_counter() - t1:.1f} s)")
                if not wchk.passed:
                    res["status"] = (f"WRONG: onnxruntime check with the MHA fast path off failed: output "
                                     f"{w.name!r} max_rel {w.max_rel:.3g}")
            except Exception as exc2:  # noqa: BLE001
                extras.append(f"onnxruntime check with the MHA fast path off raised {type(exc2).__name__}: "
                              f"{_short(exc2, 150)}")
            finally:
                torch.backends.mha.set_fastpath_enabled(prev)
        # fallback: an eager torch check, so that the widened model is still checked
        t1 = time.perf_counter()
        try:
            tchk = gg_check(model, wide, (x,), backend="torch", batches=3)
            w = tchk.worst
            res["torch_check"] = {"passed": bool(tchk.passed), "max_rel": w.max_rel if w else None,
                                  "max_abs": w.max_abs if w else None, "ref_max": w.ref_max if w else None,
                                  "s": round(time.perf_counter() - t1, 3)}
            extras.append(f"torch-eager check: {'passed' if tchk.passed else 'NOT PASSED'}, max_rel "
                          f"{w.max_rel:.2e}, max_abs {w.max_abs:.2e}" if w else "torch-eager check: no outputs")
            if not tchk.passed:
                res["status"] = f"WRONG: torch-eager check failed (onnxruntime check unavailable: {_short(exc, 150)})"
        except Exception as exc2:  # noqa: BLE001
            extras.append(f"torch-eager check raised {type(exc2).__name__}: {_short(exc2, 150)}")
        res["note"] = "; ".join(([res["note"]] if res.get("note") else []) + extras)
        res["rss_peak_mb"] = round(_rss_peak_mb(), 1)
        return res
    except Exception as exc:  # noqa: BLE001
        res.update(_exc_fields(exc), check_s=round(time.perf_counter() - t0, 3))
        res["status"] = f"error: [check] {type(exc).__name__}: {_short(exc)}"
        return res
    res["check_s"] = round(time.perf_counter() - t0, 3)
    res["rss_peak_mb"] = round(_rss_peak_mb(), 1)
    w = chk.worst
    res["passed"] = bool(chk.passed)
    res["max_rel"] = None if w is None else float(w.max_rel)
    res["max_abs"] = None if w is None else float(w.max_abs)
    res["ref_max"] = None if w is None else float(w.ref_max)
    res["check"] = chk.to_dict()
    if not chk.passed:
        res["status"] = (f"WRONG: widened model is not equivalent in onnxruntime: output {w.name!r} max_rel "
                         f"{w.max_rel:.3g} (max_abs {w.max_abs:.3g})" if w is not None
                         else "WRONG: check did not pass (no outputs)")
    elif res["widened"] > 0:
        res["status"] = "widened+equivalent"
    else:
        res["status"] = "equivalent, nothing widened"
    return res


def _dump(res: dict, path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def worker(name: str, factor: float, max_params: float, threads: int | None, perturb: bool = True,
           out: str | None = None) -> dict:
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)
    res: dict = {"model": name, "factor": factor, "threads": torch.get_num_threads(),
                 "graphgrow_src_sha1": graphgrow_src_hash()}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **MODEL_KWARGS.get(name, {})).eval()
    res["build_s"] = round(time.perf_counter() - t0, 3)
    res["params_before"] = int(sum(p.numel() for p in model.parameters()))
    est = res["params_before"] * factor * factor
    if est > max_params:
        res["status"] = (f"skipped: too large for this machine (estimated {est / 1e9:.2f}e9 params after widening "
                         f"= params_before x {factor}^2 > limit {max_params / 1e9:.2f}e9)")
        res["params_after_estimate"] = int(est)
        return res

    size, notes = _pick_size(name, model, torch)
    res["input"] = [1, 3, size, size]
    if notes:
        res["note"] = "; ".join(notes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)

    # 1. the model as torchvision initializes it
    res.update(_widen_and_check(model, x, factor))
    if notes and res.get("note") != "; ".join(notes):
        res["note"] = "; ".join(notes + ([res["note"]] if res.get("note") else []))
    if not perturb:
        return res
    res["perturbed"] = {"status": "not finished"}
    _dump(res, out)  # partial result, in case the second variant times out or crashes
    del res["perturbed"]

    # 2. the same model with its constant tensors replaced by random values (see desymmetrize), so that the check
    #    also sees norm affine params / running stats / layer scales / zero heads that default init leaves constant
    del model
    import gc

    gc.collect()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **MODEL_KWARGS.get(name, {})).eval()
    changed = desymmetrize(model, seed=1)
    pert = _widen_and_check(model, x, factor)
    pert["desymmetrized_tensors"] = len(changed)
    pert["desymmetrized_examples"] = changed[:6]
    keep = ("status", "widen_s", "check_s", "params_after", "widened", "fully_frozen", "partly_frozen", "passed",
            "max_rel", "max_abs", "ref_max", "note", "exc_type", "exc_message", "graphgrow_frame", "traceback",
            "ort_check_mha_fastpath_off", "torch_check", "desymmetrized_tensors", "desymmetrized_examples",
            "rss_peak_mb")
    res["perturbed"] = {k: pert[k] for k in keep if k in pert}
    res["status_default_init"] = res["status"]
    pc, dc = status_class(pert["status"]), status_class(res["status"])
    if pc in ("WRONG", "error") and dc not in ("WRONG", "error"):
        res["status"] = f"{pc}: [desymmetrized init] {pert['status'].split(':', 1)[1].strip()}"
    elif dc in ("widened+equivalent", "equivalent, nothing widened") and pc != dc:
        res["status"] = f"{res['status']} (desymmetrized init: {pert['status']})"
    return res


def worker_main(args) -> int:
    try:
        res = worker(args.worker, args.factor, args.max_params, args.threads, perturb=not args.no_perturb,
                     out=args.out)
    except Exception as exc:  # noqa: BLE001 - setup failure (model build, input size): still report
        res = {"model": args.worker, "factor": args.factor, **_exc_fields(exc),
               "status": f"error: [setup] {type(exc).__name__}: {_short(exc)}"}
    _dump(res, args.out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_one(name: str, args) -> dict:
    """Run the worker for ``name`` in a subprocess (own process group), with a timeout and an RSS limit."""
    fd, out = tempfile.mkstemp(prefix=f"coverage-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", out, "--factor", str(args.factor),
           "--max-params", str(args.max_params)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_perturb:
        cmd += ["--no-perturb"]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    log = open(out + ".log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    peak = 0.0
    killed = None
    while True:
        try:
            proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            pass
        rss = _rss_mb(proc.pid)
        peak = max(peak, rss)
        if time.perf_counter() - t0 > args.timeout:
            killed = "timeout"
        elif rss > args.mem_limit_gb * 1024:
            killed = f"killed: resident memory {rss / 1024:.1f} GB went over --mem-limit-gb {args.mem_limit_gb}"
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group (start_new_session)
            except ProcessLookupError:
                pass
            proc.wait()
            break
    elapsed = time.perf_counter() - t0
    log.seek(0)
    tail = log.read()[-3000:]
    log.close()
    res = None
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = None
    if res is not None and killed:
        # the worker finished the default-init variant before it was killed
        why = "timeout" if killed == "timeout" else killed
        res["perturbed"] = {"status": why}
        res["status_default_init"] = res["status"]
        if status_class(res["status"]) in ("widened+equivalent", "equivalent, nothing widened"):
            res["status"] = f"{res['status']} (desymmetrized init: {why})"
    elif res is not None and res.get("perturbed", {}).get("status") == "not finished":
        res["perturbed"] = {"status": f"worker exited with code {proc.returncode} during this variant",
                            "worker_output_tail": tail}
    for p in (out, out + ".log"):
        try:
            os.unlink(p)
        except OSError:
            pass
    if res is None:
        if killed == "timeout":
            res = {"model": name, "status": "timeout", "note": f"worker killed after {args.timeout:.0f} s"}
        elif killed:
            res = {"model": name, "status": killed}
        else:
            res = {"model": name, "status": f"killed: worker exited with code {proc.returncode} and no result "
                                            f"(crash / out of memory?)", "worker_output_tail": tail}
    res["total_s"] = round(elapsed, 2)
    res["worker_rss_peak_mb_sampled"] = round(peak, 1)
    return res


def status_class(status: str) -> str:
    for s in STATUS_ORDER:
        if status == s or status.startswith(s + ":") or status.startswith(s + " "):
            return s
    if status.startswith("skipped"):
        return "skipped"
    return status.split(":")[0]


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _params(n):
    if n is None:
        return ""
    return f"{n / 1e6:.2f}M"


def _desym_cell(r: dict) -> str:
    """The desymmetrized-init variant: its onnxruntime max_rel, or why there is none."""
    p = r.get("perturbed")
    if not p:
        return ""
    if p.get("max_rel") is not None:
        return format(p["max_rel"], ".1e") + ("" if p.get("passed") else " FAIL")
    w = p.get("ort_check_mha_fastpath_off")
    if w and w.get("max_rel") is not None:
        return format(w["max_rel"], ".1e") + "*" + ("" if w.get("passed") else " FAIL")
    return _short(p.get("status", ""), 40).replace("|", "\\|")


def reason_kind(reason: str) -> str:
    """A freezing reason with module / node / function names blanked, so that reasons can be counted by kind."""
    return re.sub(r"\b\d+\b", "N", re.sub(r"'[^']*'", "'*'", reason))


def _reason_kinds(frozen_reasons: dict) -> list:
    kinds: dict = {}
    for k, v in (frozen_reasons or {}).items():
        kinds[reason_kind(k)] = kinds.get(reason_kind(k), 0) + v
    return sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))


def _versions_line(rows: list) -> str:
    shas: dict = {}
    for r in rows:
        if r.get("graphgrow_src_sha1"):
            shas.setdefault(r["graphgrow_src_sha1"], []).append(r["model"])
    if len(shas) <= 1:
        return f"graphgrow source (sha1 of graphgrow/**/*.py): {next(iter(shas), 'unknown')} for every row."
    return (f"graphgrow's source changed while these rows were produced (other people edit it concurrently): "
            f"{len(shas)} distinct versions (sha1 of graphgrow/**/*.py, per row in the json as graphgrow_src_sha1); "
            f"the last rows ran on {rows[-1].get('graphgrow_src_sha1')}.")


def _status_cell(r: dict) -> str:
    text = _short(r["status"], 160)
    w = r.get("ort_check_mha_fastpath_off")
    if w:
        text += (f" -- with the MHA fast path off: onnxruntime check {'passed' if w['passed'] else 'NOT PASSED'}, "
                 f"max_rel {_fmt(w.get('max_rel'), '.1e')}")
    elif r.get("torch_check"):
        t = r["torch_check"]
        text += f" -- torch-eager check {'passed' if t['passed'] else 'NOT PASSED'}, max_rel {_fmt(t.get('max_rel'), '.1e')}"
    return text.replace("|", "\\|")


def metadata(args, all_models: list) -> dict:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024 / 1024
    except OSError:
        mem = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    import graphgrow

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "PYTHONPATH=/work/main " + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__, "python": platform.python_version(), "graphgrow": graphgrow.__version__,
        "git_commit": commit,
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "mem_gb": None if mem is None else round(mem, 1)},
        "factor": args.factor, "timeout_s": args.timeout, "max_params": args.max_params,
        "mem_limit_gb": args.mem_limit_gb, "threads": args.threads or "torch default",
        "check": "graphgrow.check(model, wide, (x,), backend='onnxruntime', batches=3) after "
                 "graphgrow.widen(model, factor, example_inputs=(x,), verify='none')",
        "models_total": len(all_models),
    }


def write_outputs(meta: dict, results: dict, all_models: list, json_path: str, md_path: str) -> str:
    ordered = [results[m] for m in all_models if m in results] + \
              [r for m, r in results.items() if m not in all_models]
    with open(json_path + ".tmp", "w") as f:
        json.dump({"metadata": meta, "results": ordered}, f, indent=1, default=str)
    os.replace(json_path + ".tmp", json_path)

    total = len(all_models)
    counts: dict = {}
    for r in ordered:
        c = status_class(r["status"])
        counts[c] = counts.get(c, 0) + 1
    ok = counts.get("widened+equivalent", 0)
    summary = f"{ok}/{total} widened and equivalent"
    seen, parts = set(), []
    for k in STATUS_ORDER + sorted(counts):
        if k in counts and k not in seen:
            seen.add(k)
            parts.append(f"{k}: {counts[k]}")
    lines = [f"# graphgrow coverage: torchvision classification models, widen x{meta['factor']}", "",
             f"**{summary}**" + ("" if len(ordered) >= total else f" ({len(ordered)}/{total} models run so far)"),
             "", "Status counts: " + ", ".join(parts), ""]
    lines += [
        f"Command: `{meta['command']}`", ""] + (
        ["Earlier runs merged into these results (rows of models not re-run come from them):", ""]
        + [f"- {c.get('date')}: `{c.get('command')}`" for c in meta.get("previous_commands", [])] + [""]
        if meta.get("previous_commands") else []) + [
        f"Date {meta['date']}; torch {meta['torch']}, torchvision {meta['torchvision']}, onnxruntime "
        f"{meta['onnxruntime']}, onnx {meta['onnx']}, python {meta['python']}; git {meta.get('git_commit')}; "
        f"machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPUs, {meta['machine']['mem_gb']} GB; "
        f"torch threads: {meta['threads']}.", "",
        _versions_line(ordered), "",
        "Each model: random init (`torch.manual_seed(0)`), eval mode, one input of batch 1 (size in the table), "
        "then `graphgrow.widen(model, factor, example_inputs=(x,), verify='none')` (column *widen s*: analysis + "
        "rewrite) and `graphgrow.check(model, wide, (x,), backend='onnxruntime', batches=3)` (column *check s*: "
        "ONNX export of both models + 3 batches in onnxruntime), each model in its own subprocess "
        f"(timeout {meta['timeout_s']:.0f} s). *max_rel* / *max_abs* are the worst output differences of the "
        "onnxruntime check, *out max* the largest |output| of the reference (0 means the check is blind). "
        "Spaces: *wid.* = widened (incl. partly frozen), *frz* = fully frozen, *part* = widened but partly frozen. "
        "*desym. max_rel*: the same widen + onnxruntime check on the model after `desymmetrize()` (every "
        "parameter/buffer whose elements are all equal -- norm weights/biases, running stats, zero biases, "
        "ConvNeXt layer scales, ViT's zero class token and head -- replaced by random values, so that the check "
        "also sees those tensors' channel mapping); `*` = measured with the MultiheadAttention fast path off. "
        "A model counts as widened+equivalent only if neither variant is WRONG/error.", "",
        "| # | model | input | params before | params after | ratio | spaces | wid. | frz | part | residual stream "
        "widened | max_rel | max_abs | out max | widen s | check s | desym. max_rel | peak RSS GB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ordered, 1):
        inp = "x".join(str(d) for d in r["input"][2:]) if r.get("input") else ""
        rss = r.get("worker_rss_peak_mb_sampled") or r.get("rss_peak_mb")
        lines.append("| " + " | ".join([
            str(i), r["model"], inp, _params(r.get("params_before")), _params(r.get("params_after")),
            _fmt(r.get("ratio"), ".3f"), str(r.get("spaces", "")), str(r.get("widened", "")),
            str(r.get("fully_frozen", "")), str(r.get("partly_frozen", "")),
            r.get("stream", "(not measured)").replace("|", "/"), _fmt(r.get("max_rel"), ".1e"),
            _fmt(r.get("max_abs"), ".1e"), _fmt(r.get("ref_max"), ".1e"), _fmt(r.get("widen_s"), ".1f"),
            _fmt(r.get("check_s"), ".1f"), _desym_cell(r),
            _fmt(None if not rss else rss / 1024, ".1f"), _status_cell(r)]) + " |")
    # frozen reasons per model
    lines += ["", "## Frozen channel spaces: top reasons per model", "",
              "Reasons by kind: names of modules / nodes / functions blanked as `'*'`, numbers as N; the json has "
              "the full reasons (`frozen_reasons`). A space frozen by several reasons counts once per reason.", "",
              "| model | frozen / partly frozen | top reasons (spaces) |", "|---|---|---|"]
    for r in ordered:
        kinds = _reason_kinds(r.get("frozen_reasons"))
        if kinds:
            reasons = "; ".join(f"{_short(t, 110)} ({c})" for t, c in kinds[:3]).replace("|", "\\|")
            lines.append(f"| {r['model']} | {r.get('fully_frozen', 0)} / {r.get('partly_frozen', 0)} | {reasons} |")
    # overall reasons
    overall: dict = {}
    models_with: dict = {}
    for r in ordered:
        for k, v in _reason_kinds(r.get("frozen_reasons")):
            overall[k] = overall.get(k, 0) + v
            models_with[k] = models_with.get(k, 0) + 1
    if overall:
        lines += ["", "## Frozen reasons over all models, by kind", "", "| reason | spaces | models |",
                  "|---|---|---|"]
        for k, v in sorted(overall.items(), key=lambda kv: -kv[1])[:25]:
            lines.append(f"| {_short(k, 220).replace('|', chr(92) + '|')} | {v} | {models_with[k]} |")
    # details of non-successes
    bad = [r for r in ordered if status_class(r["status"]) not in ("widened+equivalent",)]
    if bad:
        lines += ["", "## Models that are not widened+equivalent", ""]
        for r in bad:
            lines.append(f"### {r['model']}: {status_class(r['status'])}")
            lines.append("")
            lines.append(f"- status: `{r['status']}`")
            if r.get("note"):
                lines.append(f"- note: {r['note']}")
            if r.get("graphgrow_frame"):
                lines.append(f"- last graphgrow frame: `{r['graphgrow_frame']}`")
            if r.get("traceback") and status_class(r["status"]) in ("error", "WRONG"):
                lines += ["", "```", r["traceback"].rstrip()[-3000:], "```"]
            elif r.get("exc_message") and len(r["exc_message"]) > 300:
                lines.append(f"- full message: {_short(r['exc_message'], 1500)}")
            lines.append("")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return summary + " | " + ", ".join(parts)


def driver(args) -> int:
    import torchvision

    all_models = list(torchvision.models.list_models(module=torchvision.models))
    models = [m for m in all_models if not args.only or re.search(args.only, m)]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    results: dict = {}
    old_meta: dict = {}
    if os.path.exists(args.json):
        try:
            with open(args.json) as f:
                old = json.load(f)
            results = {r["model"]: r for r in old.get("results", [])}
            old_meta = old.get("metadata", {})
        except (OSError, ValueError):
            results = {}
    if not args.resume and not args.only:
        results, old_meta = {}, {}  # a fresh full sweep
    meta = metadata(args, all_models)
    if results and old_meta:
        # this run adds to / replaces rows of an earlier run: keep the earlier commands
        meta["previous_commands"] = old_meta.get("previous_commands", []) + [
            {"command": old_meta.get("command"), "date": old_meta.get("date")}]
    todo = [m for m in models if not (args.resume and m in results)]
    print(f"[coverage] {len(todo)} model(s) to run ({len(models) - len(todo)} already done), factor {args.factor}, "
          f"timeout {args.timeout:.0f} s", file=sys.stderr, flush=True)
    for i, name in enumerate(todo, 1):
        res = run_one(name, args)
        results[name] = res
        summary = write_outputs(meta, results, all_models, args.json, args.md)
        mr = res.get("max_rel")
        print(f"[coverage] {i}/{len(todo)} {name}: {_short(res['status'], 200)} | widen "
              f"{_fmt(res.get('widen_s'), '.1f')} s, check {_fmt(res.get('check_s'), '.1f')} s, total "
              f"{res['total_s']:.1f} s" + (f", max_rel {mr:.1e}" if mr is not None else "")
              + f", peak RSS {res.get('worker_rss_peak_mb_sampled', 0) / 1024:.1f} GB", file=sys.stderr, flush=True)
    summary = write_outputs(meta, results, all_models, args.json, args.md)
    print(f"[coverage] {summary}", file=sys.stderr, flush=True)
    print(f"[coverage] wrote {args.json} and {args.md}", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="regex: run only the models whose name matches (re.search)")
    p.add_argument("--resume", action="store_true", help="skip models already in the json")
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds per model, both variants together (default 1800)")
    p.add_argument("--no-perturb", action="store_true",
                   help="only the default-init variant (skip the desymmetrized-init widen + check)")
    p.add_argument("--max-params", type=float, default=1.2e9,
                   help="skip models whose estimated params after widening exceed this (default 1.2e9)")
    p.add_argument("--mem-limit-gb", type=float, default=18.0,
                   help="kill a worker whose resident memory goes over this (default 18)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the worker (default: torch's)")
    p.add_argument("--json", default=os.path.join(RESULTS, "coverage.json"))
    p.add_argument("--md", default=os.path.join(RESULTS, "coverage.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the json; run nothing")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.report_only:
        import torchvision

        with open(args.json) as f:
            old = json.load(f)
        all_models = list(torchvision.models.list_models(module=torchvision.models))
        print(write_outputs(old["metadata"], {r["model"]: r for r in old["results"]}, all_models, args.json, args.md),
              file=sys.stderr)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
