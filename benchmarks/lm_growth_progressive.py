"""Does progressive growth save compute? (``lm_growth.py --progressive``; issue 21 part 4)

    PYTHONPATH=. python benchmarks/lm_growth.py --progressive --quick         # one worker process a CPU core
    PYTHONPATH=. python benchmarks/lm_growth.py --progressive --quick --report-only  # the table and plot again
    PYTHONPATH=. python benchmarks/lm_growth.py --progressive                       # the full CPU setting
    PYTHONPATH=. python benchmarks/lm_growth.py --progressive --device cuda         # sized for one GPU

The question: does training a small model, growing it once to the target shape and training on reach the
target model's from-scratch loss with fewer total training FLOPs than training the target from scratch?

Data, batches, validation windows and the Llama family are lm_growth.py's. A small Llama (``hidden`` x
``layers``) is trained for the whole budget of ``budget`` steps alone (its curve shows where it plateaus: the
capacity limit growth must lift) and, at step ``grow_at``, its weights and AdamW state are taken by every
schedule: grown once, then trained on the same batches to step ``budget``. Two targets, each also trained from
scratch for ``budget`` steps: *wide* (hidden x2, heads x2, MLP x2: ~3x the parameters) and *deep* (layers x2).
Growth operators: width x2 by replication with exact zero-sum noise (function-preserving; noise 0.01 and 1 x
each weight's standard deviation: the copies' consumer columns apart, their producer rows equal) and the random-pad
baseline (new units random, not preserving) to the wide target; depth x2 by block copy (each layer followed by
its copy with zeroed output projections, preserving) and G_stack (the stack repeated, not preserving) to the
deep target. Optimizer modes (graphgrow.grow_optimizer): ``reset`` (a fresh AdamW, re-warmed up like any fresh
start), ``copy`` (the state mapped like the weights) and ``dual`` (the map the gradient obeys at the growth
point); a mode the growth cannot map is skipped and named in the report.

Learning rate: one peak for every run, linear warmup then cosine to ``min_lr`` x peak over the whole budget,
indexed by the global step (a grown model continues the schedule where the small one left it).

FLOPs: per training token 6 x N + 6 x layers x seq x hidden (Kaplan et al.'s estimate: N the parameters
without the input embedding, a lookup; the second term the attention scores and values), times batch x seq
tokens per step; evaluation not counted. A schedule's FLOPs count the small model's ``grow_at`` steps. The
FLOPs to the from-scratch loss are interpolated linearly between evaluations on each seed's curve, against that
seed's from-scratch final loss (every seed sees its own batches, the same across its runs).

Results: benchmarks/results/lm_growth/progressive_<setting>.md, progressive_<setting>_curves.json and, with
matplotlib, progressive_<setting>.png.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import glob
import json
import math
import multiprocessing
import os
import time

import lm_growth as base
import numpy as np
import torch
import transformers

import graphgrow

PROGRESSIVE_SETTINGS = {
    # small: 38k parameters (wide target 119k, deep 60k): 57 runs, 36.7 min of runs in all, 18.4 min of wall time
    # with --jobs 2 on this machine's 2 cores (measured 2026-12-04)
    "quick": dict(hidden=32, layers=2, heads=4, kv=2, ffn=80, seq=64, batch=16, budget=2000, grow_at=1000,
                  early_grow_at=500, eval_every=100, eval_batches=8, seeds=3, lr=3e-3, warmup=50, min_lr=0.1),
    # small 0.12M (wide 0.41M, deep 0.21M), 16 x 128 tokens a step: 15x the quick run's training FLOPs (1.2e14 a
    # seed); ~4.5 h with --jobs 2 on 2 cores, scaled from the quick run (not run)
    "full": dict(hidden=64, layers=2, heads=4, kv=2, ffn=160, seq=128, batch=16, budget=4000, grow_at=2000,
                 early_grow_at=1000, eval_every=200, eval_batches=32, seeds=3, lr=2e-3, warmup=100, min_lr=0.1),
    # small 3.2M (wide 12M, deep 6M), 64 x 256 tokens a step: 5.4e16 FLOPs a seed, 64,000 steps a seed; tiny
    # models are launch-bound on a GPU (~15 ms a step): estimated ~1 h for 3 seeds on one GPU (not run)
    "cuda": dict(hidden=256, layers=4, heads=8, kv=4, ffn=688, seq=256, batch=64, budget=8000, grow_at=4000,
                 early_grow_at=2000, eval_every=400, eval_batches=32, seeds=3, lr=1e-3, warmup=200, min_lr=0.1),
}
MODES = ("reset", "copy", "dual")
SCRATCH = {"wide": "wide target from scratch", "deep": "deep target from scratch"}
SMALL = "small model alone"


def _grow_widen(teacher, x, seed):
    return graphgrow.widen(teacher, 2, example_inputs=(x,), noise=0.01, noise_mode="exact", seed=seed)


def _grow_widen_noisy(teacher, x, seed):  # the copies' consumer columns apart by as much as the weights themselves
    return graphgrow.widen(teacher, 2, example_inputs=(x,), noise=1.0, noise_mode="exact", seed=seed)


def _grow_pad(teacher, x, seed):
    return graphgrow.widen(teacher, 2, example_inputs=(x,), init="random-pad", seed=seed, verify="none")


def _grow_copy(teacher, x, seed):
    return graphgrow.deepen(teacher, after=r"model\.layers\.\d+", block="copy", example_inputs=(x,))


def _grow_stack(teacher, x, seed):
    return graphgrow.deepen(teacher, after=None, block="stack", times=2, example_inputs=(x,))


# operator -> (target, grow(teacher, example ids, seed), optimizer modes tried)
W1, W001, PAD = ("width x2 (replicate + exact noise 1)", "width x2 (replicate + exact noise 0.01)",
                 "width x2 random pad")
COPY, STACK = "depth x2 (block copy)", "depth x2 G_stack"
OPERATORS = {W1: ("wide", _grow_widen_noisy), W001: ("wide", _grow_widen), PAD: ("wide", _grow_pad),
             COPY: ("deep", _grow_copy), STACK: ("deep", _grow_stack)}
# (operator, growth step: "main" = grow_at or "early" = early_grow_at, optimizer mode), in the order they run (the
# most telling first: a run cut short by its time has them).  No "dual" for random pad and G_stack: the dual map is
# the gradient's at a growth point where the grown model computes the small one's function, which they do not.
SCHEDULES = [(W1, "main", "reset"), (W1, "main", "copy"), (W1, "main", "dual"),
             (COPY, "main", "reset"), (COPY, "main", "copy"), (COPY, "main", "dual"),
             (W1, "early", "reset"), (COPY, "early", "reset"), (STACK, "early", "reset"),
             (PAD, "main", "reset"), (STACK, "main", "reset"), (STACK, "main", "copy"),
             (W001, "main", "reset"), (W001, "main", "dual"), (PAD, "early", "reset"), (PAD, "main", "copy")]


def small_config(s: dict) -> transformers.LlamaConfig:
    return base.teacher_config(s)


def step_flops(config, model, s: dict) -> float:
    """Training FLOPs of one step (see the module docstring)."""
    n = base.n_params(model) - model.get_input_embeddings().weight.numel()
    per_token = 6 * n + 6 * config.num_hidden_layers * s["seq"] * config.hidden_size
    return float(per_token * s["batch"] * s["seq"])


def lr_at(step: int, s: dict, rewarm_from: int | None = None) -> float:
    """Warmup, then cosine over the whole budget to min_lr x peak; ``rewarm_from``: a fresh optimizer started
    there warms up again."""
    start = 0 if rewarm_from is None else rewarm_from
    warm = min(1.0, (step - start) / s["warmup"])
    cos = 0.5 * (1 + math.cos(math.pi * min(step, s["budget"]) / s["budget"]))
    return s["lr"] * warm * (s["min_lr"] + (1 - s["min_lr"]) * cos)


def train_span(model, opt, first: int, last: int, data, val, s: dict, seed: int, device, curve: list,
               rewarm_from=None, at=None) -> None:
    """Steps first..last (global step numbers: the batch and the learning rate of each), evaluations appended to
    ``curve`` every eval_every steps; ``at``: {step: callback(model, opt)} run after that step."""
    model.train()
    for step in range(first, last + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s, rewarm_from)
        loss = base._loss(model, base.batch(data, step, seed, s["batch"], s["seq"], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % s["eval_every"] == 0 or step == last:
            curve.append((step, base.val_loss(model, val, s, device)))
        if at and step in at:
            at[step](model, opt)


def adamw(model, s: dict):
    return torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)


# --- the runs, as independent tasks (each in a worker process; see run()) ------------------------------------

_WORKER = {}  # per worker process: the corpus, read once


def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    _WORKER["corpus"] = base.corpus()


def _data():
    if "corpus" not in _WORKER:
        _WORKER["corpus"] = base.corpus()
    return _WORKER["corpus"][:2]


def _snap_path(snap_prefix: str, at: int) -> str:
    return f"{snap_prefix}_at{at}.pt"


def _example_ids(seed: int) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    x[0, 0] = 255  # graphgrow draws its check inputs up to the example's maximum
    return x


def small_task(seed: int, s: dict, device, snap_prefix: str) -> dict:
    """The small model alone for the whole budget; its weights and AdamW state at every growth step kept on
    disk (``snap_prefix``_at<step>.pt) for the schedules."""
    data, val = _data()
    cfg = small_config(s)
    torch.manual_seed(seed)
    small = transformers.LlamaForCausalLM(cfg).to(device)
    opt = adamw(small, s)

    def keep(model, o, step):
        path = _snap_path(snap_prefix, step)
        torch.save({"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    "opt": copy.deepcopy(o.state_dict())}, path + ".tmp")
        os.replace(path + ".tmp", path)

    grow_steps = {s["grow_at"]} | ({s["early_grow_at"]} if s.get("early_grow_at") else set())
    curve = [(0, base.val_loss(small, val, s, device))]
    train_span(small, opt, 1, s["budget"], data, val, s, seed, device, curve,
               at={st: (lambda m, o, st=st: keep(m, o, st)) for st in grow_steps})
    return dict(curve=curve, params=base.n_params(small), flops_per_step=step_flops(cfg, small, s), target=None)


def target_config(target: str, s: dict, seed: int):
    """The target's config: what the first operator to it makes of the small model (its shape does not depend
    on the weights, so a freshly initialised small model gives it)."""
    op = next(n for n, (t, _) in OPERATORS.items() if t == target)
    torch.manual_seed(seed)
    return OPERATORS[op][1](transformers.LlamaForCausalLM(small_config(s)).eval(), _example_ids(seed), seed).config


def scratch_task(seed: int, s: dict, device, target: str) -> dict:
    """The target trained from scratch for the whole budget."""
    data, val = _data()
    tcfg = target_config(target, s, seed)
    torch.manual_seed(1000 + seed)
    model = transformers.LlamaForCausalLM(copy.deepcopy(tcfg)).to(device)
    curve = [(0, base.val_loss(model, val, s, device))]
    train_span(model, adamw(model, s), 1, s["budget"], data, val, s, seed, device, curve)
    return dict(curve=curve, params=base.n_params(model), flops_per_step=step_flops(tcfg, model, s), target=target)


def schedule_task(seed: int, s: dict, device, snap_prefix: str, label: str, op: str, at: int, mode: str,
                  small_flops: float) -> dict:
    """The small model's snapshot at step ``at`` grown by ``op``, its optimizer by ``mode``, trained to the end
    of the budget; a mode the growth cannot map comes back as ``skipped`` with graphgrow's sentence."""
    data, val = _data()
    target, grow = OPERATORS[op]
    snap = torch.load(_snap_path(snap_prefix, at), map_location="cpu", weights_only=True)
    teacher = transformers.LlamaForCausalLM(small_config(s))
    teacher.load_state_dict(snap["model"])
    teacher.eval()
    t_opt = adamw(teacher, s)
    t_opt.load_state_dict(snap["opt"])
    started = time.time()
    student = grow(teacher, _example_ids(seed), seed)
    report = student.graphgrow_report
    try:
        new_opt = adamw(student, s) if mode == "reset" else \
            graphgrow.grow_optimizer(t_opt, teacher, student, mode=mode)
    except (graphgrow.GraphGrowError, AttributeError) as exc:
        return dict(skipped=str(exc).splitlines()[0], target=target)
    grow_s = time.time() - started
    student.to(device)
    new_opt.load_state_dict(new_opt.state_dict())  # state tensors onto the parameters' device
    curve = [(at, base.val_loss(student, val, s, device))]
    train_span(student, new_opt, at + 1, s["budget"], data, val, s, seed, device, curve,
               rewarm_from=at if mode == "reset" else None)
    return dict(curve=curve, params=base.n_params(student), flops_per_step=step_flops(student.config, student, s),
                small_flops_per_step=small_flops, target=target, operator=label, mode=mode, grow_at=at,
                deviation=report.deviation if not report.function_preserving else 0.0,
                function_preserving=report.function_preserving, grow_seconds=grow_s)


def schedules(s: dict) -> list:
    """[(run key, label, operator, growth step, mode)] in SCHEDULES' order."""
    out = []
    for name, when, mode in SCHEDULES:
        at = s["grow_at"] if when == "main" else s.get("early_grow_at")
        if at:
            label = name if when == "main" else f"{name}, grown at {at}"
            out.append((f"{label} | {mode}", label, name, at, mode))
    return out


def _timed(fn, *args):
    started = time.time()
    return fn(*args), time.time() - started


def flops_curve(run: dict, s: dict) -> list:
    """[(total FLOPs spent, validation loss)]: a grown run carries the small model's grow_at steps."""
    if "small_flops_per_step" not in run:
        return [(step * run["flops_per_step"], loss) for step, loss in run["curve"]]
    at = run.get("grow_at", s["grow_at"])
    return [(at * run["small_flops_per_step"] + (step - at) * run["flops_per_step"], loss)
            for step, loss in run["curve"]]


def flops_to(points: list, target: float):
    """The FLOPs at which the curve first reaches ``target`` (linear between evaluations); None if never."""
    prev = None
    for f, loss in points:
        if loss <= target:
            if prev is None or prev[1] <= target:
                return f
            (f0, l0) = prev
            return f0 + (f - f0) * (l0 - target) / (l0 - loss)
        prev = (f, loss)
    return None


def loss_at(points: list, flops: float):
    """The curve's loss at ``flops`` (linear between evaluations); None outside it."""
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return None


def _seed_file(out_dir: str, setting: str, seed: int, ext: str = "json") -> str:
    return os.path.join(out_dir, f"progressive_{setting}_seed{seed}.{ext}")


def _earlier(path: str, s: dict) -> tuple:
    """(finished runs, seconds spent) of an interrupted invocation of the same setting ({} and 0 where none)."""
    if not os.path.exists(path):
        return {}, 0.0
    with open(path) as f:
        old = json.load(f)
    if old.get("config") != json.loads(json.dumps(s)):
        return {}, 0.0
    return {k: v for k, v in old["runs"].items() if "curve" in v}, old.get("seconds", 0.0)


class _InProcess:
    """A one-worker stand-in for ProcessPoolExecutor (``--jobs 1``): tasks run in this process, in the order
    submitted, one each time ``wait_one`` is called."""

    def __init__(self):
        self.queue = collections.deque()

    def submit(self, fn, *args):
        fut = concurrent.futures.Future()
        self.queue.append((fut, fn, args))
        return fut

    def wait_one(self):
        fut, fn, args = self.queue.popleft()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller through the future, as a pool does
            fut.set_exception(exc)
        return [fut]

    def shutdown(self, wait=True, cancel_futures=False):
        self.queue.clear()


def run(setting: str, device: str, out_dir: str, threads: int, only_seed: int | None = None,
        jobs: int = 1) -> None:
    """Every run of every seed (or of ``only_seed``) as tasks on ``jobs`` worker processes: each seed's small
    model and both from-scratch targets first, each seed's schedules as soon as its small model has its
    snapshots.  Each seed's finished runs go to progressive_<setting>_seed<k>.json as they finish: an interrupted
    invocation resumes where it stopped.  When every seed is complete the seeds are merged and reported."""
    s = PROGRESSIVE_SETTINGS[setting]
    _, _, desc = base.corpus()
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    log(f"progressive growth ({setting}): {desc}; {jobs} worker process{'es' if jobs > 1 else ''}")
    header = {"setting": setting, "config": s, "corpus": desc, "device": device, "threads": threads}
    os.makedirs(out_dir, exist_ok=True)
    seeds = list(range(s["seeds"])) if only_seed is None else [only_seed]
    runs, before = {}, {}
    for seed in seeds:
        runs[seed], before[seed] = _earlier(_seed_file(out_dir, setting, seed), s)
        if runs[seed]:
            log(f"seed {seed}: {len(runs[seed])} runs kept from an earlier invocation ({before[seed]:.0f} s)")
    busy = {seed: 0.0 for seed in seeds}  # seconds this invocation's tasks of each seed took

    def save(seed):
        path = _seed_file(out_dir, setting, seed)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(header, seed=seed, runs=runs[seed], seconds=before[seed] + busy[seed]), f)
        os.replace(path + ".tmp", path)

    def snap_prefix(seed):
        return _seed_file(out_dir, setting, seed, "pt")[:-len(".pt")]

    def snapshots_there(seed):
        steps = {s["grow_at"]} | ({s["early_grow_at"]} if s.get("early_grow_at") else set())
        return all(os.path.exists(_snap_path(snap_prefix(seed), st)) for st in steps)

    pool = _InProcess() if jobs <= 1 else concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(threads or 1,))
    pending = {}

    def submit(seed, key, fn, *args):
        pending[pool.submit(_timed, fn, *args)] = (seed, key)

    def submit_schedules(seed):
        small_flops = runs[seed][SMALL]["flops_per_step"]
        for key, label, op, at, mode in schedules(s):
            if key not in runs[seed]:
                submit(seed, key, schedule_task, seed, s, device, snap_prefix(seed), label, op, at, mode,
                       small_flops)

    todo = sum(1 for seed in seeds for key in [SMALL, *SCRATCH.values()] + [k[0] for k in schedules(s)]
               if key not in runs[seed])
    finished = 0
    try:
        for seed in seeds:
            if SMALL not in runs[seed] or not snapshots_there(seed):
                runs[seed].pop(SMALL, None)
                submit(seed, SMALL, small_task, seed, s, device, snap_prefix(seed))
            for target in ("wide", "deep"):
                if SCRATCH[target] not in runs[seed]:
                    submit(seed, SCRATCH[target], scratch_task, seed, s, device, target)
        for seed in seeds:
            if SMALL in runs[seed]:
                submit_schedules(seed)
        while pending:
            done = pool.wait_one() if isinstance(pool, _InProcess) else \
                concurrent.futures.wait(list(pending), return_when=concurrent.futures.FIRST_COMPLETED)[0]
            for fut in done:
                seed, key = pending.pop(fut)
                result, seconds = fut.result()
                runs[seed][key] = result
                busy[seed] += seconds
                save(seed)
                finished += 1
                what = f"skipped ({result['skipped']})" if "skipped" in result else \
                    f"val {result['curve'][0][1]:.3f} -> {result['curve'][-1][1]:.3f}"
                log(f"[{finished}/{todo}] seed {seed}: {key}: {what} ({seconds:.0f} s)")
                if key == SMALL:
                    submit_schedules(seed)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if only_seed is None:
        results = merge_seeds(out_dir, setting)
        results.update(wall_seconds=time.time() - started, jobs=jobs)
        with open(os.path.join(out_dir, f"progressive_{setting}_curves.json"), "w") as f:
            json.dump(results, f)
        report(results, out_dir)


def _ms(values: list, fmt: str = "{:.3f}") -> str:
    if not values:
        return "—"
    return (fmt + " ± " + fmt).format(np.mean(values), np.std(values))


def summarize(results: dict) -> dict:
    """name -> figures over seeds (final losses, FLOPs, FLOPs to the from-scratch final loss, ...)."""
    s = results["config"]
    seeds = results["seeds"]
    out = {}
    names = list(dict.fromkeys(n for seed in seeds for n in seed))  # every run of any seed (one cut short lacks some)
    for name in names:
        runs = [r[name] for r in seeds if name in r and "curve" in r[name]] or \
            [r[name] for r in seeds if name in r]
        if "skipped" in runs[0]:
            out[name] = dict(skipped=runs[0]["skipped"], target=runs[0]["target"])
            continue
        row = dict(target=runs[0]["target"], params=runs[0]["params"], finals=[r["curve"][-1][1] for r in runs],
                   seeds=len(runs),
                   total=[flops_curve(r, s)[-1][0] for r in runs], mode=runs[0].get("mode"),
                   operator=runs[0].get("operator"))
        if "small_flops_per_step" in runs[0]:
            at = runs[0].get("grow_at", s["grow_at"])
            row["before"] = [dict(seed[SMALL]["curve"])[at] for seed in seeds if "curve" in seed.get(name, {})]
            row["after"] = [r["curve"][0][1] for r in runs]
            row["deviation"] = runs[0]["deviation"]
        for target in ("wide", "deep"):
            scratch = [seed.get(SCRATCH[target]) for seed in seeds if "curve" in seed.get(name, {})]
            if all(scratch) and (row["target"] in (None, target)):
                goal = [sc["curve"][-1][1] for sc in scratch]
                reach = [flops_to(flops_curve(r, s), g) for r, g in zip(runs, goal)]
                ref = [flops_curve(sc, s)[-1][0] for sc in scratch]
                same = [loss_at(flops_curve(sc, s), t) for sc, t in zip(scratch, row["total"])]
                row.setdefault("to", {})[target] = dict(reach=reach, ratio=[None if f is None else f / rf
                                                                             for f, rf in zip(reach, ref)],
                                                        scratch_at_same=same)
        out[name] = row
    return out


def _target_table(results: dict, rows: dict, target: str) -> list:
    lines = [f"| run | optimizer | params | val loss before -> right after growth | final val loss (mean ± sd) | "
             f"total FLOPs (x1e12) | from-scratch loss at the same FLOPs | FLOPs to the from-scratch final loss "
             f"(x1e12, per seed) | as a fraction of the from-scratch budget (mean ± sd) |",
             "|---|---|---|---|---|---|---|---|---|"]
    grown = [n for n, r in rows.items() if r.get("target") == target and n != SCRATCH[target]]
    order = [SCRATCH[target], SMALL] + sorted(grown, key=lambda n: ", grown at " in n)  # the earlier growth last
    for name in order:
        r = rows[name]
        label, mode = (name.split(" | ") + [""])[:2] if " | " in name else (name, "—")
        if "skipped" in r:
            lines.append(f"| {label} | {mode} | — | skipped: {r['skipped']} | — | — | — | — | — |")
            continue
        jump = (f"{np.mean(r['before']):.3f} -> {np.mean(r['after']):.3f}" if "before" in r else "—")
        if r["seeds"] < len(results["seeds"]):
            label += f" ({r['seeds']} of {len(results['seeds'])} seeds: the run was cut short)"
        to = r["to"][target]
        reach = ", ".join("not reached" if f is None else f"{f / 1e12:.3f}" for f in to["reach"])
        ratios = [x for x in to["ratio"] if x is not None]
        frac = "—" if not ratios else _ms(ratios, "{:.2f}") + (
            "" if len(ratios) == len(to["ratio"]) else f" ({len(ratios)}/{len(to['ratio'])} seeds)")
        same = "—" if name == SCRATCH[target] else _ms([x for x in to["scratch_at_same"] if x is not None])
        lines.append(f"| {label} | {mode} | {r['params']:,} | {jump} | {_ms(r['finals'])} | "
                     f"{np.mean(r['total']) / 1e12:.3f} | {same} | {reach} | {frac} |")
    return lines


def _findings(rows: dict, target: str) -> list:
    """Plain sentences computed from the table: what reaches the from-scratch loss and at what cost, and how
    much the optimizer mode moves the final loss."""
    out = []
    grown = {n: r for n, r in rows.items() if r.get("target") == target and r.get("mode") and "skipped" not in r}
    reached = {n: r["to"][target]["ratio"] for n, r in grown.items()
               if all(x is not None for x in r["to"][target]["ratio"])}
    if reached:
        best = min(reached, key=lambda n: np.mean(reached[n]))
        ratio = np.mean(reached[best])
        out.append(f"- {target}: {len(reached)} of {len(grown)} schedules reach the from-scratch final loss in every "
                   f"seed; the cheapest, {best}, needs {ratio:.2f} ± {np.std(reached[best]):.2f} of its FLOPs ("
                   + (f"{(1 - ratio) * 100:.0f} % fewer)" if ratio < 1 else f"{(ratio - 1) * 100:.0f} % more)"))
    else:
        out.append(f"- {target}: no schedule reaches the from-scratch final loss in every seed.")
    partly = [n for n, r in grown.items() if n not in reached and any(x is not None for x in r["to"][target]["ratio"])]
    if partly:
        out.append(f"- {target}: in some seeds only: {', '.join(partly)}.")
    for op in sorted({r["operator"] for r in grown.values()}):
        modes = {r["mode"]: r["finals"] for r in grown.values() if r["operator"] == op}
        if len(modes) > 1:
            spread = max(np.mean(v) for v in modes.values()) - min(np.mean(v) for v in modes.values())
            sd = max(np.std(v) for v in modes.values())
            out.append(f"- {op}: final loss by optimizer mode " + ", ".join(
                f"{m} {np.mean(v):.3f}" for m, v in modes.items()) + f" (spread {spread:.3f}; seed sd up to {sd:.3f})")
    return out


def _wall(results: dict) -> str:
    """How long the invocation took: its wall time and worker processes where recorded (the parallel runner),
    else the seeds' sum of run times (earlier invocations ran the seeds one after another)."""
    busy = results.get("seconds", 0) / 60
    if "wall_seconds" not in results:
        return f"{busy:.1f} min of wall time (the seeds' sum)"
    return (f"{results['wall_seconds'] / 60:.1f} min of wall time with {results['jobs']} worker processes "
            f"({busy:.1f} min the runs' sum)")


def report(results: dict, out_dir: str) -> None:
    s = results["config"]
    rows = summarize(results)
    small = rows[SMALL]
    sm_curves = [seed[SMALL]["curve"] for seed in results["seeds"]]

    def small_at(step):
        return np.mean([dict(c)[step] for c in sm_curves if step in dict(c)])

    quarter = s["budget"] * 3 // 4 // s["eval_every"] * s["eval_every"]
    cmd = "PYTHONPATH=. python benchmarks/lm_growth.py --progressive" + (
        " --quick" if results["setting"] == "quick" else " --device cuda" if results["setting"] == "cuda" else "")
    threads = results.get("threads") or "all"
    if results.get("jobs", 1) > 1:
        cmd += f" --jobs {results['jobs']}"
    lines = [f"# lm_growth --progressive: {results['setting']}", "",
             f"`{cmd} --threads {threads}` on {results['device']}; {results['corpus']}; {len(results['seeds'])} "
             f"seeds; {_wall(results)}; torch {torch.__version__}, transformers {transformers.__version__}", ""]
    notes = os.path.join(out_dir, f"progressive_{results['setting']}_notes.md")
    if os.path.exists(notes):  # (the run's conditions and the summary, written by hand after reading the tables)
        with open(notes) as f:
            lines += [f.read().rstrip(), ""]
    lines += [
             f"Small model: Llama hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads ({s['kv']} kv), MLP "
             f"{s['ffn']}, {small['params']:,} params. Budget {s['budget']} steps of {s['batch']} x {s['seq']} bytes "
             f"for every run; schedules grow the small model once at step {s['grow_at']} (\"grown at "
             f"{s.get('early_grow_at')}\": earlier, optimizer reset) and train the grown model "
             f"to step {s['budget']}. AdamW (weight decay 0.01), peak lr {s['lr']}, warmup {s['warmup']} steps, "
             f"cosine to {s['min_lr']} x peak over the budget (a reset optimizer warms up again). FLOPs: 6 x N + "
             f"6 x layers x seq x hidden per token (N without the input embedding), the small model's steps "
             f"counted. \"FLOPs to the from-scratch final loss\": where each seed's curve first reaches that seed's "
             f"from-scratch final loss, interpolated between evaluations (every {s['eval_every']} steps).", "",
             f"The small model alone (capacity-limited): val loss {small_at(s['grow_at']):.3f} at step "
             f"{s['grow_at']}, {small_at(quarter):.3f} at {quarter}, {np.mean(small['finals']):.3f} at "
             f"{s['budget']} (the wide target from scratch ends at "
             f"{np.mean(rows[SCRATCH['wide']]['finals']):.3f}, the deep at "
             f"{np.mean(rows[SCRATCH['deep']]['finals']):.3f}).", ""]
    for target, what in (("wide", "width x2 (hidden, heads, MLP)"), ("deep", "depth x2")):
        lines += [f"## {target} target: {what}, {rows[SCRATCH[target]]['params']:,} params", ""]
        lines += _target_table(results, rows, target) + [""]
    devs = {r["operator"]: r["deviation"] for r in rows.values() if r.get("deviation")}
    if devs:
        lines += ["Not function-preserving growth, logits' max rel deviation from the small model at the growth "
                  "point (seed 0): " + "; ".join(f"{k}: {v:.3g}" for k, v in devs.items()), ""]
    lines += ["## Findings (computed from the tables)", ""] + _findings(rows, "wide") + _findings(rows, "deep")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"progressive_{results['setting']}.md"), "w") as f:
        f.write(text)
    print(text)
    _plot(results, out_dir)


STYLE = {"reset": ":", "copy": "--", "dual": "-"}


def _plot(results: dict, out_dir: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib, then --report-only)")
        return
    s = results["config"]
    seeds = results["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {}
    for ax, target in zip(axes, ("wide", "deep")):
        every = {n: r for seed in seeds for n, r in seed.items() if "curve" in r}
        names = [SCRATCH[target], SMALL] + [n for n, r in every.items() if r.get("target") == target
                                            and n != SCRATCH[target]]
        for name in names:
            curves = [flops_curve(seed[name], s) for seed in seeds if "curve" in seed.get(name, {})]
            f = np.array([p[0] for p in curves[0]]) / 1e12
            losses = np.array([[p[1] for p in c] for c in curves])
            m, sd = losses.mean(0), losses.std(0)
            op = name.split(" | ")[0]
            mode = name.split(" | ")[1] if " | " in name else None
            color = "black" if name == SCRATCH[target] else "grey" if name == SMALL else \
                colors.setdefault(op, f"C{len(colors)}")
            ax.plot(f, m, STYLE.get(mode, "-"), color=color, label=name, lw=1.2)
            ax.fill_between(f, m - sd, m + sd, color=color, alpha=0.12)
        goal = np.mean([seed[SCRATCH[target]]["curve"][-1][1] for seed in seeds])
        ax.axhline(goal, color="black", lw=0.6, ls="-.")
        ax.set_title(f"{target} target (grown at step {s['grow_at']}"
                     + (f" or {s['early_grow_at']}" if s.get("early_grow_at") else "") + f" of {s['budget']})")
        ax.set_xlabel("total training FLOPs (x1e12)")
        ax.set_ylim(goal - 0.15, goal + 0.6)
        ax.legend(fontsize=6)
    for ax in axes:
        ax.set_ylabel("validation loss (bytes, nats)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"progressive_{results['setting']}.png"), dpi=120)


def merge_seeds(out_dir: str, setting: str):
    """The per-seed files as one result, written to progressive_<setting>_curves.json (the per-seed files and
    the small models' snapshots removed); None unless every seed's is there and complete.  ``seconds``: the
    seeds' sum, or the longest seed's where they ran side by side (``parallel_seeds``)."""
    n = PROGRESSIVE_SETTINGS[setting]["seeds"]
    paths = [_seed_file(out_dir, setting, k) for k in range(n)]
    if not all(os.path.exists(p) for p in paths):
        return None
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    out = {k: v for k, v in parts[0].items() if k not in ("seed", "runs", "seconds")}
    out.update(seeds=[p["runs"] for p in parts], seconds=sum(p["seconds"] for p in parts))
    with open(os.path.join(out_dir, f"progressive_{setting}_curves.json"), "w") as f:
        json.dump(out, f)
    for k, p in enumerate(paths):
        os.remove(p)
        for snap in glob.glob(_seed_file(out_dir, setting, k, "pt").replace(".pt", "*.pt")):
            os.remove(snap)
    return out


def main(setting: str, args) -> None:
    if args.report_only:
        results = merge_seeds(args.out, setting)
        if results is None:
            with open(os.path.join(args.out, f"progressive_{setting}_curves.json")) as f:
                results = json.load(f)
        report(results, args.out)
        return
    jobs = args.jobs or (1 if args.device.startswith("cuda") else max(1, os.cpu_count() or 1))
    threads = args.threads or (1 if jobs > 1 else max(1, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    run(setting, args.device, args.out, threads, args.only_seed, jobs)
