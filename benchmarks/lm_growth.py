"""Does growing a language model pay? Students grown from a trained teacher against honest baselines.

    PYTHONPATH=. python benchmarks/lm_growth.py --quick          # <= 20 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/lm_growth.py                  # the full setting
    PYTHONPATH=. python benchmarks/lm_growth.py --device cuda    # sized for ~10 min on one GPU
    PYTHONPATH=. python benchmarks/lm_growth.py --moe --quick --threads 1   # dense -> MoE upcycling (lm_growth_moe.py)
    PYTHONPATH=. python benchmarks/lm_growth.py --progressive --quick   # grow while training: FLOPs to
                                                                  # the from-scratch loss (lm_growth_progressive.py)

Data: the Python standard library's own source files (the running interpreter's ``sysconfig`` stdlib, every
machine has it), byte-level (vocabulary 256), split by file (one file in 10, chosen by a CRC of its name, is
validation). Teacher: a small Llama-style decoder (transformers' LlamaForCausalLM: RMSNorm, rotary, GQA,
SwiGLU) trained for ``teacher_steps``. Students (graphgrow, function-preserving, step-0 loss = teacher's):
widened x2 by replication with exact zero-sum noise, widened x1.5 by fill + rescale, deepened x2 by block copy
(every layer followed by a copy with zeroed output projections). Baselines: the same student architectures
from random init, the teacher trained on for the same steps, and for width the non-preserving random pad.
Every arm sees the same token batches at the same step; learning rates are swept (the best per arm is kept and
the sweep is reported); validation loss every ``eval_every`` steps; several seeds.

Results: benchmarks/results/lm_growth/<setting>.md (+ curves.json, and PNG plots when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time
import zlib

import numpy as np
import torch
import transformers

import graphgrow

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {
    "quick": dict(hidden=64, layers=2, heads=4, kv=2, ffn=160, seq=64, batch=16, teacher_steps=500,
                  student_steps=300, eval_every=50, eval_batches=8, seeds=3, scratch_lrs=(1e-3, 3e-3),
                  student_lrs=(3e-4, 1e-3)),
    "full": dict(hidden=128, layers=4, heads=4, kv=2, ffn=344, seq=128, batch=32, teacher_steps=2000,
                 student_steps=2000, eval_every=100, eval_batches=32, seeds=3, scratch_lrs=(5e-4, 1e-3, 2e-3),
                 student_lrs=(2e-4, 5e-4, 1e-3)),
    "cuda": dict(hidden=256, layers=6, heads=8, kv=4, ffn=688, seq=256, batch=64, teacher_steps=3000,
                 student_steps=3000, eval_every=200, eval_batches=32, seeds=3, scratch_lrs=(3e-4, 6e-4, 1e-3),
                 student_lrs=(1e-4, 3e-4, 6e-4)),
}


def corpus() -> tuple:
    """(train bytes, validation bytes, description): the stdlib's .py files, split by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    train, val = [], []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        (val if zlib.crc32(os.path.basename(f).encode()) % 10 == 0 else train).append(data)
    tr, va = np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(val), np.uint8)
    return tr, va, f"{len(files)} .py files of {root} ({len(tr) / 1e6:.2f} MB train, {len(va) / 1e6:.2f} MB val)"


def batch(data: np.ndarray, step: int, seed: int, size: int, seq: int, device) -> torch.Tensor:
    """The batch of ``step``: the same for every arm of a seed (windows drawn from (seed, step))."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq - 1, size)
    return torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)).to(device)


def teacher_config(s: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=256, hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                    num_key_value_heads=s["kv"], max_position_embeddings=s["seq"] + 1,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


@torch.no_grad()
def val_loss(model, val: np.ndarray, s: dict, device) -> float:
    model.eval()
    losses = []
    for i in range(s["eval_batches"]):
        x = batch(val, 10 ** 6 + i, 0, s["batch"], s["seq"], device)  # the same validation windows for all
        losses.append(float(_loss(model, x)))
    model.train()
    return float(np.mean(losses))


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train(model, steps: int, lr: float, data, val, s: dict, seed: int, device, start: int = 0, loss_fn=None) -> list:
    """AdamW (warmup 20 steps, then constant); [(step, validation loss)] every eval_every steps, step 0 first.
    Batches are indexed from ``start`` (students continue the teacher's stream of batches).  ``loss_fn``: the
    training loss (default: cross-entropy; the MoE arms add the router's load-balancing term)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    curve = [(0, val_loss(model, val, s, device))]
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 20)
        loss = (loss_fn or _loss)(model, batch(data, start + step, seed, s["batch"], s["seq"], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % s["eval_every"] == 0 or step == steps:
            curve.append((step, val_loss(model, val, s, device)))
    return curve


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def students(teacher, s: dict, seed: int, device) -> dict:
    """name -> (model, family of its random-init twin); grown on CPU in float32, verified by graphgrow."""
    teacher = teacher.to("cpu").eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    x[0, 0] = 255
    out = {
        "widen x2 (replicate + exact noise)": (graphgrow.widen(teacher, 2, example_inputs=(x,), noise=0.01,
                                                                 noise_mode="exact", seed=seed), "x2"),
        "widen x1.5 (fill + rescale)": (graphgrow.widen(teacher, 1.5, example_inputs=(x,), seed=seed), "x1.5"),
        "deepen x2 (block copy)": (graphgrow.deepen(teacher, after=r"model\.layers\.\d+", block="copy",
                                                    example_inputs=(x,)), "deep"),
        "widen x2 random pad": (graphgrow.widen(teacher, 2, example_inputs=(x,), init="random-pad", seed=seed,
                                                verify="none"), "x2"),
    }
    return out


def steps_to(curve: list, target: float):
    return next((step for step, loss in curve if loss <= target), None)


def run(setting: str, device: str, out_dir: str) -> None:
    s = SETTINGS[setting]
    train_data, val_data, desc = corpus()
    print(f"# lm_growth ({setting}): {desc}", flush=True)
    results = {"setting": setting, "config": s, "corpus": desc, "device": device, "arms": {}}
    started = time.time()
    for seed in range(s["seeds"]):
        torch.manual_seed(seed)
        teacher = transformers.LlamaForCausalLM(teacher_config(s))
        t_curve = train(teacher, s["teacher_steps"], max(s["scratch_lrs"]), train_data, val_data, s, seed, device)
        print(f"seed {seed}: teacher {n_params(teacher):,} params, val loss {t_curve[-1][1]:.3f} "
              f"[{time.time() - started:.0f}s]", flush=True)
        teacher_state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
        arms = {}
        grown = students(teacher, s, seed, device)
        for name, (student, family) in grown.items():
            for lr in s["student_lrs"]:
                model = type(student)(student.config)
                model.load_state_dict(student.state_dict())
                curve = train(model, s["student_steps"], lr, train_data, val_data, s, seed, device,
                              start=s["teacher_steps"])
                arms[(name, lr)] = dict(curve=curve, params=n_params(model), family=family)
        for family, config in (("x2", grown["widen x2 (replicate + exact noise)"][0].config),
                               ("x1.5", grown["widen x1.5 (fill + rescale)"][0].config),
                               ("deep", grown["deepen x2 (block copy)"][0].config)):
            for lr in s["scratch_lrs"]:
                torch.manual_seed(1000 + seed)
                model = transformers.LlamaForCausalLM(config)
                curve = train(model, s["student_steps"], lr, train_data, val_data, s, seed, device,
                              start=s["teacher_steps"])
                arms[(f"random init ({family})", lr)] = dict(curve=curve, params=n_params(model), family=family)
        for lr in s["student_lrs"]:
            model = transformers.LlamaForCausalLM(teacher_config(s))
            model.load_state_dict(teacher_state)
            curve = train(model, s["student_steps"], lr, train_data, val_data, s, seed, device,
                          start=s["teacher_steps"])
            arms[("teacher trained on", lr)] = dict(curve=curve, params=n_params(model), family="teacher")
        for (name, lr), r in arms.items():
            results["arms"].setdefault(name, {}).setdefault(str(lr), []).append(
                dict(seed=seed, teacher_curve=t_curve, teacher_params=n_params(teacher), **r))
        print(f"seed {seed}: {len(arms)} runs [{time.time() - started:.0f}s]", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    results["seconds"] = time.time() - started
    with open(os.path.join(out_dir, f"{setting}_curves.json"), "w") as f:
        json.dump(results, f)
    report(results, out_dir, time.time() - started)


def report(results: dict, out_dir: str, seconds: float) -> None:
    """The markdown table. Per arm its best learning rate (lowest mean final validation loss; the sweep is
    listed), the final loss (mean ± sd over seeds) and, against the best random-init run of the same
    architecture, the student steps to reach that run's final loss (measured every eval_every steps), the
    speed-up (the random-init run's steps over those) and the FLOPs spent until then, the teacher's training
    counted (6 x params x tokens)."""
    s = results["config"]
    tokens = s["batch"] * s["seq"]
    best = {}
    for name, by_lr in results["arms"].items():
        lr, runs = min(by_lr.items(), key=lambda kv: np.mean([r["curve"][-1][1] for r in kv[1]]))
        best[name] = (lr, runs)
    cmd = "PYTHONPATH=. python benchmarks/lm_growth.py" + ("" if results["setting"] == "full" else
                                                             " --quick" if results["setting"] == "quick" else
                                                             " --device cuda")
    lines = [f"# lm_growth: {results['setting']}", "",
             f"`{cmd}` on {results['device']}; {results['corpus']}; {s['seeds']} seeds; {seconds / 60:.1f} min; "
             f"torch {torch.__version__}, transformers {transformers.__version__}", "",
             f"Teacher: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads ({s['kv']} kv), MLP {s['ffn']}, "
             f"trained {s['teacher_steps']} steps; every arm then trains {s['student_steps']} steps of "
             f"{s['batch']} x {s['seq']} bytes (the same batches).", "",
             "| arm | best lr (sweep: mean final loss) | params | step-0 val loss | final val loss (mean ± sd) | "
             "steps to random-init final loss (per seed) | speed-up (mean ± sd) | FLOPs to it incl. teacher "
             "(x1e12) |", "|---|---|---|---|---|---|---|---|"]
    for name, (lr, runs) in best.items():
        family = runs[0]["family"]
        finals = [r["curve"][-1][1] for r in runs]
        step0 = np.mean([r["curve"][0][1] for r in runs])
        reach, speed, flops = "—", "—", "—"
        target_name = f"random init ({family})"
        if family != "teacher" and target_name in best and name != target_name:
            target = np.mean([r["curve"][-1][1] for r in best[target_name][1]])
            hits = [steps_to(r["curve"], target) for r in runs]
            reach = ", ".join("—" if h is None else str(h) for h in hits)
            reached = [h for h in hits if h is not None]
            if len(reached) == len(hits):
                if 0 in reached:  # the grown model starts below the random-init run's final loss
                    speed = "at step 0" if set(reached) == {0} else "at step 0 in some seeds"
                else:
                    ups = [s["student_steps"] / h for h in reached]
                    speed = f"{np.mean(ups):.1f} ± {np.std(ups):.1f}"
                spent = [6 * runs[0]["teacher_params"] * tokens * s["teacher_steps"]
                         + 6 * runs[0]["params"] * tokens * h for h in reached]
                scratch = 6 * runs[0]["params"] * tokens * s["student_steps"]
                flops = f"{np.mean(spent) / 1e12:.3f} (random init: {scratch / 1e12:.3f})"
        sweep = ", ".join(f"{k}: {np.mean([r['curve'][-1][1] for r in v]):.3f}"
                          for k, v in results["arms"][name].items())
        lines.append(f"| {name} | {lr} ({sweep}) | {runs[0]['params']:,} | {step0:.3f} | "
                     f"{np.mean(finals):.3f} ± {np.std(finals):.3f} | {reach} | {speed} | {flops} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{results['setting']}.md"), "w") as f:
        f.write(text)
    print(text)
    _plot(results, best, out_dir)


def _plot(results: dict, best: dict, out_dir: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots; pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (_, runs) in best.items():
        steps = [st for st, _ in runs[0]["curve"]]
        losses = np.array([[loss for _, loss in r["curve"]] for r in runs])
        m, sd = losses.mean(0), losses.std(0)
        ax.plot(steps, m, label=name)
        ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("student step")
    ax.set_ylabel("validation loss (bytes, nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{results['setting']}.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small setting (<= 20 min on 2 CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the GPU setting)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "lm_growth"))
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the saved curves")
    p.add_argument("--moe", action="store_true", help="the mixture-of-experts experiment instead (lm_growth_moe.py): "
                   "the teacher upcycled to 4 and 8 experts, and expert-count growth 4 -> 8")
    p.add_argument("--progressive", action="store_true", help="the progressive-growth experiment instead "
                   "(lm_growth_progressive.py): a small model trained, grown once (width x2, random pad, block copy, "
                   "G_stack; optimizer state reset/copy/dual) and trained on, against the target from scratch, by FLOPs")
    p.add_argument("--only-seed", type=int, default=None, help="--progressive: run this seed alone (seeds side by "
                   "side in separate processes; --report-only then merges them)")
    p.add_argument("--jobs", type=int, default=0, help="--progressive: worker processes the runs are shared out to "
                   "(default: one a CPU core on cpu, 1 on cuda; each worker then uses 1 torch thread)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: every core; 1 is faster on "
                   "a loaded machine)")
    args = p.parse_args()
    setting = "cuda" if args.device.startswith("cuda") else "quick" if args.quick else "full"
    if args.moe:
        import lm_growth_moe

        lm_growth_moe.main(setting, args)
        return
    if args.progressive:
        import lm_growth_progressive

        lm_growth_progressive.main(setting, args)
        return
    if args.report_only:
        with open(os.path.join(args.out, f"{setting}_curves.json")) as f:
            results = json.load(f)
        report(results, args.out, results.get("seconds", 0.0))
        return
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    run(setting, args.device, args.out)


if __name__ == "__main__":
    main()
