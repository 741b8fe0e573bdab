"""ONNX-mode coverage: every torchvision classification model exported to ONNX, widened by the CLI path, checked.

    python benchmarks/coverage_onnx.py [--workers N] [--only REGEX] [--factor 1.5] [--out DIR] [--max-params 3e8]

Per model, in a worker process: random init, torch.onnx.export (TorchScript exporter, opset 17, batch 1),
then graphgrow.onnx.widen (the code behind `graphgrow widen`: analysis, rewrite, onnx.checker,
onnxruntime comparison with the input over 3 batches). Writes coverage_onnx.{json,md} into --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BIG_INPUT = ("vit_", "swin", "maxvit", "vgg", "alexnet")


def size_for(name):
    if name.startswith(BIG_INPUT):
        return 224
    return 96 if name == "inception_v3" else 64


def one(args):
    name, factor, max_params = args
    import torch
    import torchvision

    import graphgrow
    import graphgrow.onnx as gonnx

    torch.set_num_threads(2)
    out = {"model": name, "input": size_for(name)}
    t0 = time.perf_counter()
    try:
        kw = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
        torch.manual_seed(0)
        m = torchvision.models.get_model(name, **kw).eval()
        n = sum(p.numel() for p in m.parameters())
        out["params_torch"] = n
        if n * factor * factor > max_params:
            out["status"] = "skipped: too large for this sweep"
            return out
        s = out["input"]
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(m, (torch.randn(1, 3, s, s),), path, dynamo=False, opset_version=17,
                              external_data=n > 4e8)
            out["export_s"] = round(time.perf_counter() - t0, 1)
            from graphgrow.onnx.io import load_model

            model = load_model(path)
            t1 = time.perf_counter()
            rep = gonnx.widen(model, factor)
            out["widen_check_s"] = round(time.perf_counter() - t1, 1)
        from coverage import stream_cell

        out["stream"] = stream_cell(rep)
        out.update(params_before=rep.params_before, params_after=rep.params_after, spaces=len(rep.spaces),
                   widened=len(rep.widened), frozen=sum(1 for x in rep.spaces if x.status == "frozen"),
                   max_rel=rep.check.worst.max_rel, max_abs=rep.check.worst.max_abs,
                   top_frozen=sorted(rep.frozen_reasons().items(), key=lambda kv: -kv[1])[:2])
        out["status"] = "widened+equivalent" if rep.widened else "equivalent, nothing widened"
    except graphgrow.VerificationError as exc:
        out["status"] = f"WRONG: {exc}"
    except graphgrow.GraphGrowError as exc:
        out["status"] = f"refused: {type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{fr.filename.split('graphgrow/')[-1]}:{fr.lineno}" for fr in reversed(tb)
                      if "graphgrow" in fr.filename), "")
        out["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]} {where}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {out['status'][:100]} ({out['seconds']}s)", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--only")
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--max-params", type=float, default=3e8)
    a = p.parse_args(argv)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if a.only:
        names = [n for n in names if re.search(a.only, n)]
    rows = []
    # biggest models first so the long ones overlap; results are written after every model
    order = sorted(names, key=lambda n: (not n.startswith(("vit_l", "vit_h", "regnet_y_32", "regnet_y_128", "vgg",
                                                          "convnext_large", "swin_v2_b", "swin_b")), n))
    with mp.get_context("spawn").Pool(a.workers, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(one, [(n, a.factor, a.max_params) for n in order], chunksize=1):
            rows.append(r)
            rows.sort(key=lambda r: r["model"])
            write(a, argv, rows, len(names))


def write(a, argv, rows, total):
    import onnxruntime
    import torch
    import torchvision
    ok = sum(1 for r in rows if r["status"] == "widened+equivalent")
    counts: dict = {}
    for r in rows:
        key = r["status"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    meta = {"command": "python benchmarks/coverage_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
            "cpus": os.cpu_count(), "summary": f"{ok}/{total} widened and equivalent"
            + ("" if len(rows) == total else f" ({len(rows)}/{total} models run so far)"), "counts": counts}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "coverage_onnx.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    lines = ["# graphgrow ONNX-mode coverage: torchvision models exported to ONNX, widened x%s, checked" % a.factor, "",
             f"**{meta['summary']}**", "", f"Status counts: {counts}", "",
             f"Command: `{meta['command']}` ({meta['date']}; torch {meta['torch']}, torchvision "
             f"{meta['torchvision']}, onnxruntime {meta['onnxruntime']}, {meta['cpus']} CPUs)", "",
             "Each model: TorchScript exporter, opset 17, batch 1; `graphgrow.onnx.widen` = the code behind `graphgrow widen` "
             "(analysis, rewrite, onnx.checker, onnxruntime comparison with the input, 3 batches).", "",
             "| model | input | params before | params after | spaces | widened | frozen | residual stream widened | "
             "max_rel | export s | widen+check s | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mr = r.get("max_rel")
        lines.append(f"| {r['model']} | {r['input']} | {r.get('params_before', '')} | {r.get('params_after', '')} | "
                     f"{r.get('spaces', '')} | {r.get('widened', '')} | {r.get('frozen', '')} | "
                     f"{r.get('stream', '(not measured)').replace('|', '/')} | {'' if mr is None else '%.1e' % mr} | {r.get('export_s', '')} | {r.get('widen_check_s', '')} | "
                     f"{r['status'][:160]} |")
    with open(os.path.join(a.out, "coverage_onnx.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(meta["summary"], counts)


if __name__ == "__main__":
    main()
