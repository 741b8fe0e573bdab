"""Golden fingerprints of widened weights: record them on one commit, compare another commit against them.

    python benchmarks/weight_fingerprints.py record OUT.json [--onnx-dir DIR] [--only REGEX]
    python benchmarks/weight_fingerprints.py compare BASELINE.json [--onnx-dir DIR] [--only REGEX]
    python benchmarks/weight_fingerprints.py list

Cases (one per line of `list`):

* fx: every zoo model (graphgrow.models.ZOO, batch-2 example inputs) and the 13 torchvision models of
  tests/fx/test_models.py (num_classes=10, same input sizes), widened by
  ``graphgrow.widen(model, factor, example_inputs=..., verify="none")`` at x1.5, plus a noise setting
  (noise=0.01, seed=3) and x2 on a few.  Fingerprint: sha256 over the widened state_dict, sorted by key
  (key, dtype, shape, raw bytes), and the report's per-space (name, old width, new width).
* onnx: zoo and small-input torchvision models exported by both torch exporters (TorchScript,
  ``dynamo=False, opset_version=17``; dynamo, ``dynamo=True``), widened through ``graphgrow.onnx.widen``
  when it exists, else ``graphgrow.onnx.engine.widen_model`` (no onnxruntime check in both).
  Fingerprint: sha256 over the widened initializers sorted by name (name, data_type, dims, bytes of the
  numpy array), the node list in graph order (domain, op_type, inputs, outputs, attributes serialized),
  and the report's per-space widths.  The exports are cached in --onnx-dir (exported on first use);
  each file's sha256 is recorded so that `compare` tells a changed input from a changed output.

Every case starts from ``torch.manual_seed(0)``; inputs come from their own seeded generator.  A case
that raises records ``Class: message`` instead of a hash.  The zoo is imported from the models/ folder
of the checkout holding this script (not from whatever graphgrow.models the environment installs),
and graphgrow from that checkout too.

`compare` exits 0 when every case matches, 1 otherwise, listing: outputs that differ from the same
input (a graphgrow change), cases that now fail or refuse, cases that newly succeed, changed error
messages, and cases whose input changed (the export or the zoo model is not the recorded one: not a
graphgrow difference, but the case is then unverified).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_ONNX_DIR = "/work/golden_onnx"

# --- cases --------------------------------------------------------------------------------------

ZOO_NAMES = ["inception_bn", "inception_bn_narrow", "resnet_small", "densenet_small", "mobilenetv2_small",
             "senet_small", "lenet", "shufflenet_small", "resnext_small"]
# tests/fx/test_models.py
TV = ["resnet18", "resnext50_32x4d", "googlenet", "inception_v3", "densenet121", "mobilenet_v2",
      "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "regnet_y_400mf", "shufflenet_v2_x0_5",
      "vgg11_bn", "alexnet"]
TV_SIZE = {"inception_v3": 80, "vgg11_bn": 224, "alexnet": 224}
# small-input torchvision models for the ONNX cases (64x64 is accepted by all of them)
TV_ONNX = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0",
           "regnet_y_400mf", "googlenet", "mnasnet0_5", "densenet121"]
NOISE = dict(noise=0.01, seed=3)
FX_NOISE = ["resnet_small", "densenet_small", "shufflenet_small", "senet_small", "tv:resnet18", "tv:mobilenet_v2"]
FX_X2 = ["resnet_small", "mobilenetv2_small", "resnext_small", "tv:squeezenet1_1"]
ONNX_NOISE = [("ts", "resnet_small"), ("dynamo", "densenet_small"), ("ts", "tv:mobilenet_v2"),
              ("dynamo", "tv:resnet18")]


def _cid(frontend, model, factor, noise, exporter=None):
    parts = [frontend] + ([exporter] if exporter else []) + [model, f"x{factor:g}"]
    if noise:
        parts.append(f"noise{noise['noise']:g}s{noise['seed']}")
    return "/".join(parts)


def all_cases() -> list:
    cases = []

    def add(frontend, model, factor=1.5, noise=None, exporter=None):
        cases.append(dict(id=_cid(frontend, model, factor, noise, exporter), frontend=frontend, model=model,
                          factor=factor, noise=noise or {}, exporter=exporter))

    for m in ZOO_NAMES + ["tv:" + n for n in TV]:
        add("fx", m)
    for m in FX_NOISE:
        add("fx", m, noise=NOISE)
    for m in FX_X2:
        add("fx", m, factor=2.0)
    for exporter in ("ts", "dynamo"):
        for m in ZOO_NAMES + ["tv:" + n for n in TV_ONNX]:
            add("onnx", m, exporter=exporter)
    for exporter, m in ONNX_NOISE:
        add("onnx", m, noise=NOISE, exporter=exporter)
    return cases


# --- hashing ------------------------------------------------------------------------------------

class _H:
    """sha256 over length-prefixed fields (no two field sequences hash alike)."""

    def __init__(self):
        self.h = hashlib.sha256()

    def add(self, *fields):
        for f in fields:
            b = f if isinstance(f, (bytes, bytearray, memoryview)) else str(f).encode()
            self.h.update(len(b).to_bytes(8, "little"))
            self.h.update(b)
        return self

    def hex(self):
        return self.h.hexdigest()


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict_hash(model) -> str:
    h = _H()
    for k, v in sorted(model.state_dict().items()):
        h.add(k, str(v.dtype), tuple(v.shape), _tensor_bytes(v))
    return h.hex()


def onnx_weights_hash(model) -> str:
    from onnx import numpy_helper

    h = _H()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        h.add(t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
    return h.hex()


def onnx_structure_hash(model) -> str:
    h = _H()

    def graph(g):
        h.add("graph", len(g.node))
        for n in g.node:
            h.add(n.domain, n.op_type, tuple(n.input), tuple(n.output), len(n.attribute))
            for a in n.attribute:
                h.add(a.name, a.SerializeToString(deterministic=True))
        h.add("outputs", tuple(o.name for o in g.output))

    graph(model.graph)
    return h.hex()


def widths_of(report) -> list:
    return sorted([s.name, int(s.old_width), int(s.new_width)] for s in report.spaces)


# --- running one case ---------------------------------------------------------------------------

def load_zoo():
    """graphgrow.models from this checkout's models/ folder (the editable install may point elsewhere)."""
    init = os.path.join(ROOT, "models", "__init__.py")
    mod = sys.modules.get("graphgrow.models")
    if mod is not None and os.path.abspath(mod.__file__) == init:
        return mod
    import graphgrow

    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location("graphgrow.models", init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["graphgrow.models"] = mod
        spec.loader.exec_module(mod)
        graphgrow.models = mod
        return mod
    import graphgrow.models as mod  # noqa: F811

    return mod


def build(model: str, onnx: bool):
    """(eval-mode module, example inputs tuple) for a zoo name or 'tv:<torchvision name>'."""
    import torch

    torch.manual_seed(0)
    if model.startswith("tv:"):
        import torchvision

        name = model[3:]
        kw = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
        m = torchvision.models.get_model(name, num_classes=10, **kw).eval()
        s = 64 if onnx else TV_SIZE.get(name, 64)
        g = torch.Generator().manual_seed(1)
        return m, (torch.randn(1, 3, s, s, generator=g),)
    zoo = load_zoo()
    m = zoo.ZOO[model].build().eval()
    return m, tuple(zoo.example_inputs(model, batch=1 if onnx else 2))


def inputs_hash(inputs) -> str:
    h = _H()
    for x in inputs:
        h.add(str(x.dtype), tuple(x.shape), _tensor_bytes(x))
    return h.hex()


def _error(exc) -> dict:
    import graphgrow

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    status = "refused" if isinstance(exc, graphgrow.GraphGrowError) else "error"
    return {"status": status, "error": f"{type(exc).__name__}: {msg}"}


def run_fx(case) -> dict:
    import graphgrow

    model, inputs = build(case["model"], onnx=False)
    out = {"input": _H().add(state_dict_hash(model), inputs_hash(inputs)).hex()}
    try:
        wide = graphgrow.widen(model, case["factor"], example_inputs=inputs, verify="none", **case["noise"])
    except Exception as exc:  # noqa: BLE001
        out.update(_error(exc))
        return out
    widths = widths_of(wide.graphgrow_report)
    out.update(status="ok", weights=state_dict_hash(wide), widths=widths)
    return out


def export(model: str, exporter: str) -> bytes:
    import onnx
    import torch

    m, inputs = build(model, onnx=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            proto = torch.onnx.export(m, inputs, dynamo=True, verbose=False).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(m, inputs, f, dynamo=False, opset_version=17)
            proto = onnx.load_from_string(f.getvalue())
    return proto.SerializeToString()


def onnx_file(case, onnx_dir: str, say) -> tuple:
    """(bytes, freshly exported?) of the case's cached export, exporting it if missing."""
    name = f"{case['exporter']}_{case['model'].replace(':', '_')}.onnx"
    path = os.path.join(onnx_dir, name)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read(), False
    say(f"exporting {name} ...")
    data = export(case["model"], case["exporter"])
    os.makedirs(onnx_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return data, True


def _unpack(res):
    """(ModelProto, report) from whatever the ONNX widen function returned."""
    import onnx

    items = list(res) if isinstance(res, (tuple, list)) else [res]
    proto = report = None
    for it in items:
        if isinstance(it, onnx.ModelProto):
            proto = proto or it
        elif hasattr(it, "spaces"):
            report = report or it
        if proto is None and not isinstance(it, onnx.ModelProto):
            for attr in ("model", "model_proto", "widened", "proto", "result"):
                v = getattr(it, attr, None)
                if isinstance(v, onnx.ModelProto):
                    proto = v
                    break
            else:
                for v in getattr(it, "__dict__", {}).values():
                    if isinstance(v, onnx.ModelProto):
                        proto = v
                        break
        if report is None and not hasattr(it, "spaces") and hasattr(getattr(it, "report", None), "spaces"):
            report = it.report
    if proto is None or report is None:
        raise TypeError(f"cannot find the widened ModelProto and report in {type(res).__name__}")
    return proto, report


def onnx_widen_function():
    """("graphgrow.onnx.widen" | "graphgrow.onnx.engine.widen_model", callable(model, factor, **noise))."""
    import graphgrow.onnx as go

    fn = getattr(go, "widen", None)
    if callable(fn):
        params = inspect.signature(fn).parameters
        kw = {}
        if "check" in params:
            kw["check"] = False
        elif "verify" in params:
            d = params["verify"].default
            kw["verify"] = False if isinstance(d, bool) else "none"
        return "graphgrow.onnx.widen", lambda m, f, **n: _unpack(fn(m, f, **kw, **n))
    from graphgrow.onnx.engine import widen_model

    return "graphgrow.onnx.engine.widen_model", lambda m, f, **n: _unpack(widen_model(m, f, check=False, **n))


def run_onnx(case, onnx_dir, say) -> dict:
    import onnx

    data, fresh = onnx_file(case, onnx_dir, say)
    out = {"input": hashlib.sha256(data).hexdigest(), "exported": fresh}
    _, widen = onnx_widen_function()
    try:
        wide, report = widen(onnx.ModelProto.FromString(data), case["factor"], **case["noise"])
    except Exception as exc:  # noqa: BLE001
        out.update(_error(exc))
        return out
    out.update(status="ok", weights=onnx_weights_hash(wide), structure=onnx_structure_hash(wide),
               widths=widths_of(report))
    return out


def run_case(case, onnx_dir, say) -> dict:
    t0 = time.perf_counter()
    out = run_fx(case) if case["frontend"] == "fx" else run_onnx(case, onnx_dir, say)
    if out["status"] == "ok":
        h = _H().add(out["weights"], out.get("structure", ""), json.dumps(out["widths"]))
        out["fingerprint"] = h.hex()
    else:
        out["fingerprint"] = out["error"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# --- record / compare ---------------------------------------------------------------------------

def _git(*args):
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def meta(argv, seconds) -> dict:
    import graphgrow
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {"command": "python benchmarks/weight_fingerprints.py " + " ".join(argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "graphgrow": os.path.dirname(graphgrow.__file__), "zoo": os.path.dirname(load_zoo().__file__),
            "onnx_widen": onnx_widen_function()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 1)}


def run_all(cases, onnx_dir) -> dict:
    results = {}
    for i, case in enumerate(cases, 1):
        def say(s, _c=case):
            print(f"    {_c['id']}: {s}", file=sys.stderr, flush=True)

        r = run_case(case, onnx_dir, say)
        results[case["id"]] = dict(case=case, **r)
        shown = r["fingerprint"][:16] if r["status"] == "ok" else r["fingerprint"][:120]
        print(f"[{i}/{len(cases)}] {case['id']}: {r['status']} {shown} ({r['seconds']}s)", file=sys.stderr,
              flush=True)
    return results


def select(cases, only):
    return [c for c in cases if not only or re.search(only, c["id"])]


def _widths_diff(a, b, limit=6) -> str:
    da, db = {x[0]: x[1:] for x in a}, {x[0]: x[1:] for x in b}
    lines = []
    for k in sorted(set(da) | set(db)):
        if da.get(k) != db.get(k):
            lines.append(f"{k}: {da.get(k)} -> {db.get(k)}")
    more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def compare(base: dict, now: dict) -> dict:
    """case id -> (kind, detail) for every case that is not identical."""
    diffs = {}
    for cid, r in now.items():
        b = base.get(cid)
        if b is None:
            diffs[cid] = ("not in baseline", "")
            continue
        if b["fingerprint"] == r["fingerprint"] and b["input"] == r["input"]:
            continue
        if b["input"] != r["input"]:
            extra = "" if b["fingerprint"] == r["fingerprint"] else " (and its result differs)"
            diffs[cid] = ("INPUT CHANGED", f"input {b['input'][:12]} -> {r['input'][:12]}{extra}")
        elif b["status"] == "ok" and r["status"] != "ok":
            diffs[cid] = ("NOW FAILS", r["error"])
        elif b["status"] != "ok" and r["status"] == "ok":
            diffs[cid] = ("NEWLY SUCCEEDS", f"was {b['error']}")
        elif b["status"] != "ok":
            diffs[cid] = ("ERROR CHANGED", f"{b['error']}  ->  {r['error']}")
        else:
            parts = [k for k in ("weights", "structure") if b.get(k) != r.get(k)]
            if b["widths"] != r["widths"]:
                parts.append("widths [" + _widths_diff(b["widths"], r["widths"]) + "]")
            diffs[cid] = ("DIFFERS", ", ".join(parts))
    return diffs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["record", "compare", "list"])
    p.add_argument("json", nargs="?", help="record: file to write; compare: the baseline")
    p.add_argument("--onnx-dir", default=DEFAULT_ONNX_DIR, help="cache of the exported ONNX files")
    p.add_argument("--only", help="regex on case ids (e.g. '^fx/', 'onnx/dynamo', 'resnet18')")
    p.add_argument("--threads", type=int, default=int(os.environ.get("GOLDEN_THREADS", "2")),
                   help="torch intra-op threads (does not change the results)")
    a = p.parse_args(argv)
    cases = select(all_cases(), a.only)
    if a.action == "list":
        for c in cases:
            print(c["id"])
        return 0
    if not a.json:
        p.error(f"{a.action} needs a JSON path")
    import torch

    torch.set_num_threads(a.threads)
    if a.action == "compare":
        with open(a.json) as f:
            baseline = json.load(f)
        base = baseline["cases"]
        cases = [c for c in cases if c["id"] in base] + [c for c in cases if c["id"] not in base]
    t0 = time.perf_counter()
    results = run_all(cases, a.onnx_dir)
    seconds = time.perf_counter() - t0
    m = meta(argv, seconds)
    if a.action == "record":
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        counts = {}
        for r in results.values():
            counts[f"{r['case']['frontend']} {r['status']}"] = counts.get(f"{r['case']['frontend']} {r['status']}",
                                                                          0) + 1
        m["counts"] = counts
        for r in results.values():
            r.pop("exported", None)
        with open(a.json, "w") as f:
            json.dump({"meta": m, "cases": results}, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(results)} cases in {seconds:.0f}s -> {a.json}: {counts}", file=sys.stderr)
        return 0
    for cid, r in results.items():
        if r.get("exported") and cid in base and base[cid]["input"] != r["input"]:
            print(f"WARNING: {cid}: the re-exported ONNX file differs from the recorded input "
                  f"({base[cid]['input'][:12]} -> {r['input'][:12]}): its result cannot be compared",
                  file=sys.stderr)
    diffs = compare(base, results)
    missing = [c["id"] for c in select([r["case"] for r in base.values()], a.only) if c["id"] not in results]
    print(f"baseline: {baseline['meta'].get('commit', '?')[:12]} ({baseline['meta'].get('date', '')}); "
          f"now: {m['commit'][:12]}{' (dirty)' if m['dirty'] else ''}; onnx via {m['onnx_widen']}")
    order = ["DIFFERS", "NOW FAILS", "NEWLY SUCCEEDS", "ERROR CHANGED", "INPUT CHANGED", "not in baseline"]
    for kind in order:
        for cid, (k, detail) in diffs.items():
            if k == kind:
                print(f"{kind}: {cid}: {detail}")
    for cid in missing:
        print(f"not run (no longer a case): {cid}")
    same = len(results) - len(diffs)
    print(f"{same}/{len(results)} cases identical, {len(diffs)} not; compare took {seconds:.0f}s")
    return 1 if diffs or missing else 0


if __name__ == "__main__":
    sys.exit(main())
