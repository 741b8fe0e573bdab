"""Time of graphgrow.widen against the time of just copying the widened weights.

For each model (default: torchvision resnet50 and vit_b_16, random init,
``torch.manual_seed(0)``, eval mode, one 1x3x224x224 input), in its own
subprocess:

* ``widen``: ``graphgrow.widen(model, FACTOR, example_inputs=(x,), verify="none")``
  (trace + analysis + plan + rewrite + rebuild), median of ``--reps`` runs after
  one untimed warm-up call (whose time is reported as ``first_call_s``);
* ``analyze``: ``graphgrow.analyze(model, (x,))`` alone (median), for a breakdown;
* baseline ``copy_state``: ``{k: v.clone() for k, v in wide.state_dict().items()}``
  (the cost of materializing the widened weights), median;
* ``deepcopy``: ``copy.deepcopy(wide)``, median;
* ``forward``: one ``wide(x)`` under ``torch.no_grad()``, median (for scale).

Reports ``widen / copy_state`` and ``widen / deepcopy`` and the worker's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; it includes the original model,
the widened model and the warm-up's garbage).

Usage::

    PYTHONPATH=. python benchmarks/widen_time.py [--models resnet50,vit_b_16] [--reps 3] [--factor 1.5]

Writes ``benchmarks/results/widen_time.json`` and ``widen_time.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _median_time(fn, reps: int) -> tuple:
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times), times


def worker(name: str, factor: float, reps: int, size: int, threads: int | None) -> dict:
    import torch
    import torchvision

    import graphgrow

    if threads:
        torch.set_num_threads(threads)
    res = {"model": name, "factor": factor, "input": [1, 3, size, size], "reps": reps,
           "threads": torch.get_num_threads()}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    res["params_before"] = int(sum(p.numel() for p in model.parameters()))
    res["rss_after_build_mb"] = round(_rss_now_mb(), 1)

    def do_widen():
        return graphgrow.widen(model, factor, example_inputs=(x,), verify="none")

    t0 = time.perf_counter()
    wide = do_widen()
    res["first_call_s"] = round(time.perf_counter() - t0, 4)
    rep = wide.graphgrow_report
    res["params_after"] = int(rep.params_after)
    res["widened_spaces"] = f"{len(rep.widened)}/{len(rep.spaces)}"
    res["rss_after_first_widen_mb"] = round(_rss_now_mb(), 1)

    def widen_and_drop():
        w = do_widen()
        del w

    res["widen_s"], res["widen_runs_s"] = _median_time(widen_and_drop, reps)
    res["analyze_s"], res["analyze_runs_s"] = _median_time(lambda: graphgrow.analyze(model, (x,)), reps)
    res["copy_state_s"], res["copy_state_runs_s"] = _median_time(
        lambda: {k: v.clone() for k, v in wide.state_dict().items()}, reps)
    res["deepcopy_s"], res["deepcopy_runs_s"] = _median_time(lambda: copy.deepcopy(wide), reps)

    def fwd():
        with torch.no_grad():
            return wide(x)

    fwd()  # warm-up
    res["forward_s"], res["forward_runs_s"] = _median_time(fwd, reps)
    res["widen_over_copy_state"] = res["widen_s"] / res["copy_state_s"]
    res["widen_over_deepcopy"] = res["widen_s"] / res["deepcopy_s"]
    res["widen_over_forward"] = res["widen_s"] / res["forward_s"]
    res["peak_rss_mb"] = round(_maxrss_mb(), 1)
    res["widened_state_mb"] = round(sum(v.numel() * v.element_size() for v in wide.state_dict().values()) / 2**20, 1)
    return res


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=os.path.join(RESULTS, "widen_time.json"))
    p.add_argument("--md", default=os.path.join(RESULTS, "widen_time.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.factor, args.reps, args.size, args.threads)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0

    import onnxruntime
    import torch
    import torchvision

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        fd, out = tempfile.mkstemp(prefix=f"widen-time-{name}-", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", out, "--factor",
               str(args.factor), "--reps", str(args.reps), "--size", str(args.size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"model": name, "error": f"worker exited with code {proc.returncode}: {proc.stderr[-2000:]}"}
        os.unlink(out)
        results.append(res)
        if "error" in res:
            print(f"[widen_time] {name}: {res['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[widen_time] {name}: widen {_fmt_s(res['widen_s'])}, copy_state {_fmt_s(res['copy_state_s'])} "
                  f"(ratio {res['widen_over_copy_state']:.0f}x), deepcopy {_fmt_s(res['deepcopy_s'])} "
                  f"(ratio {res['widen_over_deepcopy']:.1f}x), peak RSS {res['peak_rss_mb'] / 1024:.2f} GB",
                  file=sys.stderr, flush=True)

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "PYTHONPATH=/work/main " + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"metadata": meta, "results": results}, f, indent=1)
    lines = ["# graphgrow.widen time vs copying the widened weights", "",
             f"Command: `{meta['command']}`", "",
             f"Date {meta['date']}; torch {meta['torch']}, torchvision {meta['torchvision']}, python "
             f"{meta['python']}; {cpu}, {os.cpu_count()} CPUs.", "",
             "Each model in its own subprocess, random init, eval mode, input 1x3x224x224, factor "
             f"{args.factor}; every time is the median of {args.reps} runs (widen after one untimed warm-up call). "
             "*widen* = `graphgrow.widen(model, f, example_inputs=(x,), verify='none')`; *analyze* = "
             "`graphgrow.analyze(model, (x,))`; *copy_state* (the baseline) = "
             "`{k: v.clone() for k, v in wide.state_dict().items()}`; *deepcopy* = `copy.deepcopy(wide)`; "
             "*forward* = one `wide(x)` under no_grad. Peak RSS = `ru_maxrss` of the worker process.", "",
             "| model | params before -> after | widened spaces | widen (first call) | analyze | copy_state | deepcopy "
             "| forward | copy_state GB/s | widen / copy_state | widen / deepcopy | widen / forward | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:200]} |||||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M | "
            f"{r['widened_spaces']} | {_fmt_s(r['widen_s'])} ({_fmt_s(r['first_call_s'])}) | "
            f"{_fmt_s(r['analyze_s'])} | {_fmt_s(r['copy_state_s'])} | {_fmt_s(r['deepcopy_s'])} | "
            f"{_fmt_s(r['forward_s'])} | {r['widened_state_mb'] / 1024 / r['copy_state_s']:.1f} | "
            f"{r['widen_over_copy_state']:.0f}x | {r['widen_over_deepcopy']:.1f}x | "
            f"{r['widen_over_forward']:.1f}x | {r['peak_rss_mb'] / 1024:.2f} GB |")
    lines += ["", f"torch threads: {', '.join(str(r.get('threads')) for r in results)}. Individual runs (s):", ""]
    for r in results:
        if "error" not in r:
            lines.append(f"- {r['model']}: widen {[round(t, 3) for t in r['widen_runs_s']]}, copy_state "
                         f"{[round(t, 4) for t in r['copy_state_runs_s']]}, deepcopy "
                         f"{[round(t, 4) for t in r['deepcopy_runs_s']]}; widened state {r['widened_state_mb']} MB")
    lines += ["", "The copy baseline is memory-bound and depends on whether the allocator hands back already-mapped "
              "pages or has to fault in fresh ones (see the GB/s column), and on other load on the machine: "
              "the ratio widen / copy_state is only good to a factor of a few. The machine is shared (2 CPUs).", ""]
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"[widen_time] wrote {args.json} and {args.md}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
