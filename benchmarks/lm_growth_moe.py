"""Does upcycling a trained dense model into a mixture of experts pay? (``lm_growth.py --moe``; issue 20 part 5)

    PYTHONPATH=. python benchmarks/lm_growth.py --moe --quick --threads 1   # <= 25 min on 2 loaded CPU cores

The data, batches, validation windows and the dense teacher (a Llama trained ``teacher_steps``) are
lm_growth.py's, seed for seed. Experiment 1: the teacher upcycled by graphgrow.upcycle to Mixtral with 4 and 8
experts, top-2, random router rows (exact: Mixtral renormalises its top-k weights and every expert is a copy of
the dense MLP, so any selection computes the dense MLP; the step-0 validation loss is asserted equal to the
teacher's within 1e-4), trained on; against the teacher trained on (dense) and a Mixtral of the same shape from
random init. Experiment 2: the 4-expert model after its training grown to 8 experts by graphgrow.grow_experts,
top-k raised 2 -> 4 (exact, asserted) and top-k kept at 2 (inexact, the deviation reported), against the
4-expert model trained on. Every arm sees the same batches at the same step; lr swept per arm; the MoE arms'
training loss adds Mixtral's load-balancing loss at its default router_aux_loss_coef (0.001), the validation
loss is the cross-entropy alone.

FLOPs: 6 x active parameters x tokens (training steps only, attention scores and evaluation not counted);
active parameters = every parameter (embeddings, lm head and routers included) except the routed experts, of
which top-k / E count. The upcycled and teacher-trained-on arms carry the teacher's pretraining FLOPs;
experiment 2's arms also carry the 4-expert model's training. Equal-FLOPs losses are interpolated linearly
between evaluations.

Results: benchmarks/results/lm_growth/moe_<setting>.md, moe_<setting>_curves.json, moe_<setting>.png.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import lm_growth as base
import numpy as np
import torch
import transformers

import graphgrow

EXACT_TOL = 1e-4  # step-0 validation loss of an exact construction against its source's
# the teacher's setting is lm_growth's; the arms' lengths and sweeps are the MoE experiment's own
MOE_SETTINGS = {
    "quick": dict(base.SETTINGS["quick"], student_steps=300, grow_steps=300, experts=(4, 8), top_k=2,
                  student_lrs=(3e-4, 1e-3), scratch_lrs=(1e-3, 3e-3), four_lr=1e-3, grow_lrs=(1e-3,)),
    "full": dict(base.SETTINGS["full"], grow_steps=1000, experts=(4, 8), top_k=2, four_lr=1e-3, grow_lrs=(5e-4, 1e-3)),
    "cuda": dict(base.SETTINGS["cuda"], grow_steps=1500, experts=(4, 8), top_k=2, four_lr=6e-4, grow_lrs=(3e-4, 6e-4)),
}
DENSE = "dense teacher trained on"


def up_name(e: int) -> str:
    return f"upcycled x{e} (top-2, random routers)"


def scratch_name(e: int) -> str:
    return f"Mixtral x{e} from random init"


GROW = {"continued": "4 experts trained on (top-2)", "raised": "grown to 8, top-k 2 -> 4 (exact)",
        "kept": "grown to 8, top-k kept 2 (inexact)"}


def moe_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the family's load-balancing loss at its config's router_aux_loss_coef."""
    out = model(input_ids=x[:, :-1], use_cache=False, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
    return ce + model.config.router_aux_loss_coef * out.aux_loss


def active_params(model) -> int:
    """Parameters one token runs through: the routed experts count top-k / E."""
    total = base.n_params(model)
    experts = getattr(model.config, "num_local_experts", None)
    if not experts:
        return total
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - routed + routed * model.config.num_experts_per_tok // experts


def _round_up(steps: float, every: int) -> int:
    return int(math.ceil(steps / every) * every)


def _arm(model, steps, lr, data, val, s, seed, device, start, prior_flops, **extra) -> dict:
    curve = base.train(model, steps, lr, data, val, s, seed, device, start=start,
                       loss_fn=moe_loss if getattr(model.config, "num_local_experts", None) else None)
    return dict(seed=seed, curve=curve, params=base.n_params(model), active=active_params(model),
                prior_flops=prior_flops, **extra)


def _check_exact(what: str, got: float, want: float) -> None:
    if abs(got - want) > EXACT_TOL:
        raise AssertionError(f"{what}: step-0 validation loss {got:.6f} != {want:.6f} (tolerance {EXACT_TOL})")


def one_seed(seed: int, s: dict, data, val, device, started: float) -> tuple:
    tokens = s["batch"] * s["seq"]
    torch.manual_seed(seed)
    teacher = transformers.LlamaForCausalLM(base.teacher_config(s))
    t_curve = base.train(teacher, s["teacher_steps"], s["teacher_lr"], data, val, s, seed, device)
    t_loss, p_dense = t_curve[-1][1], base.n_params(teacher)
    t_flops = 6 * p_dense * tokens * s["teacher_steps"]
    print(f"seed {seed}: teacher {p_dense:,} params, val loss {t_loss:.4f} [{time.time() - started:.0f}s]", flush=True)
    teacher = teacher.to("cpu").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    upcycled = {e: graphgrow.upcycle(teacher, experts=e, top_k=s["top_k"], router="random", seed=seed,
                                     example_inputs=ids) for e in s["experts"]}
    active = {e: active_params(m) for e, m in upcycled.items()}
    # the dense arm and the scratch arms run long enough to reach the upcycled arms' FLOPs (teacher included)
    dense_steps = _round_up(s["student_steps"] * max(active.values()) / p_dense, s["eval_every"])
    scratch_steps = _round_up(s["student_steps"] + s["teacher_steps"] * p_dense / min(active.values()),
                              s["eval_every"])
    arms, start = {}, s["teacher_steps"]
    for lr in s["student_lrs"]:
        arms[(DENSE, lr)] = _arm(copy.deepcopy(teacher), dense_steps, lr, data, val, s, seed, device, start, t_flops)
    four = None
    for e, model in upcycled.items():
        for lr in s["student_lrs"]:
            m = copy.deepcopy(model)
            arms[(up_name(e), lr)] = r = _arm(m, s["student_steps"], lr, data, val, s, seed, device, start, t_flops)
            _check_exact(up_name(e), r["curve"][0][1], t_loss)
            if e == 4 and lr == s["four_lr"]:
                four = (m, r)
        print(f"seed {seed}: upcycled x{e} [{time.time() - started:.0f}s]", flush=True)
        for lr in s["scratch_lrs"]:
            torch.manual_seed(1000 + seed)
            m = transformers.MixtralForCausalLM(copy.deepcopy(model.config))
            arms[(scratch_name(e), lr)] = _arm(m, scratch_steps, lr, data, val, s, seed, device, 0, 0)
        print(f"seed {seed}: from scratch x{e} [{time.time() - started:.0f}s]", flush=True)
    grown = two(four, s, data, val, device, seed)
    print(f"seed {seed}: expert growth [{time.time() - started:.0f}s]", flush=True)
    return t_curve, p_dense, arms, grown


def two(four, s: dict, data, val, device, seed: int) -> dict:
    """Experiment 2: the trained 4-expert model grown to 8 experts (top-k raised / kept) and trained on, against
    the 4-expert model trained on; the same batches (continuing the 4-expert model's stream)."""
    model, r4 = four
    model = model.to("cpu").eval()
    loss4 = r4["curve"][-1][1]
    prior = r4["prior_flops"] + 6 * r4["active"] * s["batch"] * s["seq"] * s["student_steps"]
    start = s["teacher_steps"] + s["student_steps"]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    variants = {"continued": copy.deepcopy(model),
                "raised": graphgrow.grow_experts(model, factor=2, keep_top_k=False, example_inputs=ids, seed=seed),
                "kept": graphgrow.grow_experts(model, factor=2, keep_top_k=True, example_inputs=ids, seed=seed)}
    out = {}
    for key, m in variants.items():
        rep = m.graphgrow_report if key != "continued" else None  # (the copy carries the upcycle's report)
        deviation = None if rep is None else rep.deviation if not rep.function_preserving else 0.0
        for lr in s["grow_lrs"]:
            r = _arm(copy.deepcopy(m), s["grow_steps"], lr, data, val, s, seed, device, start, prior,
                     source_loss=loss4, logit_max_rel=deviation)
            if key != "kept":
                _check_exact(GROW[key], r["curve"][0][1], loss4)
            out[(GROW[key], lr)] = r
    return out


def run(setting: str, device: str, out_dir: str, threads: int) -> None:
    s = dict(MOE_SETTINGS[setting], teacher_lr=max(base.SETTINGS[setting]["scratch_lrs"]))
    data, val, desc = base.corpus()
    print(f"# lm_growth --moe ({setting}): {desc}", flush=True)
    results = {"setting": setting, "config": s, "corpus": desc, "device": device, "threads": threads,
               "teacher": [], "one": {}, "two": {}}
    started = time.time()
    for seed in range(s["seeds"]):
        t_curve, p_dense, arms, grown = one_seed(seed, s, data, val, device, started)
        results["teacher"].append(dict(seed=seed, curve=t_curve, params=p_dense))
        for key, table in (("one", arms), ("two", grown)):
            for (name, lr), r in table.items():
                results[key].setdefault(name, {}).setdefault(str(lr), []).append(r)
    results["seconds"] = time.time() - started
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"moe_{setting}_curves.json"), "w") as f:
        json.dump(results, f)
    report(results, out_dir)


# ---------------------------------------------------------------------------------------------------- report


def flops_curve(run: dict, tokens: int) -> tuple:
    steps = np.array([st for st, _ in run["curve"]], float)
    return run["prior_flops"] + 6 * run["active"] * tokens * steps, np.array([v for _, v in run["curve"]])


def loss_at_flops(run: dict, tokens: int, budget: float):
    x, y = flops_curve(run, tokens)
    if budget < x[0] - 1 or budget > x[-1] * (1 + 1e-9):
        return None
    return float(np.interp(budget, x, y))


def loss_at_step(run: dict, step: int):
    return next((v for st, v in run["curve"] if st == step), None)


def _best(by_lr: dict, metric) -> tuple:
    """(lr, [metric per seed]) of the lr with the lowest mean metric; lrs where a seed has no value skipped."""
    scored = {lr: [metric(r) for r in runs] for lr, runs in by_lr.items()}
    scored = {lr: v for lr, v in scored.items() if all(x is not None for x in v)}
    if not scored:
        return None, []
    lr = min(scored, key=lambda k: np.mean(scored[k]))
    return lr, scored[lr]


def _cell(lr, values) -> str:
    return "—" if lr is None else f"{np.mean(values):.4f} ± {np.std(values):.4f} (lr {lr})"


def _sweep(by_lr: dict, metric) -> str:
    parts = []
    for lr, runs in by_lr.items():
        v = [metric(r) for r in runs]
        parts.append(f"{lr}: " + ("—" if any(x is None for x in v) else f"{np.mean(v):.4f}"))
    return ", ".join(parts)


def report(results: dict, out_dir: str) -> None:
    s, setting = results["config"], results["setting"]
    tokens = s["batch"] * s["seq"]
    one, two_ = results["one"], results["two"]
    up_names = [up_name(e) for e in s["experts"]]
    first = lambda name: next(iter(one[name].values()))[0]
    budget = min(flops_curve(r, tokens)[0][-1] for n in up_names for runs in one[n].values() for r in runs)
    steps = s["student_steps"]
    flag = {"quick": " --quick", "full": "", "cuda": " --device cuda"}[setting]
    cmd = f"PYTHONPATH=. python benchmarks/lm_growth.py --moe{flag} --threads {results.get('threads', 0)}"
    t_final = [t["curve"][-1][1] for t in results["teacher"]]
    lines = [f"# lm_growth --moe: {setting}", "", f"`{cmd}`", "",
             f"On {results['device']} ({results.get('threads', 0) or 'all'} torch threads); {results['corpus']}; "
             f"{s['seeds']} seeds; {results['seconds'] / 60:.1f} min; torch {torch.__version__}, transformers "
             f"{transformers.__version__}.", "",
             f"Teacher (lm_growth's, seed for seed): Llama, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} "
             f"heads ({s['kv']} kv), MLP {s['ffn']}, {first(DENSE)['params']:,} params, trained {s['teacher_steps']} "
             f"steps at lr {s['teacher_lr']}: validation loss {np.mean(t_final):.4f} ± {np.std(t_final):.4f}. "
             f"Batches of {s['batch']} x {s['seq']} bytes, the same for every arm at the same step; AdamW, 20 warmup "
             "steps then constant lr, a fresh optimizer per arm; validation every "
             f"{s['eval_every']} steps on {s['eval_batches']} fixed batches (cross-entropy only).", "",
             "Mixtral arms: top-2, the MLP's width per expert; training loss = cross-entropy + Mixtral's default "
             "router_aux_loss_coef (0.001) x its load-balancing loss. Upcycled routers: rows drawn "
             "N(0, initializer_range 0.02) (graphgrow.upcycle router=\"random\": exact because Mixtral renormalises "
             "its top-k weights over copies of one MLP). Learning rates: dense and upcycled "
             f"{list(s['student_lrs'])}, from scratch {list(s['scratch_lrs'])}, experiment 2 {list(s['grow_lrs'])} "
             "(one point on the quick setting, for time); every cell takes the arm's best lr for that cell's metric "
             "(lowest mean over seeds), the sweep is listed.", "",
             "FLOPs = 6 x active parameters x training tokens (attention scores and evaluation not counted). Active "
             "parameters: all (embeddings, lm head, routers) except routed experts, of which top-k/E count. The "
             "upcycled arms and the dense arm carry the teacher's pretraining FLOPs "
             f"({6 * first(DENSE)['params'] * tokens * s['teacher_steps'] / 1e12:.4f}e12); from-scratch arms start "
             "at 0. The dense and from-scratch arms train longer than the upcycled ones so that their curves reach "
             "the upcycled arms' FLOPs; equal-FLOPs losses are interpolated linearly between evaluations.", "",
             f"## Experiment 1: dense -> MoE upcycling (validation loss after {steps} steps of each arm, and at "
             f"{budget / 1e12:.4f}e12 FLOPs = teacher + {steps} upcycled steps)", "",
             f"| arm | params (active) | steps run | step-0 val loss | val loss at step {steps} (mean ± sd) | sweep "
             f"at step {steps} | val loss at {budget / 1e12:.4f}e12 FLOPs incl. teacher | sweep at equal FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_lr in one.items():
        r0 = first(name)
        at_step = lambda r: loss_at_step(r, steps)
        at_flops = lambda r: loss_at_flops(r, tokens, budget)
        step0 = np.mean([r["curve"][0][1] for runs in by_lr.values() for r in runs])
        lines.append(f"| {name} | {r0['params']:,} ({r0['active']:,}) | {r0['curve'][-1][0]} | {step0:.4f} | "
                     f"{_cell(*_best(by_lr, at_step))} | {_sweep(by_lr, at_step)} | "
                     f"{_cell(*_best(by_lr, at_flops))} | {_sweep(by_lr, at_flops)} |")
    g_budget = min(flops_curve(r, tokens)[0][-1] for by_lr in two_.values() for runs in by_lr.values()
                   for r in runs)
    g_steps = s["grow_steps"]
    lines += ["", f"## Experiment 2: expert-count growth 4 -> 8 of the trained 4-expert model (the upcycled x4 arm "
              f"after {steps} steps at lr {s['four_lr']}), {g_steps} more steps", "",
              f"| arm | params (active) | step-0 val loss (the 4-expert model's; Δ) | step-0 max rel logit "
              f"deviation | val loss at step {g_steps} | val loss at {g_budget / 1e12:.4f}e12 FLOPs (all training "
              "incl. teacher) |",
              "|---|---|---|---|---|---|"]
    for name, by_lr in two_.items():
        runs = next(iter(by_lr.values()))
        r0 = runs[0]
        step0 = [r["curve"][0][1] for r in runs]
        src = [r["source_loss"] for r in runs]
        dev = [r["logit_max_rel"] for r in runs if r["logit_max_rel"] is not None]
        dev_txt = ("— (not grown)" if not dev else "0 (exact)" if max(dev) == 0
                   else f"{np.mean(dev):.3g} (max {np.max(dev):.3g})")
        delta = np.array(step0) - np.array(src)
        lines.append(f"| {name} | {r0['params']:,} ({r0['active']:,}) | {np.mean(step0):.4f} ± {np.std(step0):.4f} "
                     f"({np.mean(src):.4f}; Δ {np.mean(delta):+.4f}, max abs Δ {np.abs(delta).max():.4f}) | "
                     f"{dev_txt} | "
                     f"{_cell(*_best(by_lr, lambda r: loss_at_step(r, g_steps)))} | "
                     f"{_cell(*_best(by_lr, lambda r: loss_at_flops(r, tokens, g_budget)))} |")
    lines += _paired_table(results, steps, budget, g_steps, g_budget, tokens)
    path = os.path.join(out_dir, f"moe_{setting}.md")
    summary = ""
    if os.path.exists(path):  # a written summary survives --report-only
        with open(path) as f:
            old = f.read()
        if "\n## Summary" in old:
            summary = old[old.index("\n## Summary"):]
    text = "\n".join(lines) + "\n" + summary
    with open(path, "w") as f:
        f.write(text)
    print(text)
    _plot(results, budget, out_dir)


def _paired(a: dict, b: dict, metric):
    """Per-seed differences a - b (each arm at its best lr for ``metric``): the arms of a seed share the teacher
    and the batches, so the paired difference is sharper than the spread of either arm over seeds."""
    (la, va), (lb, vb) = _best(a, metric), _best(b, metric)
    if la is None or lb is None:
        return "—"
    seeds_a, seeds_b = [r["seed"] for r in a[la]], [r["seed"] for r in b[lb]]
    if seeds_a != seeds_b:
        return "—"
    d = np.array(va) - np.array(vb)
    return f"{d.mean():+.4f} ± {d.std():.4f} ({', '.join(f'{x:+.4f}' for x in d)})"


def _paired_table(results: dict, steps: int, budget: float, g_steps: int, g_budget: float, tokens: int) -> list:
    one, two_, s = results["one"], results["two"], results["config"]
    pairs = []
    for e in s["experts"]:
        pairs += [(one, up_name(e), DENSE, steps, budget), (one, up_name(e), scratch_name(e), steps, budget)]
    pairs += [(two_, GROW["raised"], GROW["continued"], g_steps, g_budget),
              (two_, GROW["kept"], GROW["continued"], g_steps, g_budget)]
    lines = ["", "## Paired differences (A - B per seed, same teacher and batches; negative: A lower)", "",
             "| A | B | at equal steps | at equal FLOPs incl. teacher |", "|---|---|---|---|"]
    for table, a, b, st, fl in pairs:
        at_step = _paired(table[a], table[b], lambda r, st=st: loss_at_step(r, st))
        at_flops = _paired(table[a], table[b], lambda r, fl=fl: loss_at_flops(r, tokens, fl))
        lines.append(f"| {a} | {b} | {at_step} (step {st}) | {at_flops} ({fl / 1e12:.4f}e12) |")
    return lines


def _plot(results: dict, budget: float, out_dir: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots; pip install matplotlib)")
        return
    s = results["config"]
    tokens = s["batch"] * s["seq"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name, by_lr in results["one"].items():
        lr, _ = _best(by_lr, lambda r: loss_at_flops(r, tokens, budget))
        runs = by_lr[lr]
        x = np.array([st for st, _ in runs[0]["curve"]])
        y = np.array([[v for _, v in r["curve"]] for r in runs])
        fx = flops_curve(runs[0], tokens)[0] / 1e12
        for ax, xs in ((axes[0], x), (axes[1], fx)):
            line, = ax.plot(xs, y.mean(0), label=f"{name} (lr {lr})")
            ax.fill_between(xs, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2, color=line.get_color())
    axes[1].axvline(budget / 1e12, color="grey", ls=":", lw=1)
    for name, by_lr in results["two"].items():
        lr, _ = _best(by_lr, lambda r: loss_at_step(r, s["grow_steps"]))
        runs = by_lr[lr]
        x = np.array([st for st, _ in runs[0]["curve"]])
        y = np.array([[v for _, v in r["curve"]] for r in runs])
        line, = axes[2].plot(x, y.mean(0), label=f"{name} (lr {lr})")
        axes[2].fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2, color=line.get_color())
    axes[0].set_xlabel("arm step")
    axes[1].set_xlabel("training FLOPs incl. teacher (x1e12, 6 x active params x tokens)")
    axes[2].set_xlabel("step after expert growth")
    axes[0].set_title("1: upcycling, equal steps (lr: each arm's best at equal FLOPs)")
    axes[1].set_title("1: upcycling, equal FLOPs")
    axes[2].set_title("2: expert count 4 -> 8")
    top = max(r["curve"][0][1] for by_lr in results["one"].values() for runs in by_lr.values() for r in runs
              if r["prior_flops"]) + 0.1
    for ax in axes:
        ax.set_ylabel("validation loss (bytes, nats)")
        ax.legend(fontsize=7)
    axes[0].set_ylim(top=top, bottom=None)
    axes[1].set_ylim(top=top, bottom=None)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"moe_{results['setting']}.png"), dpi=110)


def main(setting: str, args) -> None:
    if args.report_only:
        with open(os.path.join(args.out, f"moe_{setting}_curves.json")) as f:
            report(json.load(f), args.out)
        return
    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    run(setting, args.device, args.out, args.threads)
