"""graphgrow.widen time and memory against the floor (fx trace + weight clone) and Torch-Pruning.

The targets (the issue): ``graphgrow.widen(model, 1.5, example_inputs=(x,), verify="none")`` on
resnet50, densenet201, vit_b_16 and convnext_base at 224x224 takes

* required: at most 10x the *floor* = ``torch.fx.symbolic_trace(model)`` + a clone of the widened
  state_dict (``{k: v.clone() for k, v in wide.state_dict().items()}``), measured in the same
  process as the widen;
* required: peak RSS of the widening, above the process size once the model is built, at most 3x
  the bytes of the widened model's parameters and buffers;
* aim: less time than Torch-Pruning's graph build + one pruning step on the same model.

For each model (torchvision, ``torch.manual_seed(0)``, random init, eval mode, one 1x3xSxS input):

1. a *timing* subprocess: builds the model, runs one untimed warm-up of each measured operation
   (its widen time is reported as ``first_call_s``), then ``--reps`` repeats, interleaved (each
   repeat runs floor, widen, Torch-Pruning one after another so that all three see the same load):

   * floor = ``torch.fx.symbolic_trace(model)`` (timed) + the clone of the widened state_dict
     (timed, of the model the warm-up widen returned); floor time = their sum;
   * widen = ``graphgrow.widen(model, FACTOR, example_inputs=(x,), verify="none")``;
   * Torch-Pruning = on a fresh ``copy.deepcopy(model)`` (not timed):
     ``tp.pruner.MagnitudePruner(copy, x, importance=tp.importance.MagnitudeImportance(p=2),
     pruning_ratio=0.5, ignored_layers=[the 1000-way classifier], round_to=num_heads for ViT)``
     (its constructor builds the DependencyGraph: ``DG.build_dependency(model, example_inputs)``,
     plus the pruning groups) and one ``pruner.step()``; tp time = constructor + step. This follows
     Torch-Pruning's own torchvision example (examples/torchvision_models/torchvision_pruning.py).
     For a breakdown, ``tp.DependencyGraph().build_dependency(copy, example_inputs=x)`` alone is
     timed too, on the same copy before the pruner is built (it leaves the model unchanged; not part
     of the tp time, which would then count the graph build twice).

2. a *memory* subprocess (fresh, nothing else run in it): builds the model, reads VmRSS from
   /proc/self/status (the post-build size), resets the peak (writes "5" to /proc/self/clear_refs,
   which resets VmHWM), runs one widen and reads VmHWM. Peak above build = VmHWM - post-build VmRSS;
   memory ratio = that / bytes of the widened model's parameters and buffers. If clear_refs cannot be
   written, the widen runs first thing after the build and ru_maxrss is used instead (said in the
   results).

``graphgrow`` is imported from ``PYTHONPATH`` (its ``__file__`` and the git commit of its checkout
are recorded), so the same script measures another checkout, e.g. the code before a refactor::

    git worktree add /work/wt-before 750c4ec --detach
    cd /work/main && PYTHONPATH=/work/wt-before .venv/bin/python benchmarks/widen_time.py --label before
    cd /work/main && PYTHONPATH=/work/main .venv/bin/python benchmarks/widen_time.py --label after

Each run replaces its label's entry in ``benchmarks/results/widen_time.json`` (other labels are
kept; with ``--merge`` only the rows of the models it ran, e.g. to rerun one model that another job
on the machine disturbed) and rewrites ``benchmarks/results/widen_time.md`` from all labels in the
JSON. Each repeat records the CPU time other processes took meanwhile: on a 2-core machine with 2
torch threads any other load slows the OpenMP-parallel clone and Torch-Pruning's forward passes by
up to 10-20x while the mostly-Python widen barely notices, so only quiet repeats give fair ratios.
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
DEFAULT_MODELS = "resnet50,densenet201,vit_b_16,convnext_base"
TIME_TARGET = 10.0  # widen <= 10x floor
MEM_TARGET = 3.0  # peak RSS above build <= 3x widened parameter bytes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def _loadavg() -> list:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have been busy (/proc/stat, idle and iowait left out)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _graphgrow_origin() -> dict:
    import graphgrow

    path = os.path.dirname(os.path.abspath(graphgrow.__file__))
    info = {"graphgrow_file": graphgrow.__file__}
    try:
        info["commit"] = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
        info["graphgrow_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _build(name: str, size: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, x


def _state_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _tp_setup(model, size: int):
    """Ignored layers and round_to as in Torch-Pruning's torchvision example."""
    from torch import nn
    from torchvision.models.vision_transformer import VisionTransformer

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    return ignored, round_to


def _tp_run(model, x, check: bool = False) -> dict:
    """Fresh copy (not timed); DG build alone; pruner constructor (DG build + groups) + one step."""
    import torch
    import torch_pruning as tp

    mc = copy.deepcopy(model)
    ignored, round_to = _tp_setup(mc, x.shape[-1])
    gc.collect()
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(mc, example_inputs=x)
    t1 = time.perf_counter()
    del dg
    gc.collect()
    t2 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(mc, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=ignored, round_to=round_to)
    t3 = time.perf_counter()
    pruner.step()
    t4 = time.perf_counter()
    out = {"tp_dg_s": t1 - t0, "tp_init_s": t3 - t2, "tp_step_s": t4 - t3, "tp_s": t4 - t2}
    if check:
        if hasattr(mc, "hidden_dim") and hasattr(mc, "conv_proj"):  # torchvision ViT, as in tp's example
            mc.hidden_dim = mc.conv_proj.out_channels
        out["tp_params_after"] = int(sum(p.numel() for p in mc.parameters()))
        with torch.no_grad():
            out["tp_output_shape"] = list(mc(x).shape)
    del pruner, mc
    return out


def timing_worker(name: str, factor: float, reps: int, size: int, threads: int | None) -> dict:
    import torch
    import torch.fx
    import torch_pruning as tp

    import graphgrow

    if threads:
        torch.set_num_threads(threads)
    res = {"model": name, "factor": factor, "input": [1, 3, size, size], "reps": reps,
           "threads": torch.get_num_threads(), "loadavg_start": _loadavg()}
    res.update(_graphgrow_origin())
    try:
        from importlib.metadata import version

        res["torch_pruning"] = version("torch-pruning")
    except Exception:  # noqa: BLE001 - the version is only a label
        res["torch_pruning"] = getattr(tp, "__version__", "?")
    model, x = _build(name, size)
    res["params_before"] = int(sum(p.numel() for p in model.parameters()))
    res["rss_after_build_mb"] = round(_rss_mb(), 1)

    def widen():
        return graphgrow.widen(model, factor, example_inputs=(x,), verify="none")

    # warm-ups (untimed for the medians)
    t0 = time.perf_counter()
    wide = widen()
    res["first_call_s"] = time.perf_counter() - t0
    rep = wide.graphgrow_report
    res["params_after"] = int(rep.params_after)
    res["widened_spaces"] = f"{len(rep.widened)}/{len(rep.spaces)}"
    res["widened_bytes"] = _state_bytes(wide)
    gm = torch.fx.symbolic_trace(model)
    del gm
    sd = {k: v.clone() for k, v in wide.state_dict().items()}
    del sd
    try:
        res.update({"tp_warmup": _tp_run(model, x, check=True)})
        tp_error = None
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        tp_error = f"{type(e).__name__}: {e}"[:1000]
        res["tp_error"] = tp_error

    runs = {k: [] for k in ("trace_s", "clone_s", "floor_s", "widen_s", "tp_s", "tp_dg_s", "tp_init_s",
                            "tp_step_s", "rep_wall_s", "others_cpu_s")}
    for _ in range(reps):
        busy0, own0, wall0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        gc.collect()
        t0 = time.perf_counter()
        gm = torch.fx.symbolic_trace(model)
        t1 = time.perf_counter()
        del gm
        gc.collect()
        t2 = time.perf_counter()
        sd = {k: v.clone() for k, v in wide.state_dict().items()}
        t3 = time.perf_counter()
        del sd
        runs["trace_s"].append(t1 - t0)
        runs["clone_s"].append(t3 - t2)
        runs["floor_s"].append((t1 - t0) + (t3 - t2))
        gc.collect()
        t0 = time.perf_counter()
        w = widen()
        runs["widen_s"].append(time.perf_counter() - t0)
        del w
        gc.collect()
        if tp_error is None:
            try:
                r = _tp_run(model, x)
            except Exception as e:  # noqa: BLE001
                tp_error = res["tp_error"] = f"{type(e).__name__}: {e}"[:1000]
            else:
                for k, v in r.items():
                    runs[k].append(v)
        # CPU time other processes used during this repeat (2 cores, 2 torch threads: any of it slows the
        # OpenMP-parallel clone and Torch-Pruning's forward passes far more than the mostly-Python widen)
        runs["rep_wall_s"].append(time.perf_counter() - wall0)
        runs["others_cpu_s"].append(max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0)))
    res["runs"] = {k: v for k, v in runs.items() if v}
    res["median"] = {k: statistics.median(v) for k, v in res["runs"].items()}
    res["others_cpu_fraction"] = sum(runs["others_cpu_s"]) / sum(runs["rep_wall_s"])
    m = res["median"]
    res["widen_over_floor"] = m["widen_s"] / m["floor_s"]
    res["per_rep_widen_over_floor"] = [w / f for w, f in zip(runs["widen_s"], runs["floor_s"])]
    if "tp_s" in m:
        res["widen_over_tp"] = m["widen_s"] / m["tp_s"]
        res["per_rep_widen_over_tp"] = [w / t for w, t in zip(runs["widen_s"], runs["tp_s"])]
    res["maxrss_mb"] = round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss
                             / 1024.0, 1)
    res["loadavg_end"] = _loadavg()
    return res


def memory_worker(name: str, factor: float, size: int, threads: int | None) -> dict:
    import resource

    import torch

    import graphgrow
    import graphgrow.api  # what `graphgrow.widen` loads on first access

    if threads:
        torch.set_num_threads(threads)
    model, x = _build(name, size)
    gc.collect()
    res = {"model": name}
    rss0_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        res["peak_method"] = "VmHWM after clear_refs=5"
        res["hwm_after_reset_mb"] = round(_status_kb("VmHWM") / 1024.0, 1)
    except OSError as e:
        res["peak_method"] = f"ru_maxrss (clear_refs not permitted: {e})"
    wide = graphgrow.widen(model, factor, example_inputs=(x,), verify="none")
    if res["peak_method"].startswith("VmHWM"):
        peak_kb = _status_kb("VmHWM")
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["rss_after_build_mb"] = round(rss0_kb / 1024.0, 1)
    res["peak_rss_mb"] = round(peak_kb / 1024.0, 1)
    res["rss_after_widen_mb"] = round(_rss_mb(), 1)
    res["peak_above_build_bytes"] = (peak_kb - rss0_kb) * 1024
    res["widened_bytes"] = _state_bytes(wide)
    res["original_bytes"] = _state_bytes(model)
    res["memory_ratio"] = res["peak_above_build_bytes"] / res["widened_bytes"]
    return res


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _run_worker(kind: str, name: str, args) -> dict:
    fd, out = tempfile.mkstemp(prefix=f"widen-time-{kind}-{name}-", suffix=".json")
    os.close(fd)
    reps = args.reps
    for spec in (args.model_reps or "").split(","):
        if "=" in spec and spec.split("=")[0].strip() == name:
            reps = int(spec.split("=")[1])
    cmd = [sys.executable, os.path.abspath(__file__), f"--{kind}-worker", name, "--out", out, "--factor",
           str(args.factor), "--reps", str(reps), "--size", str(args.size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"model": name, "error": f"{kind} worker exited with code {proc.returncode}: {proc.stderr[-2000:]}"}
    os.unlink(out)
    res["worker_wall_s"] = wall
    return res


def _model_line(r: dict) -> str:
    t, mem = r["timing"], r["memory"]
    if "error" in t or "error" in mem:
        return f"| {r['model']} | error: {(t.get('error') or mem.get('error'))[:300]} |" + "|" * 12
    m = t["median"]
    tp = (f"{_fmt_s(m['tp_s'])} ({_fmt_s(m['tp_init_s'])} + {_fmt_s(m['tp_step_s'])}; DG {_fmt_s(m['tp_dg_s'])})"
          if "tp_s" in m else f"error: {t.get('tp_error', '?')[:200]}")
    ok_t = t["widen_over_floor"] <= TIME_TARGET
    ok_m = mem["memory_ratio"] <= MEM_TARGET
    vs_tp = f"{t['widen_over_tp']:.2f}x" if "widen_over_tp" in t else "-"
    return (f"| {r['model']} | {t['params_before'] / 1e6:.1f}M → {t['params_after'] / 1e6:.1f}M | "
            f"{t['widened_spaces']} | {_fmt_s(m['floor_s'])} ({_fmt_s(m['trace_s'])} + {_fmt_s(m['clone_s'])}) | "
            f"{_fmt_s(m['widen_s'])} ({_fmt_s(t['first_call_s'])}) | {t['widen_over_floor']:.1f}x | "
            f"{m['widen_s'] / min(t['runs']['floor_s']):.1f}x | "
            f"{'pass' if ok_t else 'FAIL'} | {tp} | {vs_tp} | {mem['peak_above_build_bytes'] / 2**20:.0f} MB | "
            f"{mem['widened_bytes'] / 2**20:.0f} MB | {mem['memory_ratio']:.2f} | {'pass' if ok_m else 'FAIL'} |")


def write_md(path: str, data: dict) -> None:
    lines = ["# graphgrow.widen: time against the floor and Torch-Pruning, and peak memory", "",
             ("The issue's targets for `graphgrow.widen(model, 1.5, example_inputs=(x,), verify=\"none\")` at "
              "224×224: **required** widen ≤ 10× the floor (`torch.fx.symbolic_trace(model)` + "
              "`{k: v.clone() for k, v in wide.state_dict().items()}`), and peak RSS of the widening above the "
              "process size once the model is built ≤ 3× the bytes of the widened parameters (and buffers); "
              "**aim** faster than Torch-Pruning's graph build + one pruning step on the same model."), "",
             ("Method (benchmarks/widen_time.py): per model one *timing* subprocess (torchvision model, "
              "`torch.manual_seed(0)`, eval, input 1×3×224×224; one untimed warm-up of each operation, then the "
              "repeats interleaved: floor, widen, Torch-Pruning) and one fresh *memory* subprocess (build, read "
              "VmRSS, reset VmHWM with `echo 5 > /proc/self/clear_refs`, one widen, read VmHWM). "
              "Torch-Pruning = on a fresh `copy.deepcopy(model)` (not timed) "
              "`tp.pruner.MagnitudePruner(copy, x, importance=MagnitudeImportance(p=2), pruning_ratio=0.5, "
              "ignored_layers=[1000-way classifier], round_to=num_heads for ViT)` — whose constructor builds the "
              "DependencyGraph — plus one `pruner.step()`, as in Torch-Pruning's torchvision example; the table "
              "gives constructor + step, and `DependencyGraph().build_dependency(copy, example_inputs=x)` alone "
              "(DG) as a breakdown (not added in). Times are medians; *widen* shows the warm-up (first) call in "
              "parentheses; *widen / fastest floor* (median widen over the fastest floor repeat) is the "
              "conservative ratio, since the floor's clone varies several-fold with page faults; the memory ratio = "
              "(VmHWM − post-build VmRSS) / bytes of the widened model's parameters and buffers."), ""]
    order = [k for k in ("after", "before") if k in data["runs"]] + \
        [k for k in data["runs"] if k not in ("after", "before")]
    for label in order:
        run = data["runs"][label]
        meta = run["metadata"]
        origins = {}  # (file, commit, dirty) -> models
        for r in run["results"]:
            t = r.get("timing", {})
            if "graphgrow_file" in t:
                origins.setdefault((t["graphgrow_file"], t.get("commit", "?"), bool(t.get("graphgrow_dirty"))),
                                   []).append(r["model"])
        commands = []
        for r in run["results"]:
            c = r.get("command", meta["command"])
            if c not in commands:
                commands.append(c)
        lines += [f"## {label}", "",
                  "graphgrow imported from " + "; ".join(
                      f"`{f}` at commit `{c}`" + (" (with uncommitted changes in graphgrow/)" if d else "")
                      + (f" ({', '.join(ms)})" if len(origins) > 1 else "")
                      for (f, c, d), ms in origins.items())
                  + f"; benchmark script at commit `{meta.get('script_commit', '?')}` (plus this change).", "",
                  "Command" + ("s (one per row, each row's date in the repeats list below)" if len(commands) > 1
                               else "") + ": " + "; ".join(f"`{c}`" for c in commands), "",
                  (f"Date {meta['date']}; torch {meta['torch']}, torchvision {meta['torchvision']}, "
                   f"torch-pruning {meta['torch_pruning']}, python {meta['python']}; {meta['machine']['cpu']}, "
                   f"{meta['machine']['cpu_count']} CPUs, {meta['machine'].get('mem_gb', '?')} GB RAM; torch threads "
                   f"{', '.join(sorted({str(r['timing'].get('threads')) for r in run['results']}))}; repeats per "
                   f"model: {', '.join(str(r['model']) + ' ' + str(r['timing'].get('reps')) for r in run['results'])}. "
                   f"Wall time of the last command {meta.get('wall_s', 0) / 60:.1f} min."), "",
                  ("| model | params before → after | widened spaces | floor (trace + clone) | widen (first call) "
                   "| widen / floor | widen / fastest floor | ≤ 10× | Torch-Pruning (init + step; DG alone) "
                   "| widen / TP | peak RSS above build | widened param bytes | memory ratio | ≤ 3× |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["results"]:
            lines.append(_model_line(r))
        lines += ["", ("All repeats (s), load average (1/5/15 min) at the start and end of the timing process, and "
                       "the CPU time other processes took during each repeat:"), ""]
        for r in run["results"]:
            t = r["timing"]
            if "error" in t:
                continue
            rr = t["runs"]
            fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
            s = (f"- {r['model']}: widen {fmt(rr['widen_s'])}; floor {fmt(rr['floor_s'])} (trace "
                 f"{fmt(rr['trace_s'])}, clone {fmt(rr['clone_s'])}); widen/floor per repeat "
                 f"{fmt(t['per_rep_widen_over_floor'])}")
            if "tp_s" in rr:
                s += (f"; TP {fmt(rr['tp_s'])} (init {fmt(rr['tp_init_s'])}, step {fmt(rr['tp_step_s'])}, DG alone "
                      f"{fmt(rr['tp_dg_s'])}); widen/TP per repeat {fmt(t['per_rep_widen_over_tp'])}")
                tw = t.get("tp_warmup", {})
                if "tp_params_after" in tw:
                    s += f"; TP pruned model {tw['tp_params_after'] / 1e6:.1f}M params, output {tw['tp_output_shape']}"
            if "tp_error" in t:
                s += f"; TP error: `{t['tp_error'][:300]}`"
            mem = r["memory"]
            if "error" not in mem:
                s += (f"; memory: RSS after build {mem['rss_after_build_mb']} MB, peak {mem['peak_rss_mb']} MB, "
                      f"after widen {mem['rss_after_widen_mb']} MB ({mem['peak_method']})")
            s += f"; load {t['loadavg_start']} → {t['loadavg_end']}"
            if "others_cpu_s" in rr:
                s += (f"; CPU s used by other processes per repeat {fmt(rr['others_cpu_s'])} (of "
                      f"{fmt(rr['rep_wall_s'])} s wall × 2 cores)")
            if r.get("date"):
                s += f"; run {r['date']}"
            lines.append(s)
        lines.append("")
    if "before" in data["runs"] and "after" in data["runs"]:
        b = {r["model"]: r for r in data["runs"]["before"]["results"]}
        lines += ["## before → after", "",
                  ("| model | widen before | widen after | speed-up | widen/floor before → after | memory ratio "
                   "before → after |"), "|---|---|---|---|---|---|"]
        for r in data["runs"]["after"]["results"]:
            rb = b.get(r["model"])
            try:
                wa, wb = r["timing"]["median"]["widen_s"], rb["timing"]["median"]["widen_s"]
                lines.append(f"| {r['model']} | {_fmt_s(wb)} | {_fmt_s(wa)} | {wb / wa:.1f}x | "
                             f"{rb['timing']['widen_over_floor']:.1f}x → {r['timing']['widen_over_floor']:.1f}x | "
                             f"{rb['memory']['memory_ratio']:.2f} → {r['memory']['memory_ratio']:.2f} |")
            except (KeyError, TypeError):
                lines.append(f"| {r['model']} | n/a | | | | |")
        lines.append("")
    lines += [("The machine is shared (2 CPUs, 2 torch threads). Another process on it (e.g. a test suite) slows "
              "the OpenMP-parallel parts (the floor's clone, Torch-Pruning's forward passes) by up to 10-20x and the "
              "mostly-Python widen hardly at all, which flatters widen's ratios; so each row was run when the "
              "machine was quiet (the *after* and *before* rows of a model back to back, with `--merge --models "
              "MODEL`) and rerun when other processes took 5% or more of the CPU during its repeats (see the CPU "
              "seconds above). The floor's clone is memory-bound and also varies with whether the allocator "
              "reuses mapped pages; the ratios are good to tens of percent, not better."), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model-reps", default="", help="per-model repeats, e.g. densenet201=1,vit_b_16=1")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--label", default="after", help="key of this run in the JSON (e.g. before / after)")
    p.add_argument("--json", default=os.path.join(RESULTS, "widen_time.json"))
    p.add_argument("--md", default=os.path.join(RESULTS, "widen_time.md"))
    p.add_argument("--md-only", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--merge", action="store_true",
                   help="replace only the models run in this label's results (keep its other models)")
    p.add_argument("--timing-worker", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timing_worker or args.memory_worker:
        if args.timing_worker:
            res = timing_worker(args.timing_worker, args.factor, args.reps, args.size, args.threads)
        else:
            res = memory_worker(args.memory_worker, args.factor, args.size, args.threads)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0

    data = {"runs": {}}
    if os.path.exists(args.json):
        try:
            with open(args.json) as f:
                old = json.load(f)
            if isinstance(old, dict) and isinstance(old.get("runs"), dict):
                data = old
        except (OSError, ValueError):
            pass
    if args.md_only:
        write_md(args.md, data)
        return 0

    import torch
    import torchvision

    t_start = time.perf_counter()
    pp = os.environ.get("PYTHONPATH")
    command = (f"cd {os.getcwd()} && " + (f"PYTHONPATH={pp} " if pp else "")
               + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        timing = _run_worker("timing", name, args)
        memory = _run_worker("memory", name, args)
        results.append({"model": name, "timing": timing, "memory": memory, "command": command,
                        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")})
        if "error" in timing or "error" in memory:
            print(f"[widen_time] {name}: {timing.get('error') or memory.get('error')}", file=sys.stderr, flush=True)
            continue
        m = timing["median"]
        print(f"[widen_time] {args.label} {name} ({timing['graphgrow_file']}): widen {_fmt_s(m['widen_s'])}, floor "
              f"{_fmt_s(m['floor_s'])} ({timing['widen_over_floor']:.1f}x), tp "
              f"{_fmt_s(m['tp_s']) if 'tp_s' in m else timing.get('tp_error')}, memory ratio "
              f"{memory['memory_ratio']:.2f}; timing worker {timing['worker_wall_s']:.0f} s", file=sys.stderr,
              flush=True)

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:  # noqa: BLE001 - the version is only a label
        tp_version = "?"
    script_commit = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                                   text=True, check=False).stdout.strip()
    commands = [command]
    if args.merge and args.label in data["runs"]:
        prev = data["runs"][args.label]
        names = {r["model"] for r in results}
        kept = {r["model"]: r for r in prev["results"] if r["model"] not in names}
        new = {r["model"]: r for r in results}
        order = [r["model"] for r in prev["results"]] + [r["model"] for r in results
                                                         if r["model"] not in {q["model"] for q in prev["results"]}]
        results = [new.get(n) or kept[n] for n in order]
        commands = [c for c in prev["metadata"].get("commands", [prev["metadata"]["command"]]) if c != command]
        commands.append(command)
    meta = {"label": args.label,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "; ".join(commands), "commands": commands,
            "script_commit": script_commit, "wall_s": time.perf_counter() - t_start,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "torch_pruning": tp_version,
            "python": platform.python_version(),
            "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "mem_gb": mem_gb}}
    data["runs"][args.label] = {"metadata": meta, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    write_md(args.md, data)
    print(f"[widen_time] wrote {args.json} and {args.md}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
