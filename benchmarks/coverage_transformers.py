"""Transformer coverage: widen torchvision and timm transformers (and ConvNeXt-style normalized CNNs) at x2 and
x1.41 with the fx frontend and verify every result.

Each model (random init, then :func:`coverage.desymmetrize`: every all-constant tensor -- identity norms, zero
heads, layer scales -- made random, so that the check sees how they were mapped) runs in its own subprocess::

    wide = graphgrow.widen(model, factor, example_inputs=(x,), verify="torch")

``verify="torch"`` compares both models on 3 random batches and re-derives the widening in float64 when the
float32 difference is above the float32 floor, so *exact* means equivalent to the original.  Columns: the
residual stream (*stream*: the spaces a norm reads across channels, "widened" when all of them grew, else the
first reason one stayed), the attention heads (*heads*: projections cut into heads that grew / all), the
parameters, the worst relative output difference and the time.  Statuses: ``exact`` (verified), ``refused:``
(a GraphGrowError: a clear refusal), ``WRONG:`` (VerificationError: never expected), ``error:`` (a bug),
``timeout``, ``skipped: too large`` (params after widening above ``--max-params``).

Usage::

    PYTHONPATH=. python benchmarks/coverage_transformers.py               # every model, x2 and x1.41
    PYTHONPATH=. python benchmarks/coverage_transformers.py --only 'vit|swin' --factors 2

Results: ``benchmarks/results/coverage_transformers.{json,md}`` (rewritten after every model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

TORCHVISION = ["vit_b_16", "vit_b_32", "vit_l_16", "swin_t", "swin_s", "swin_b", "swin_v2_t", "convnext_tiny",
               "convnext_small", "maxvit_t"]
TIMM = ["vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
        "swin_tiny_patch4_window7_224", "convnext_atto", "convnext_nano", "mixer_s16_224", "poolformer_s12",
        "levit_128s", "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "pvt_v2_b0",
        "xcit_nano_12_p16_224", "coat_lite_tiny", "resmlp_12_224", "gmlp_ti16_224", "crossvit_tiny_240",
        "efficientformer_l1"]
SIZE = {"crossvit_tiny_240": 240, "maxvit_t": 224}


def build(name: str):
    import torch

    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name[3:], num_classes=10)
    import timm

    return timm.create_model(name[5:], pretrained=False, num_classes=10)


def _widen_onnx(model, x, factor):
    """The ONNX frontend on the model's TorchScript export (opset 17), checked in onnxruntime."""
    import io
    import warnings

    import onnx
    import torch

    import graphgrow.onnx as gonnx

    buf = io.BytesIO()
    with warnings.catch_warnings():  # (not under no_grad: nn.MultiheadAttention's fast path does not export)
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x[:1],), buf, dynamo=False, opset_version=17)
        except Exception as exc:  # noqa: BLE001 - the exporter's failure, not graphgrow's
            raise ExportFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return gonnx.widen(onnx.load_from_string(buf.getvalue()), factor)


class ExportFailed(Exception):
    """torch.onnx could not export the model (the ONNX frontend has nothing to read)."""


def worker(name: str, factor: float, frontend: str = "fx") -> dict:
    import torch

    sys.path.insert(0, HERE)
    import graphgrow
    from coverage import desymmetrize

    torch.set_num_threads(1)
    model = build(name).eval()
    desymmetrize(model)
    size = SIZE.get(name.split(":", 1)[1], 224)
    x = torch.randn(2, 3, size, size)
    before = sum(p.numel() for p in model.parameters())
    row = {"model": name, "factor": factor, "input": f"{size}x{size}", "params_before": before}
    t = time.time()
    try:
        if frontend == "onnx":
            rep = _widen_onnx(model, x, factor)
        else:
            wide = graphgrow.widen(model, factor, example_inputs=(x,), verify="torch")
            rep = wide.graphgrow_report
    except graphgrow.VerificationError as exc:
        row["status"] = f"WRONG: {str(exc).splitlines()[0][:300]}"
        return row
    except ExportFailed as exc:
        row["status"] = f"export failed: {exc}"
        return row
    except graphgrow.GraphGrowError as exc:
        row["status"] = f"refused: {str(exc).splitlines()[0][:300]}"
        return row
    except Exception as exc:  # noqa: BLE001 - any other failure is a bug to report
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "graphgrow" in f.filename]
        where = f" at {frames[-1].filename.split('graphgrow/')[-1]}:{frames[-1].lineno}" if frames else ""
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}{where}"
        return row
    row["seconds"] = round(time.time() - t, 1)
    row["params_after"] = rep.params_after
    row["max_rel"] = rep.check.worst.max_rel if rep.check is not None and rep.check.worst is not None else None
    spaces = rep.spaces
    row["spaces"], row["widened"] = len(spaces), sum(1 for s in spaces if s.new_width > s.old_width)
    stream = [s for s in spaces if s.normalized]
    stayed = [s for s in stream if s.new_width == s.old_width]
    row["stream_spaces"], row["stream_widened"] = len(stream), len(stream) - len(stayed)
    row["stream"] = ("none" if not stream else "widened" if not stayed else
                     f"{len(stayed)}/{len(stream)} stay: {stayed[0].name}: "
                     f"{(stayed[0].frozen_reasons or ['?'])[0][:200]}")
    heads = [s for s in spaces if s.head_dim > 1]
    row["heads"] = f"{sum(1 for s in heads if s.new_width > s.old_width)}/{len(heads)}"
    row["notes"] = list(rep.notes)
    row["status"] = "exact"
    return row


def run_one(name: str, factor: float, timeout: int, frontend: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, str(factor), "--frontend", frontend]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "factor": factor, "status": "timeout"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "factor": factor, "status": f"error: worker exited {out.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def _m(n):
    return f"{n / 1e6:.2f}M" if n else ""


def write(rows: list, commands: list, frontend: str = "fx") -> None:
    os.makedirs(RESULTS, exist_ok=True)
    order = {n: i for i, n in enumerate([f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM])}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), -r["factor"]))
    stem = "coverage_transformers" + ("_onnx" if frontend == "onnx" else "")
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"commands": commands, "rows": rows}, f, indent=1)
    command = "`, then `".join(commands)
    import torch

    exact = sum(1 for r in rows if r["status"] == "exact")
    how = ("the TorchScript export (opset 17, batch 1) widened by `graphgrow.onnx.widen(model, factor)` and checked "
           "in onnxruntime" if frontend == "onnx" else
           "`graphgrow.widen(model, factor, example_inputs=(x,), verify='torch')`")
    wrong = sum(1 for r in rows if r["status"].startswith("WRONG"))
    others = {k: sum(1 for r in rows if r["status"].startswith(k))
              for k in ("refused", "export failed", "skipped", "error", "timeout")}
    lines = [f"# graphgrow transformer coverage ({frontend} frontend)", "",
             f"**{exact}/{len(rows)} runs exact, {wrong} wrong**; "
             + ", ".join(f"{n} {k}" for k, n in others.items() if n) + ".", "",
             f"Command: `{command}`", "",
             f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs. Every model: "
             f"random init, all-constant tensors made random (`coverage.desymmetrize`), batch of 2, {how}. *stream*: "
             "the spaces a norm reads across channels (the residual stream); *heads*: projections cut into attention "
             "heads that grew / all.",
             "", "| model | factor | params before | params after | spaces widened | stream | heads | max_rel | s "
             "| status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mr = f"{r['max_rel']:.1e}" if r.get("max_rel") is not None else ""
        lines.append(f"| {r['model']} | {r['factor']} | {_m(r.get('params_before'))} | {_m(r.get('params_after'))} | "
                     f"{r.get('widened', '')}/{r.get('spaces', '')} | {r.get('stream', '')} | {r.get('heads', '')} | "
                     f"{mr} | {r.get('seconds', '')} | {r['status']} |")
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "FACTOR"))
    p.add_argument("--only", help="regex over model names (tv:NAME, timm:NAME)")
    p.add_argument("--factors", default="2,1.41")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--max-params", type=float, default=700e6, help="skip when params x factor^2 exceed this")
    p.add_argument("--resume", action="store_true", help="keep rows already in the json")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the json")
    p.add_argument("--frontend", choices=["fx", "onnx"], default="fx",
                   help="onnx: the TorchScript export (opset 17) widened by graphgrow.onnx, checked in onnxruntime")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], float(a.worker[1]), a.frontend)))
        return 0
    names = [f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]
    if a.only:
        names = [n for n in names if re.search(a.only, n)]
    command = "PYTHONPATH=. python benchmarks/coverage_transformers.py " + " ".join(argv or sys.argv[1:])
    rows, commands = [], [command]
    path = os.path.join(RESULTS, "coverage_transformers" + ("_onnx" if a.frontend == "onnx" else "") + ".json")
    if (a.resume or a.report_only) and os.path.exists(path):
        old = json.load(open(path))
        rows = old["rows"]
        commands = old.get("commands", [old.get("command")]) + ([] if a.report_only else [command])
    if a.report_only:
        write(rows, commands, a.frontend)
        return 0
    done = {(r["model"], r["factor"]) for r in rows}
    for name in names:
        for factor in [float(f) for f in a.factors.split(",")]:
            if (name, factor) in done:
                continue
            params = sum(p.numel() for p in build(name).parameters())
            if params * factor ** 2 > a.max_params:
                row = {"model": name, "factor": factor, "params_before": params,
                       "status": f"skipped: too large for this machine (~{params * factor ** 2 / 1e6:.0f}M after)"}
            else:
                row = run_one(name, factor, a.timeout, a.frontend)
            rows.append(row)
            print(f"{name} x{factor}: {row['status']} stream={row.get('stream')} heads={row.get('heads')}",
                  flush=True)
            write(rows, commands, a.frontend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
