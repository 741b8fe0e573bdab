"""Time of `graphgrow widen` on ONNX files as a ratio to onnx.load + onnx.save of the output model.

    python benchmarks/onnx_widen_time.py [--models resnet50,vit_b_16] [--repeats 3]

Exports each torchvision model (random init, 1x3x224x224, TorchScript exporter) once, runs the widening
once to warm up, then in the same process measures, interleaved (base, widen, widen+check per repeat, so
that all three see the same load), the median of --repeats of:
  baseline  onnx.load(output) + onnx.save(output)
  widen     the CLI path in-process: load + analyse + rewrite + save, with --no-check
  widen+check  the same with the default onnxruntime verification (3 batches)
Writes benchmarks/results/onnx_widen_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def export(name, path):
    import torch
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.get_model(name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--factor", default="1.5")
    a = p.parse_args(argv)
    import onnx

    from graphgrow.cli import main as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            src, out = os.path.join(tmp, f"{name}.onnx"), os.path.join(tmp, f"{name}.wide.onnx")
            export(name, src)
            args = ["-q", "widen", src, "--factor", a.factor, "-o", out]

            def load_save():
                m = onnx.load(out)
                onnx.save(m, os.path.join(tmp, "copy.onnx"))

            cli(args + ["--no-check"])  # warm-up (imports, first evaluators) and the output for load_save
            # interleaved, so that the three medians see the same load on a shared machine
            times: dict = {"base": [], "widen": [], "widen_check": []}
            for _ in range(a.repeats):
                times["base"].append(median_time(load_save, 1))
                times["widen"].append(median_time(lambda: cli(args + ["--no-check"]), 1))
                times["widen_check"].append(median_time(lambda: cli(args), 1))
            base, widen, widen_check = (statistics.median(times[k]) for k in ("base", "widen", "widen_check"))
            rows.append({"model": name, "input_mb": round(os.path.getsize(src) / 2**20, 1),
                         "output_mb": round(os.path.getsize(out) / 2**20, 1), "load_save_s": round(base, 3),
                         "widen_s": round(widen, 3), "widen_check_s": round(widen_check, 3),
                         "ratio": round(widen / base, 2), "ratio_with_check": round(widen_check / base, 2),
                         # each repeat's own ratio (its three timings ran back to back): the spread on a shared machine
                         "ratio_per_repeat": [round(w / b, 2) for w, b in zip(times["widen"], times["base"])],
                         "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
    meta = {"command": "python benchmarks/onnx_widen_time.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "repeats": a.repeats, "factor": a.factor}
    res = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "onnx_widen_time.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# `graphgrow widen` on ONNX files vs onnx.load + onnx.save of the output", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, median of {a.repeats})", "",
             "| model | in MB | out MB | load+save s | widen s (--no-check) | ratio | per-repeat ratios | "
             "widen+check s | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["ratio_per_repeat"]
        lines.append(f"| {r['model']} | {r['input_mb']} | {r['output_mb']} | {r['load_save_s']} | {r['widen_s']} | "
                     f"**{r['ratio']}x** | {min(per)}-{max(per)}x | {r['widen_check_s']} | {r['ratio_with_check']}x |")
    lines += ["", "ratio: median widen time / median load+save time; per-repeat ratios: the range of widen / load+save "
              "within each repeat (the three timings of a repeat run back to back)."]
    with open(os.path.join(res, "onnx_widen_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
