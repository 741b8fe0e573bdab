"""Net2DeeperNet figures: the paper's deeper Inception-BN, every block kind on five torchvision models (fx and
ONNX), and the training-mode deviation with and without batch-norm calibration.

    PYTHONPATH=. python benchmarks/deepen_check.py [--skip-vgg]

1. The paper's configuration on the zoo's ``inception_bn(factorized=True)``: after the last vertical-horizontal
   pair of every module, two more identity pairs (``models.PAPER_DEEPER_AFTER`` / ``PAPER_DEEPER_KERNEL``);
   fx (checked in onnxruntime) and ONNX (``graphgrow.onnx.deepen`` on the TorchScript export, checked in onnxruntime).
2. With ``calibrate`` = 8 batches of 32 (seeded normal images), the relative deviation of the deepened model from
   the original, both in training mode, before and after calibration.
3. Every block kind at one insertion point of resnet18, googlenet, inception_v3, vgg11_bn, mobilenet_v2.
Writes benchmarks/results/deepen_check.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnx  # noqa: E402
import torch  # noqa: E402

import graphgrow  # noqa: E402
from graphgrow import models  # noqa: E402
import graphgrow.onnx as gonnx  # noqa: E402

# (model, input size): [(block, fx `after`, ONNX `after`, kernel)]
CASES = {
    ("resnet18", 64): [("conv-bn-relu", "layer1", "/layer1/layer1.1/relu_1/Relu", "3"),
                       ("conv-bn", "layer2.0.bn1", "/layer2/layer2.0/Add", "3"),
                       ("residual", "layer3", "/layer3/layer3.1/relu_1/Relu", "3"),
                       ("linear", "flatten", "/Flatten", "3")],
    ("googlenet", 64): [("conv-bn-relu", "inception3a", "/inception3a/Concat", "1x3+3x1"),
                        ("conv-bn", "inception4a", "/inception4a/Concat", "5"),
                        ("residual", "maxpool3", "/maxpool3/MaxPool", "3"),
                        ("linear", "flatten", "/Flatten", "3")],
    ("inception_v3", 80): [("conv-bn-relu", "Mixed_6b", "/Mixed_6b/Concat", "1x7+7x1"),
                           ("conv-bn", "Mixed_5b", "/Mixed_5b/Concat", "3"),
                           ("residual", "Mixed_5c", "/Mixed_5c/Concat", "1x3+3x1"),
                           ("linear", "flatten", "/Flatten", "3")],
    ("mobilenet_v2", 64): [("conv-bn-relu", "features.1.conv.0", "/features/features.1/conv/conv.0/conv.0.2/Clip", "3"),
                           ("conv-bn", "features.3", "/features/features.3/Add", "3"),
                           ("residual", "features.5", "/features/features.5/Add", "3"),
                           ("linear", "flatten", "/Flatten", "3")],
    ("vgg11_bn", 224): [("conv-bn-relu", "features.2", "/features/features.2/Relu", "3"),
                        ("conv-bn", "features.9", "/features/features.8/Conv", "3"),
                        ("residual", "features.10", "/features/features.10/Relu", "3"),
                        ("linear", "classifier.1", "/classifier/classifier.1/Relu", "3")],
}


def export(model, inputs) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), inputs, f, dynamo=False, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def kernel_arg(k: str):
    return int(k) if k.isdigit() else k


def paper(rows: list, meta: dict):
    torch.manual_seed(0)
    model = models.inception_bn(factorized=True).eval()
    x = models.example_inputs("inception_bn", batch=2)
    t = time.perf_counter()
    deep = graphgrow.deepen(model, after=models.PAPER_DEEPER_AFTER, kernel=models.PAPER_DEEPER_KERNEL,
                            example_inputs=x, verify="onnxruntime")
    rep = deep.graphgrow_report
    rows.append({"model": "inception_bn(factorized) paper config", "path": "fx", "block": "conv-bn-relu",
                 "kernel": models.PAPER_DEEPER_KERNEL, "insertions": len(rep.insertions),
                 "params_before": rep.params_before, "params_after": rep.params_after,
                 "max_rel": rep.check.worst.max_rel, "seconds": round(time.perf_counter() - t, 2)})
    t = time.perf_counter()
    src = export(model, models.example_inputs("inception_bn", batch=1))
    onnx_after = r".*/branch_dbl3x3\.2\.1/act/Relu"
    orep = gonnx.deepen(src, after=onnx_after, kernel=models.PAPER_DEEPER_KERNEL)
    rows.append({"model": "inception_bn(factorized) paper config", "path": "onnx", "block": "conv-bn-relu",
                 "kernel": models.PAPER_DEEPER_KERNEL, "insertions": len(orep.insertions),
                 "params_before": orep.params_before, "params_after": orep.params_after,
                 "max_rel": orep.check.worst.max_rel, "seconds": round(time.perf_counter() - t, 2)})
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(8)]
    cal = graphgrow.deepen(model, after=models.PAPER_DEEPER_AFTER, kernel=models.PAPER_DEEPER_KERNEL,
                           example_inputs=x, calibrate=batches)
    crep = cal.graphgrow_report
    meta["calibration"] = {"batches": 8, "batch_size": 32, "train_deviation_uncalibrated": crep.train_deviation,
                           "train_deviation_calibrated": crep.train_deviation_calibrated,
                           "eval_max_rel_after_calibration": crep.check.worst.max_rel}
    print(crep.summary(), file=sys.stderr, flush=True)


def torchvision_cases(rows: list, skip_vgg: bool):
    import torchvision

    for (name, size), cases in CASES.items():
        if skip_vgg and name == "vgg11_bn":
            continue
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10, **kw).eval()
        x = (torch.randn(2, 3, size, size),)
        src = export(model, (x[0][:1],))
        for block, fx_after, onnx_after, kernel in cases:
            t = time.perf_counter()
            rep = graphgrow.deepen(model, after=fx_after, block=block, kernel=kernel_arg(kernel),
                                   example_inputs=x).graphgrow_report
            rows.append({"model": name, "path": "fx", "block": block, "kernel": kernel, "after": fx_after,
                         "insertions": len(rep.insertions), "params_before": rep.params_before,
                         "params_after": rep.params_after, "max_rel": rep.check.worst.max_rel,
                         "seconds": round(time.perf_counter() - t, 2)})
            t = time.perf_counter()
            orep = gonnx.deepen(src, after=onnx_after, block=block, kernel=kernel_arg(kernel))
            rows.append({"model": name, "path": "onnx", "block": block, "kernel": kernel, "after": onnx_after,
                         "insertions": len(orep.insertions), "params_before": orep.params_before,
                         "params_after": orep.params_after, "max_rel": orep.check.worst.max_rel,
                         "seconds": round(time.perf_counter() - t, 2)})
            print(rows[-2]["model"], block, rows[-2]["max_rel"], rows[-1]["max_rel"], file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--skip-vgg", action="store_true", help="leave out vgg11_bn (224x224, 130M parameters)")
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: list = []
    meta = {"command": "PYTHONPATH=. python benchmarks/deepen_check.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__}
    paper(rows, meta)
    torchvision_cases(rows, a.skip_vgg)
    out = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(out, "deepen_check.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    c = meta["calibration"]
    lines = ["# Net2DeeperNet: identity blocks verified in onnxruntime", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, torch {meta['torch']})", "",
             "fx rows: `graphgrow.deepen(..., verify='torch')` (the paper rows: `verify='onnxruntime'`); onnx rows: "
             "`graphgrow.onnx.deepen` on the TorchScript export, checked in onnxruntime. "
             "max_rel is the worst relative error over 3 batches.", "",
             "| model | path | block | kernel | blocks | params before | params after | max_rel | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['path']} | {r['block']} | {r['kernel']} | {r['insertions']} | "
                     f"{r['params_before']:,} | {r['params_after']:,} | {r['max_rel']:.1e} | {r['seconds']} |")
    worst = max(r["max_rel"] for r in rows)
    lines += ["", f"**{len(rows)} deepenings, all verified; worst max_rel {worst:.1e}.**", "",
              "## Batch-norm calibration (training mode)", "",
              f"The paper configuration with `calibrate` = {c['batches']} batches of {c['batch_size']} "
              "(seeded normal 3x32x32 images); relative deviation ‖f_deep(x) − f(x)‖ / ‖f(x)‖ with both models in "
              "training mode, over those batches:", "",
              "| | training-mode rel. deviation |", "|---|---|",
              f"| uncalibrated (BN statistics 0/1) | {c['train_deviation_uncalibrated']:.3f} |",
              f"| calibrated | {c['train_deviation_calibrated']:.3f} |", "",
              f"Eval mode stays exact after calibration (max_rel {c['eval_max_rel_after_calibration']:.1e})."]
    with open(os.path.join(out, "deepen_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
