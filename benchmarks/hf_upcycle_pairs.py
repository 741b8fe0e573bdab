"""Dense -> MoE upcycling and expert-count growth, every family pair graphgrow knows, measured (issue 20).

For each dense family with a mixture-of-experts twin (graphgrow/hf/moe_twins.py), a tiny random model
(hidden 32, 2 layers, MLP 64, vocabulary 96; built from a config, no hub access) is upcycled to 4 experts,
top-2, and the harness records:

* float32 / float64, zero routers: the logits' max relative difference from the dense model on 3 batches
  of token ids (float64: the dense model cast, the twin built in float64, experts run by the eager kernel)
* float32, random routers (rows N(0, initializer_range)): the same, or graphgrow's refusal where the family
  does not renormalise its top-k (then with ``moe_config={"norm_topk_prob": True}`` where it has that field)
* greedy ``generate`` (12 new tokens, KV cache) identical; ``save_pretrained`` + the twin class's
  ``from_pretrained`` gives the same logits (bit-identical)
* the checkpoint directory path (``graphgrow.hf.upcycle_stream.upcycle_checkpoint`` on the dense model saved
  as safetensors, check "layers") gives the tensors ``upcycle`` + ``save_pretrained`` gives, bit for bit
* expert-count growth x2 of the twin, its experts and routers first moved apart (as training leaves them;
  copies of one MLP would hide what keeping top-k changes): top-k raised 2 -> 4 (exact; max rel) and top-k kept (not exact; the
  measured deviation graphgrow reports)

    PYTHONPATH=. python benchmarks/hf_upcycle_pairs.py          # ~2 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/hf_upcycle_pairs.py --families llama,qwen2

A second table grows the expert count x2 of MoE models of 17 families (19 rows) (their sparse blocks moved apart as
training leaves them): the rule measured on the family's block, exactness, streamed = in memory, and the
deviation with top-k kept.

Writes benchmarks/results/hf_upcycle_pairs.md; exit code 1 when a row comes back wrong (not refused).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time

import torch
import transformers

import graphgrow
from graphgrow.errors import GraphGrowError
from graphgrow.hf.upcycle_stream import grow_experts_checkpoint, upcycle_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests", "hf"))
from hf_testing import DENSE_BASE as BASE  # noqa: E402  (the tiny configs the tests build, shared)
from hf_testing import DENSE_FAMILIES as FAMILIES  # noqa: E402
from hf_testing import DENSE_VOCAB as VOCAB  # noqa: E402
from hf_testing import MOE_FAMILIES, saved_tensors, trained_like  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def build(name: str, dtype=torch.float32, seed: int = 0):
    cls_name, extra = FAMILIES[name]
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**BASE, **extra})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(cfg).to(dtype).eval()


def batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (2, 12), generator=g) for _ in range(n)]


@torch.no_grad()
def max_rel(a, b) -> float:
    worst = 0.0
    for x in batches():
        la, lb = a(input_ids=x).logits.double(), b(input_ids=x).logits.double()
        worst = max(worst, float((la - lb).abs().max() / la.abs().max().clamp_min(1e-30)))
    return worst


def _float64(model):
    model = model.double()
    model.config._experts_implementation = "eager"  # (transformers' grouped_mm kernel has no float64)
    return model


def _try(fn):
    try:
        return fn(), None
    except GraphGrowError as exc:
        return None, str(exc).splitlines()[0]


def measure(name: str) -> dict:
    row = {"family": name}
    started = time.time()
    dense = build(name)
    moe = graphgrow.upcycle(dense, experts=4, top_k=2)
    rep = moe.graphgrow_report
    row.update(twin=type(moe).__name__, params=(rep.params_before, rep.params_after), f32=max_rel(dense, moe))
    dense64 = _float64(build(name))
    moe64 = graphgrow.upcycle(dense64, experts=4, top_k=2)
    moe64.config._experts_implementation = "eager"
    row["f64"] = max_rel(dense64, moe64)
    rnd, why = _try(lambda: graphgrow.upcycle(dense, experts=4, top_k=2, router="random", seed=1))
    row["random"] = max_rel(dense, rnd) if rnd is not None else None
    if rnd is None:
        row["random_refused"] = why
        if "norm_topk_prob" in why:
            rnd, _ = _try(lambda: graphgrow.upcycle(dense, experts=4, top_k=2, router="random", seed=1,
                                                    moe_config={"norm_topk_prob": True}))
            row["random_norm"] = max_rel(dense, rnd) if rnd is not None else None
    with torch.no_grad():
        x = batches(1)[0][:1]
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        row["generate"] = bool(torch.equal(dense.generate(x, **kw), moe.generate(x, **kw)))
    with tempfile.TemporaryDirectory() as tmp:
        moe.save_pretrained(os.path.join(tmp, "mem"))
        loaded = type(moe).from_pretrained(os.path.join(tmp, "mem"), attn_implementation="sdpa").eval()
        row["reload"] = max_rel(moe, loaded)
        dense.save_pretrained(os.path.join(tmp, "dense"))
        upcycle_checkpoint(os.path.join(tmp, "dense"), os.path.join(tmp, "dir"), 4, 2, check="layers")
        row["streamed_equal"] = _same_tensors(os.path.join(tmp, "mem"), os.path.join(tmp, "dir"))
    trained = trained_like(copy.deepcopy(moe))
    grown = graphgrow.grow_experts(trained, factor=2)
    row["grow_raised"] = max_rel(trained, grown)
    kept = graphgrow.grow_experts(trained, factor=2, keep_top_k=True)
    row["grow_kept_dev"] = kept.graphgrow_report.deviation
    row["seconds"] = time.time() - started
    return row


def measure_growth(name: str) -> dict:
    """grow_experts x2 of a trained-like MoE model: the measured rule, exactness (top-k raised), the deviation
    with top-k kept, and the streamed checkpoint's bytes against the in-memory result's."""
    cls_name, extra = MOE_FAMILIES[name]
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**BASE, **extra})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = trained_like(cls(cfg).eval())
    row = {"family": name, "cls": cls_name}
    started = time.time()
    try:
        grown = graphgrow.grow_experts(model, factor=2)
    except GraphGrowError as exc:
        row["refused"] = str(exc).splitlines()[0]
    else:
        rep = grown.graphgrow_report
        row.update(max_rel=max_rel(model, grown), notes=rep.notes, top_k=(rep.top_k_before, rep.top_k))
        with tempfile.TemporaryDirectory() as tmp:
            grown.save_pretrained(os.path.join(tmp, "mem"))
            model.save_pretrained(os.path.join(tmp, "src"))
            streamed = grow_experts_checkpoint(os.path.join(tmp, "src"), os.path.join(tmp, "dir"), 2)
            row["streamed_equal"] = _same_tensors(os.path.join(tmp, "mem"), os.path.join(tmp, "dir"))
            row["streamed_check"] = streamed["check"].get("max_rel")
    kept, why = _try(lambda: graphgrow.grow_experts(model, factor=2, keep_top_k=True))
    row["kept_dev"] = kept.graphgrow_report.deviation if kept is not None else None
    row["seconds"] = time.time() - started
    return row


def _same_tensors(a: str, b: str) -> bool:
    ta, tb = saved_tensors(a), saved_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def verdict(row: dict) -> str:
    if "error" in row:
        return "error"
    ok = (row["f32"] <= TOL[torch.float32] and row["f64"] <= TOL[torch.float64] and row["generate"]
          and row["reload"] == 0.0 and row["streamed_equal"] and row["grow_raised"] <= TOL[torch.float32]
          and (row["random"] is None or row["random"] <= TOL[torch.float32]))
    return "exact" if ok else "WRONG"


def _e(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", default=os.path.join(HERE, "results", "hf_upcycle_pairs.md"))
    p.add_argument("--no-growth", action="store_true", help="leave out the expert-count growth table")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    rows = []
    for name in args.families.split(","):
        try:
            row = measure(name)
        except Exception as exc:  # noqa: BLE001 -- a benchmark row, reported (and the exit code says so)
            row = {"family": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        row["verdict"] = verdict(row)
        rows.append(row)
        print(name, row["verdict"], {k: v for k, v in row.items() if k not in ("family", "verdict")}, flush=True)
    lines = ["# Dense -> MoE upcycling and expert-count growth, every family pair", "",
             f"`PYTHONPATH=. python benchmarks/hf_upcycle_pairs.py`; torch {torch.__version__}, transformers "
             f"{transformers.__version__}, {datetime.date.today()}", "",
             "Tiny random dense models (hidden 32, 2 layers, MLP 64, vocabulary 96) upcycled to 4 experts, top-2; "
             "max rel: the logits' max relative difference from the dense model on 3 batches of 2 x 12 token ids. "
             "Random routers: rows N(0, initializer_range), exact only where the family renormalises its top-k "
             "(refused otherwise; \"norm\": with `moe_config={\"norm_topk_prob\": True}`). Streamed: "
             "`upcycle_checkpoint` on the saved dense model gives the tensors `upcycle` + `save_pretrained` gives. "
             "Grow x2: the twin's experts 4 -> 8, top-k 2 -> 4 (exact), or top-k kept at 2 (not exact: the "
             "deviation graphgrow measures and reports).", "",
             "| dense | MoE twin | verdict | params | f32 max rel (zero routers) | f64 max rel | f32 random routers | "
             "greedy generate | save/load max rel | streamed = in memory | grow x2, top-k 2->4 | grow x2, top-k "
             "kept: deviation | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | — | error: {r['error']} |" + " |" * 10)
            continue
        random = _e(r["random"]) if r["random"] is not None else (
            f"refused; norm {_e(r.get('random_norm'))}" if "random_norm" in r else "refused")
        lines.append(
            f"| {r['family']} | {r['twin']} | {r['verdict']} | {r['params'][0]:,} -> {r['params'][1]:,} | "
            f"{_e(r['f32'])} | {_e(r['f64'])} | {random} | {'identical' if r['generate'] else 'DIFFERS'} | "
            f"{_e(r['reload'])} | {'bit-identical' if r['streamed_equal'] else 'DIFFERS'} | {_e(r['grow_raised'])} "
            f"| {r['grow_kept_dev']:.2g} | {r['seconds']:.1f} |")
    refusals = sorted({r["random_refused"] for r in rows if "random_refused" in r})
    if refusals:
        lines += ["", "Random routers refused (one sentence each):", ""] + [f"- {m}" for m in refusals]
    n_exact = sum(r["verdict"] == "exact" for r in rows)
    lines += ["", f"{n_exact} of {len(rows)} pairs exact on every measure; "
                  f"{sum(r['verdict'] == 'WRONG' for r in rows)} wrong."]
    growth = []
    if not args.no_growth:
        for name in MOE_FAMILIES:
            try:
                g = measure_growth(name)
            except Exception as exc:  # noqa: BLE001 -- a benchmark row, reported (and the exit code says so)
                g = {"family": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            growth.append(g)
            print(name, g, flush=True)
        lines += ["", "## Expert-count growth x2 across MoE families", "",
                  "Each model's sparse blocks moved apart as training leaves them (routers, selection biases and "
                  "experts + N(0, 0.1 x std), selection biases + N(0, 0.02): hf_testing.trained_like), then `graphgrow.grow_experts(model, factor=2)`: the rule measured on "
                  "the family's own block (hf/grow_rule.py; docs/maths.md §9), max rel of the logits (3 batches), "
                  "`grow_experts_checkpoint` on the saved model (checked layer by layer) against the in-memory "
                  "bytes, and the deviation with top-k kept.", "",
                  "| family | class | verdict | top-k | rule (notes) | f32 max rel | streamed = in memory (its check) "
                  "| top-k kept: deviation | s |", "|---|---|---|---|---|---|---|---|---|"]
        for g in growth:
            if "error" in g:
                lines.append(f"| {g['family']} | — | error: {g['error']} |" + " |" * 6)
                continue
            if "refused" in g:
                kept = f"{g['kept_dev']:.2g}" if g["kept_dev"] is not None else "—"
                lines.append(f"| {g['family']} | {g['cls']} | refused: {g['refused']} | — | — | — | — | {kept} | "
                             f"{g['seconds']:.1f} |")
                continue
            ok = g["max_rel"] <= TOL[torch.float32] and g["streamed_equal"]
            g["verdict"] = "exact" if ok else "WRONG"
            notes = "; ".join(g["notes"]) or "copies as they are"
            lines.append(f"| {g['family']} | {g['cls']} | {g['verdict']} | {g['top_k'][0]} -> {g['top_k'][1]} | "
                         f"{notes} | {_e(g['max_rel'])} | {'bit-identical' if g['streamed_equal'] else 'DIFFERS'} "
                         f"({_e(g['streamed_check'])}) | {_e(g['kept_dev'])} | {g['seconds']:.1f} |")
        lines += ["", f"{sum(g.get('verdict') == 'exact' for g in growth)} of {len(growth)} families grown exactly; "
                      f"{sum('refused' in g for g in growth)} refused; "
                      f"{sum(g.get('verdict') == 'WRONG' for g in growth)} wrong."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r.get("verdict") == "WRONG" for r in rows + growth) else 0


if __name__ == "__main__":
    sys.exit(main())
